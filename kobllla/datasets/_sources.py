"""Rows from local files or the hub: lives in the torch-free :mod:`kobllla.rows` (text tools read it too)."""

from kobllla.rows import LOCAL_FORMATS, Row, RowRef, iter_rows, require_field

__all__ = ["LOCAL_FORMATS", "Row", "RowRef", "iter_rows", "require_field"]
