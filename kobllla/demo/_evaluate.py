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
KO_PPL, EN_PPL, MC2 = "heldout_ko/token_ppl", "heldout_en/token_ppl", "truthfulqa_mc2/acc"
QA, KO_QA = "qa/answer_nll", "kolima/answer_nll"
VOCAB = 128_256  # a uniform guess over Llama 3's vocabulary has this perplexity
KO_MARGIN = 0.5  # stage 1 must bring Korean held-out perplexity to at most half the base's
EN_TOLERANCE = 1.05  # ... while English held-out perplexity stays within +5 % of the base's
RECOVERY = 0.5  # the chat vector must recover at least half of the stage-1 -> instruct answer-loss gap
KOLIMA_GAIN = 0.9  # stage 3 must bring held-out KoLIMA answer loss to at most 90 % of the chat-vector model's


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
        pairs, ko_pairs = read_pairs(data.en_qa_heldout), read_pairs(data.kolima_heldout)
        for label, _, _ in MODELS:
            record = evaluate_model(
                checkpoints[label], label=label, tasks=["truthfulqa_mc2"], data_dir=data.eval_dir,
                heldout={"ko": data.ko_heldout, "en": data.en_heldout}, device="cpu", scorer="shared_prefix",
                max_length=1024, results_dir=out,
            )
            qa, ko_qa = answer_loss(checkpoints[label], pairs), answer_loss(checkpoints[label], ko_pairs)
            rec.info[label] = {
                "record": record["path"], KO_PPL: _metric(record, KO_PPL), EN_PPL: _metric(record, EN_PPL),
                MC2: _metric(record, MC2), QA: qa["answer_nll"], "qa_tokens": qa["tokens"],
                KO_QA: ko_qa["answer_nll"], "kolima_tokens": ko_qa["tokens"],
            }

    return chain.stage("eval", "Evaluate every model on the same held-out data", body)


def method_checks(scores: dict[str, dict]) -> list[Check]:
    """The method's predictions, each with the numbers behind it."""
    b, s1, ins, cv, s3 = (scores[k] for k in ("base", "stage1", "instruct", "chat_vector", "stage3"))
    gap, closed = s1[QA] - ins[QA], s1[QA] - cv[QA]
    recovered = closed / gap if gap > 0 else float("nan")
    return [
        Check(
            f"The English-first base already models Korean better than a uniform guess (ppl < {VOCAB:,})",
            b[KO_PPL] < VOCAB,
            f"base Korean held-out ppl {b[KO_PPL]:,.1f}",
        ),
        Check(
            f"Stage 1 brings Korean held-out perplexity to at most {KO_MARGIN:.0%} of the base's",
            s1[KO_PPL] <= KO_MARGIN * b[KO_PPL],
            f"{b[KO_PPL]:,.1f} -> {s1[KO_PPL]:,.1f} ({s1[KO_PPL] / b[KO_PPL]:.1%} of the base)",
        ),
        Check(
            f"Stage 1 keeps English held-out perplexity within +{EN_TOLERANCE - 1:.0%} of the base's",
            s1[EN_PPL] <= EN_TOLERANCE * b[EN_PPL],
            f"{b[EN_PPL]:,.1f} -> {s1[EN_PPL]:,.1f} ({s1[EN_PPL] / b[EN_PPL] - 1:+.1%})",
        ),
        Check(
            f"The chat vector recovers at least {RECOVERY:.0%} of the stage-1 -> instruct gap in held-out "
            "English answer loss",
            gap > 0 and recovered >= RECOVERY,
            f"stage 1 {s1[QA]:.3f}, stage 1 + chat vector {cv[QA]:.3f}, instruct {ins[QA]:.3f} nats/token: "
            f"{recovered:.0%} of the gap",
        ),
        Check(
            f"Stage 3 lowers held-out KoLIMA answer loss by at least {1 - KOLIMA_GAIN:.0%} against the "
            "chat-vector model",
            s3[KO_QA] <= KOLIMA_GAIN * cv[KO_QA],
            f"{cv[KO_QA]:.3f} -> {s3[KO_QA]:.3f} nats/token ({s3[KO_QA] / cv[KO_QA] - 1:+.1%})",
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


SAMPLE_PROMPTS = 3  # held-out questions per language in the side-by-side samples
SAMPLE_TOKENS = 160  # room for a held-out answer (the training answers have 20-90 tokens) and its <|eot_id|>
# Sampled from each model's own distribution (temperature 1, seeded per prompt): greedy decoding of a
# 64-wide model repeats one whitespace token forever, which shows nothing about what a stage changed.
SAMPLE_OPTIONS = {"max_new_tokens": SAMPLE_TOKENS, "temperature": 1.0, "top_p": 1.0, "batch_size": 6}


def sample_rows(data: DemoData) -> list[dict]:
    """Held-out Korean (KoLIMA) and English (pydoc Q/A) questions as ``kobllla.generation`` prompt rows."""
    rows = []
    for kind, path in (("ko", data.kolima_heldout), ("en", data.en_qa_heldout)):
        for i, (question, _) in enumerate(read_pairs(path)[:SAMPLE_PROMPTS]):
            rows.append({"id": f"{kind}-{i + 1}", "kind": kind, "messages": [{"role": "user", "content": question}]})
    return rows


def samples_stage(chain: Chain, checkpoints: dict[str, Path], data: DemoData, *, seed: int) -> StageRecord:
    """Every model answers the same held-out questions (sampled): ``kobllla.evaluation.write_samples``."""
    from kobllla.evaluation import write_samples
    from kobllla.generation import GenerationOptions

    def body(out: Path, rec: StageRecord) -> None:
        summary = write_samples({label: checkpoints[label] for label, _, _ in MODELS}, sample_rows(data),
                                GenerationOptions(**SAMPLE_OPTIONS, seed=seed), out / "samples",
                                progress=False)
        rec.info["summary"] = summary["models"]
        rec.outputs["samples"] = str(out / "samples")

    return chain.stage("samples", "Side-by-side answers to held-out questions (sampled, temperature 1)", body)
