"""Thin command-line tools: `python -m tools.NAME --help`. Logic lives in kobllla/."""
