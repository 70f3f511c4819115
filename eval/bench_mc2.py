"""Write TruthfulQA-MC2-shaped timing data (817 questions, ~7.6 answers each) and the lm_eval task for it.

    python -m eval.bench_mc2 --out /tmp/bench      # -> /tmp/bench/data/... and /tmp/bench/tasks/truthfulqa_mc2.yaml
    lm_eval --model hf --model_args pretrained=MODEL,dtype=bfloat16 --tasks truthfulqa_mc2 \
        --include_path /tmp/bench/tasks --batch_size auto --device cuda:0          # plain lm_eval
    python -m eval.run --model bench=MODEL --task truthfulqa_mc2 --data-dir /tmp/bench/data \
        --device cuda --scorer shared_prefix --results-dir /tmp/bench/results      # ours

The text is random words (timing only; scores of random text mean nothing). Sizes follow the
real validation split: 817 questions, 2-13 answers (mean ~7.6), ~9-word questions, ~10-word answers.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

from kobllla.cli import make_parser, run
from kobllla.evaluation._tasks import TASKS, data_source, write_task_yamls

_WORDS = (
    "the a of to in is that it was for on are as with his they at be this from have or by one had not but "
    "what all were when we there can an your which their said if do will each about how up out them then "
    "she many some so these would other into has more her two like him see time could no make than first "
    "been its who now people my made over did down only way find use may water long little very after words "
    "called just where most know get through back much before go good new write our used me man too any day "
    "same right look think also around another came come work three word must because does part even place"
).split()


def _sentence(rng: random.Random, n_min: int, n_max: int, end: str) -> str:
    words = rng.choices(_WORDS, k=rng.randint(n_min, n_max))
    return " ".join(words).capitalize() + end


def make_rows(n_questions: int = 817, seed: int = 0) -> list[dict]:
    """Rows in the truthful_qa multiple_choice schema with TruthfulQA's sizes."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_questions):
        n_answers = rng.randint(3, 12) + (rng.random() < 0.1)  # mean 7.6, as the real split
        n_true = rng.randint(1, n_answers - 1)
        n_false = n_answers - n_true
        true = [_sentence(rng, 5, 15, ".") for _ in range(n_true)]
        false = [_sentence(rng, 5, 15, ".") for _ in range(n_false)]
        rows.append({
            "question": _sentence(rng, 6, 12, "?"),
            "mc1_targets": {"choices": [true[0], *false], "labels": [1] + [0] * n_false},
            "mc2_targets": {"choices": true + false, "labels": [1] * n_true + [0] * n_false},
        })
    return rows


def write_bench(out: Path, *, n_questions: int = 817, seed: int = 0) -> dict:
    """Writes the data under ``out/data`` and the lm_eval include dir ``out/tasks``; returns counts."""
    spec = TASKS["truthfulqa_mc2"]
    rows = make_rows(n_questions, seed)
    path = spec.local_file(out / "data", "validation")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    # plain lm_eval's task (the peer): upstream's file included as is, only the data pointed here
    plain = dataclasses.replace(spec, hooks=())
    write_task_yamls([plain], {spec.name: data_source(spec, out / "data", None)}, out / "tasks")
    answers = sum(len(r["mc2_targets"]["choices"]) for r in rows)
    return {"questions": len(rows), "answers": answers, "answers_per_question": answers / len(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m eval.bench_mc2")
    parser.add_argument("--out", type=Path, required=True, help="folder for data/ and tasks/")
    parser.add_argument("--questions", type=int, default=817, help="questions to write (default 817, as the split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random words (default 0)")
    args = parser.parse_args(argv)

    def work() -> None:
        if args.questions < 1:
            raise ValueError(f"--questions must be at least 1, got {args.questions}")
        counts = write_bench(args.out, n_questions=args.questions, seed=args.seed)
        print(f"wrote {args.out}: {counts['questions']} questions, {counts['answers']} answers "
              f"({counts['answers_per_question']:.2f} per question)")

    return run(work)


if __name__ == "__main__":
    sys.exit(main())
