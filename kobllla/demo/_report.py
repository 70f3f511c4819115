"""The demo's report: what each stage did, how long, what changed (Markdown + PNG)."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from kobllla.demo._evaluate import EN_PPL, KO_PPL, KO_QA, MC2, MODELS, QA, Check
from kobllla.demo._pipeline import StageRecord

TRAINING = ("base", "instruct", "stage1", "stage3")
COLUMNS = [(MC2, "TruthfulQA-format MC2", True), (KO_PPL, "Korean held-out ppl", False),
           (EN_PPL, "English held-out ppl", False), (QA, "English Q/A answer loss", False),
           (KO_QA, "KoLIMA answer loss", False)]


def plot_losses(stages: dict[str, StageRecord], path: Path) -> None:
    """One panel per training stage: loss per optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TRAINING), figsize=(4 * len(TRAINING), 3.2))
    for ax, name in zip(axes, TRAINING, strict=True):
        losses = stages[name].info.get("losses", [])
        ax.plot([s for s, _ in losses], [v for _, v in losses], marker=".", linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_metrics(scores: dict[str, dict], path: Path) -> None:
    """One bar chart per metric, every model side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4.2 * len(COLUMNS), 3.4))
    labels = [label for label, _, _ in MODELS]
    for ax, (key, title, higher) in zip(axes, COLUMNS, strict=True):
        ax.bar(range(len(labels)), [scores[label][key] for label in labels], color="#4c72b0")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{title} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        if not higher and key not in (QA, KO_QA):
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float, key: str) -> str:
    return f"{value:.4f}" if key in (MC2, QA, KO_QA) else f"{value:,.1f}"


def metric_table(scores: dict[str, dict]) -> list[str]:
    """The seed's table shape: model rows, metric columns, deltas against each row's baseline."""
    lines = ["| Model | " + " | ".join(t for _, t, _ in COLUMNS) + " |", "|:---|" + ":---:|" * len(COLUMNS)]
    for label, name, baseline in MODELS:
        cells = []
        for key, _, _ in COLUMNS:
            value = scores[label][key]
            cell = _fmt(value, key)
            if baseline:
                cell += f" ({value - scores[baseline][key]:+.4g})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if label == "stage1":
            lines.append("|" + " |" * (len(COLUMNS) + 1))
    return lines


def _stage_lines(stages: dict[str, StageRecord]) -> list[str]:
    lines = ["| stage | what | wall s | steps | first -> last loss |", "|:---|:---|---:|---:|:---|"]
    for name, rec in stages.items():
        losses = rec.info.get("losses") or []
        loss = f"{losses[0][1]:.2f} -> {losses[-1][1]:.2f}" if losses else ""
        reused = " (reused)" if rec.reused else ""
        lines.append(f"| {name} | {rec.what}{reused} | {rec.wall_s:.1f} | {len(losses) or ''} | {loss} |")
    return lines


def _sample_lines(stages: dict[str, StageRecord]) -> list[str]:
    """The samples stage's rates per model, then each held-out question with every model's answer."""
    import json

    rec = stages.get("samples")
    if rec is None:
        return []
    where = Path(rec.outputs["samples"])
    lines = ["| model | answers in the expected language | Korean answers in jondaetmal | stopped at a stop token |",
             "|:---|:---:|:---:|:---:|"]
    for name, s in rec.info["summary"].items():
        lines.append(f"| {name} | {s['expected_lang']}/{s['answers']} | {s['jondaetmal']}/{s['korean_answers']} | "
                     f"{s['stopped']}/{s['answers']} |")
    records = [json.loads(line) for line in (where / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    for pid in dict.fromkeys(r["id"] for r in records):
        mine = [r for r in records if r["id"] == pid]
        lines += ["", f"**{pid}** ({mine[0]['expect_lang']} expected): {mine[0]['prompt']}", ""]
        for r in mine:
            text = " ".join(r["text"].split())
            text = text if len(text) <= 160 else text[:160] + " ..."
            stop = "<|eot_id|>" if r["stop_reason"] == "eos" else f"no stop in {r['new_tokens']} tokens"
            level = f", {r['speech_level'] or 'no final ending'}" if r["lang"] == "ko" else ""
            text = text.replace("|", "/") or "(empty)"
            lines.append(f"- {r['model']} [{r['lang'] or 'none'}{level}; {stop}]: {text}")
    lines += ["", f"Every answer in full, with token ids: `{where}/samples.md`, `samples.html`, `samples.jsonl`."]
    return lines


def write_report(out: Path, stages: dict[str, StageRecord], scores: dict[str, dict], checks: list[Check],
                 gate_passed: bool, gate_lines: list[str], total_s: float) -> Path:
    """Writes ``report.md``, ``losses.png`` and ``metrics.png`` into ``out``; returns the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    plot_losses(stages, out / "losses.png")
    plot_metrics(scores, out / "metrics.png")
    data = stages["data"].info
    md = [
        "# KoBLLa, offline, on a mini model",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · {os.cpu_count()} CPU cores · {platform.machine()} · "
        f"total {total_s:.0f} s. Every stage ran through the real tools: torchtune 0.6.1's stock recipes "
        "(`python -m tools.tune_cpu`, the CPU bridge), `python -m tools.chat_vector`, and lm-eval through "
        "`kobllla.evaluation`. The model is a random-init Llama 3 architecture with hidden size 64, 2 layers and "
        "Meta's real 128,256-token tokenizer, so the numbers show directions, not Llama-3-8B quality.",
        "",
        "## Did the method do what it predicts?",
        "",
        *[f"- **{'PASS' if c.passed else 'FAIL'}**: {c.claim}: {c.detail}." for c in checks],
        f"- **Regression gate {'PASS' if gate_passed else 'FAIL'}** (TruthfulQA-format MC2 may drop at most 0.01; "
        "details in [gate/report.md](gate/report.md)):",
        *[f"  - {line}" for line in gate_lines],
        "",
        "## Scores (the seed's table shape; deltas against Llama-3 base or Llama-3-Inst.)",
        "",
        *metric_table(scores),
        "",
        "MC2: our own TruthfulQA-format questions about the Python reference (lm-eval's `truthfulqa_mc2`, local data). "
        "Perplexities: held-out Korean (Constitution articles and bills never trained on) and held-out English "
        "(pydoc topics never trained on). Answer loss: nats per answer token (and the closing `<|eot_id|>`) in the "
        "Llama 3 chat format, on held-out English Q/A pairs and on held-out KoLIMA pairs (questions about Constitution "
        "articles "
        "no stage trained on).",
        "",
        "![metrics](metrics.png)",
        "",
        "## Samples (answers to held-out questions sampled at temperature 1, the chat template for every model)",
        "",
        *_sample_lines(stages),
        "",
        "## What each stage did",
        "",
        *_stage_lines(stages),
        "",
        f"Data ({data.get('en_train_docs')} English and {data.get('ko_train_docs')} Korean training documents; "
        "the base "
        f"saw the English ones and {data.get('ko_in_base_docs')} of the Korean ones: {data.get('base_en_tokens', 0):,} "
        f"English + {data.get('base_ko_tokens', 0):,} Korean tokens, {data.get('base_ko_share', 0):.1%} Korean; "
        f"{data.get('en_qa_train')} English Q/A pairs, {data.get('kolima_train')} KoLIMA pairs from the Constitution "
        f"({data.get('kolima_heldout')} more held out), "
        f"{data.get('bilima_rows')} hand-written parallel BiLIMA rows used as en_ko and ko_en, "
        f"{data.get('truthfulqa_questions')} MC2 questions). English replay: stage 1 "
        f"{data.get('stage1_en_replay_share', 0):.0%} of its tokens (the opening of every English training document), "
        f"stage 3 {data.get('stage3_en_replay_share', 0):.0%} "
        "(the instruct stage's Q/A pairs, listed beside KoLIMA and BiLIMA). All "
        "from installed packages (pydoc_data, konlpy, kobllla).",
        "",
        "![losses](losses.png)",
        "",
        "## Commands",
        "",
        *[f"- {name}: `{' '.join(map(str, cmd))}`" for name, rec in stages.items() for cmd in rec.commands],
        "",
    ]
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(md), encoding="utf-8")
    tmp.replace(path)
    return path
