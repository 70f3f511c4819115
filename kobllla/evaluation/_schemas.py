"""Row schemas of the hub datasets our tasks read, checked before lm_eval sees a local file.

A malformed local file must fail here with its file, row and field named, not deep inside
``datasets`` or a Jinja template halfway through an evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kobllla.jsonl import iter_jsonl

Row = dict
Check = Callable[[Row], str | None]  # returns a problem description, or None when the row is fine


def _str_fields(*names: str) -> Check:
    def check(row: Row) -> str | None:
        for name in names:
            if not isinstance(row.get(name), str) or not row[name].strip():
                return f"field {name!r} must be a non-empty string, got {row.get(name)!r}"
        return None

    return check


def _int_field(name: str, allowed: range | tuple) -> Check:
    def check(row: Row) -> str | None:
        value = row.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
            return f"field {name!r} must be an integer in {list(allowed)}, got {value!r}"
        return None

    return check


def _choice_field(name: str, allowed: tuple[str, ...]) -> Check:
    def check(row: Row) -> str | None:
        if row.get(name) not in allowed:
            return f"field {name!r} must be one of {list(allowed)}, got {row.get(name)!r}"
        return None

    return check


def _targets(name: str, *, exactly_one_true: bool) -> Check:
    def check(row: Row) -> str | None:
        block = row.get(name)
        if not isinstance(block, dict):
            return f"field {name!r} must be an object with 'choices' and 'labels', got {block!r}"
        choices, labels = block.get("choices"), block.get("labels")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            return f"field '{name}.choices' must be a list of at least 2 non-empty strings, got {choices!r}"
        if not isinstance(labels, list) or any(lab not in (0, 1) or isinstance(lab, bool) for lab in labels):
            return f"field '{name}.labels' must be a list of 0/1, got {labels!r}"
        if len(labels) != len(choices):
            return f"field '{name}.labels' has {len(labels)} labels for {len(choices)} choices"
        if exactly_one_true and labels.count(1) != 1:
            return f"field '{name}.labels' must mark exactly one choice 1, got {labels}"
        if not exactly_one_true and 1 not in labels:
            return f"field '{name}.labels' marks no choice true (1)"
        return None

    return check


# Field lists follow the hub datasets: truthfulqa/truthful_qa (multiple_choice), skt/kobest_v1,
# HAERAE-HUB/HAE_RAE_BENCH, HAERAE-HUB/KMMLU (only the fields lm_eval's templates read are required).
SCHEMAS: dict[str, list[Check]] = {
    "truthfulqa_mc": [
        _str_fields("question"),
        _targets("mc1_targets", exactly_one_true=True),
        _targets("mc2_targets", exactly_one_true=False),
    ],
    "kobest_boolq": [_str_fields("paragraph", "question"), _int_field("label", (0, 1))],
    "kobest_copa": [
        _str_fields("premise", "alternative_1", "alternative_2"),
        _choice_field("question", ("원인", "결과")),
        _int_field("label", (0, 1)),
    ],
    "kobest_hellaswag": [
        _str_fields("context", "ending_1", "ending_2", "ending_3", "ending_4"),
        _int_field("label", range(4)),
    ],
    "kobest_sentineg": [_str_fields("sentence"), _int_field("label", (0, 1))],
    "kobest_wic": [_str_fields("word", "context_1", "context_2"), _int_field("label", (0, 1))],
    "haerae": [_str_fields("query"), _choice_field("answer", ("(A)", "(B)", "(C)", "(D)", "(E)"))],
    "kmmlu": [_str_fields("question", "A", "B", "C", "D"), _int_field("answer", range(1, 5))],
}


def validate_jsonl(path: Path, checks: list[Check]) -> int:
    """Checks every row of a JSON-lines file; returns the number of rows.

    Raises:
        ValueError: a row is not a JSON object or breaks a check (file, row and field named),
            or the file has no rows.
    """
    n_rows = 0
    for row_no, row in iter_jsonl(path):
        for check in checks:
            problem = check(row)
            if problem:
                raise ValueError(f"{path} line {row_no}: {problem}; fix the row to match the dataset's schema")
        n_rows += 1
    if n_rows == 0:
        raise ValueError(f"{path} has no rows; write one JSON object per line")
    return n_rows
