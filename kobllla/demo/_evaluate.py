"""The demo's evaluation stage: every model on the same held-out data, then the method's checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kobllla.demo._data import DemoData
from kobllla.demo._pipeline import Chain, StageRecord
from kobllla.demo._qa import answer_loss, read_pairs

# Rows of the seed's table: label, the seed's name for it, and the model it is compared with.
MODELS = [
    ("base", "Llama-3 (base)", None),
    ("stage1", "KoBLLa (stage 1)", "base"),
    ("instruct", "Llama-3-Inst.", None),
    ("chat_vector", "KoBLLa + ChatVec.", "instruct"),
    ("stage3", "KoBLLa-Inst. (stage 3)", "instruct"),
]
KO_PPL, EN_PPL, MC2, QA = "heldout_ko/token_ppl", "heldout_en/token_ppl", "truthfulqa_mc2/acc", "qa/answer_nll"
KO_MARGIN = 0.8  # stage 1 must bring Korean held-out perplexity below 80 % of the base's
EN_TOLERANCE = 1.10  # ... while English held-out perplexity stays within +10 % of the base's


@dataclass(frozen=True)
class Check:
    """One prediction of the method, measured."""

    claim: str
    passed: bool
    detail: str


def _metric(record: dict, key: str) -> float:
    task, metric = key.split("/")
    return record["tasks"][task]["metrics"][metric]["value"]


def evaluate_models(chain: Chain, checkpoints: dict[str, Path], data: DemoData) -> StageRecord:
    """Scores each checkpoint once (lm_eval MC2, held-out perplexity, Q/A answer loss)."""
    from kobllla.evaluation import evaluate_model

    def body(out: Path, rec: StageRecord) -> None:
        pairs = read_pairs(data.en_qa_heldout)
        for label, _, _ in MODELS:
            record = evaluate_model(
                checkpoints[label], label=label, tasks=["truthfulqa_mc2"], data_dir=data.eval_dir,
                heldout={"ko": data.ko_heldout, "en": data.en_heldout}, device="cpu", scorer="shared_prefix",
                max_length=1024, results_dir=out,
            )
            qa = answer_loss(checkpoints[label], pairs)
            rec.info[label] = {
                "record": record["path"], KO_PPL: _metric(record, KO_PPL), EN_PPL: _metric(record, EN_PPL),
                MC2: _metric(record, MC2), QA: qa["answer_nll"], "qa_tokens": qa["tokens"],
            }

    return chain.stage("eval", "Evaluate every model on the same held-out data", body)


def method_checks(scores: dict[str, dict]) -> list[Check]:
    """The three predictions of the method, each with the numbers behind it."""
    b, s1, cv = scores["base"], scores["stage1"], scores["chat_vector"]
    return [
        Check(
            f"Stage 1 lowers Korean held-out perplexity below {KO_MARGIN:.0%} of the base's",
            s1[KO_PPL] < KO_MARGIN * b[KO_PPL],
            f"{b[KO_PPL]:.1f} -> {s1[KO_PPL]:.1f} ({s1[KO_PPL] / b[KO_PPL]:.1%} of the base)",
        ),
        Check(
            f"Stage 1 keeps English held-out perplexity within +{EN_TOLERANCE - 1:.0%} of the base's",
            s1[EN_PPL] <= EN_TOLERANCE * b[EN_PPL],
            f"{b[EN_PPL]:.1f} -> {s1[EN_PPL]:.1f} ({s1[EN_PPL] / b[EN_PPL] - 1:+.1%})",
        ),
        Check(
            "The chat vector makes stage 1 answer held-out English questions better (lower answer loss)",
            cv[QA] < s1[QA],
            f"stage 1 {s1[QA]:.3f} -> stage 1 + chat vector {cv[QA]:.3f} nats/token",
        ),
    ]


def gate(run_dir: Path, out: Path) -> tuple[bool, list[str]]:
    """kobllla.evaluation's regression gate (MC2 -0.01) over the stored runs; writes its report.

    Returns whether every gate passed and one line per gate.
    """
    from kobllla.evaluation import compare_runs, load_runs, write_report

    runs = load_runs([run_dir / "eval"])
    pairs = [(label, baseline) for label, _, baseline in MODELS if baseline]
    comparison = compare_runs(runs, pairs=pairs)
    write_report(comparison, out, runs)
    lines = [
        f"{'PASS' if g.passed else 'FAIL'} {g.metric}: {g.candidate} {g.candidate_value:.4f} vs {g.baseline} "
        f"{g.baseline_value:.4f} (delta {g.delta:+.4f}, tolerance {g.tolerance})"
        for g in comparison.gates
    ]
    return comparison.passed, lines
