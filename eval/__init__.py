"""Evaluation entry points (`python -m eval.NAME`), task files and run definitions."""
