"""What quantization costs, per language: perplexity, KL and top-1 agreement of each GGUF vs the HF model.

For every held-out language (``ko``, ``en``, ...) the documents are tokenized once with the model's
HF tokenizer (llama.cpp's tokenization of the same text is checked to be identical) and scored in
windows of ``ctx`` tokens that share one token (each token after the first predicted once). On the
same ids, per GGUF file:

- perplexity ``exp(mean NLL)`` of the held-out text, and its change from the unquantized model;
- mean KL divergence ``KL(p_hf || p_gguf)`` of the next-token distributions (nats/token);
- top-1 agreement: how often the GGUF's most likely next token is the HF model's.

The reference is transformers in float32 on the directory the GGUFs were exported from. The
answer to "how much more does Q4_K_M cost Korean than English?" is the ratio of those numbers
between languages, in ``report.md`` (+ ``report.png``, ``report.json``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kobllla.atomic import atomic_output_dir, refuse_output_over_inputs, write_json
from kobllla.gguf.compare import NextTokenStats, hf_logits, llama_cpp_logits, llama_cpp_tokenize, open_llama
from kobllla.gguf.export import MANIFEST

REFERENCE = "hf-fp32"


@dataclass(frozen=True)
class Row:
    """One (file, language) result."""

    quant: str
    lang: str
    bytes: int
    tokens: int
    perplexity: float
    perplexity_change: float  # perplexity / reference perplexity - 1
    mean_kl: float
    top1_agreement: float


def gguf_files(gguf: Path) -> dict[str, Path]:
    """``{quant: file}`` of an export directory (its manifest) or of one ``.gguf`` file.

    Raises:
        FileNotFoundError: no such path, or a directory without an export manifest.
    """
    gguf = Path(gguf)
    if gguf.is_file() and gguf.suffix == ".gguf":
        return {gguf.stem.rsplit("-", 1)[-1]: gguf}
    manifest = gguf / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"--gguf {gguf}: no {MANIFEST}; pass the --out directory of tools.export_gguf "
                                "or a .gguf file")
    outputs = json.loads(manifest.read_text(encoding="utf-8"))["outputs"]
    return {facts["quant"]: gguf / name for name, facts in outputs.items()}


def windows(ids: list[int], ctx: int) -> list[list[int]]:
    """Windows of at most ``ctx`` ids, consecutive ones sharing one id: every id after the first is a target once."""
    step = ctx - 1
    return [ids[i:i + ctx] for i in range(0, max(len(ids) - 1, 1), step) if len(ids[i:i + ctx]) >= 2]


def heldout_windows(tokenizer, docs: list[str], *, ctx: int, max_tokens: int) -> list[list[int]]:
    """Each document with BOS, cut into windows, until ``max_tokens`` targets."""
    out, n = [], 0
    for doc in docs:
        for w in windows(tokenizer(doc).input_ids, ctx):
            if n >= max_tokens:
                return out
            w = w[: max_tokens - n + 1]
            out.append(w)
            n += len(w) - 1
    return out


def _reference_logits(model_dir: Path, texts: dict[str, list[list[int]]], scratch: Path,
                      device: str) -> dict[str, list[np.ndarray]]:
    """The HF model's float32 logits per window, kept in memory-mapped scratch files."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    out: dict[str, list[np.ndarray]] = {}
    for lang, wins in texts.items():
        out[lang] = []
        for i, w in enumerate(tqdm(wins, desc=f"transformers {lang}", unit="window", leave=False)):
            logits = hf_logits(model, w)
            mm = np.lib.format.open_memmap(scratch / f"{lang}-{i}.npy", mode="w+", dtype=np.float32,
                                           shape=logits.shape)
            mm[:] = logits
            out[lang].append(mm)
    del model
    return out


def _check_tokenization(path: Path, tokenizer, docs: dict[str, list[str]]) -> None:
    with open_llama(path, vocab_only=True) as llm:
        for lang, texts in docs.items():
            hf_ids = tokenizer(texts[0]).input_ids
            ids = llama_cpp_tokenize(llm, texts[0], add_bos=hf_ids[:1] == [tokenizer.bos_token_id])
            if ids != hf_ids:
                first = next(i for i, (a, b) in enumerate(zip(ids + [None], hf_ids + [None], strict=False)) if a != b)
                raise ValueError(f"{path.name}: llama.cpp tokenizes the first {lang} document differently from the "
                                 f"HF tokenizer (first difference at token {first}); the GGUF's vocabulary or "
                                 "pre-tokenizer does not match --model")


def _score_file(path: Path, quant: str, texts: dict[str, list[list[int]]], refs: dict[str, list[np.ndarray]],
                ref_ppl: dict[str, float], *, ctx: int, threads: int | None) -> list[Row]:
    rows = []
    with open_llama(path, n_ctx=ctx, threads=threads) as llm:
        for lang, wins in texts.items():
            stats = NextTokenStats()
            for w, ref in zip(wins, refs[lang], strict=True):
                logits = llama_cpp_logits(llm, w)
                stats.add(logits[:-1], np.asarray(w[1:]), np.asarray(ref[:-1]))
            rows.append(Row(quant, lang, path.stat().st_size, stats.n, stats.perplexity,
                            stats.perplexity / ref_ppl[lang] - 1, stats.mean_kl, stats.top1_agreement))
    return rows


def quant_report(
    *,
    model: Path,
    gguf: list[Path],
    heldout: dict[str, Path | list[str]],
    out: Path,
    ctx: int = 256,
    max_tokens: int = 2048,
    threads: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> dict:
    """Scores every GGUF against the HF model on each language's held-out text; writes the report.

    Args:
        model (Path): the HF dir the GGUFs were exported from (the float32 reference).
        gguf (list[Path]): export directories (``tools.export_gguf --out``) and/or ``.gguf`` files.
        heldout (dict[str, Path | list[str]]): language -> ``.txt`` (blank-line separated) / ``.jsonl`` / texts.
        out (Path): report directory (``report.md``, ``report.png``, ``report.json``; written atomically).
        ctx (int): window length in tokens.
        max_tokens (int): scored tokens per language at most.
        threads (int | None): llama.cpp threads (default: all cores).
        device (str): where transformers runs the reference.
        overwrite (bool): replace an existing ``out``.

    Returns:
        dict: what ``report.json`` holds.

    Raises:
        FileNotFoundError: missing model, GGUF or held-out file. ValueError: bad held-out text,
        a GGUF whose tokenization differs from the model's tokenizer.
    """
    from transformers import AutoTokenizer

    from kobllla.evaluation import read_heldout
    from kobllla.model_dir import check_loadable_files

    start = time.perf_counter()
    check_loadable_files(Path(model))
    if not heldout:
        raise ValueError("no --heldout LANG=FILE given; pass e.g. --heldout ko=ko.txt --heldout en=en.txt")
    if ctx < 2 or max_tokens < 1:
        raise ValueError(f"--ctx must be >= 2 and --max-tokens >= 1 (got {ctx}, {max_tokens})")
    files: dict[str, Path] = {}
    for g in gguf:
        files.update(gguf_files(g))
    if not files:
        raise FileNotFoundError("no GGUF files given; pass --gguf OUTDIR (an export) or --gguf FILE.gguf")
    docs = {lang: read_heldout(src) for lang, src in heldout.items()}
    refuse_output_over_inputs(out, [Path(model), *files.values()])
    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = {lang: heldout_windows(tokenizer, d, ctx=ctx, max_tokens=max_tokens) for lang, d in docs.items()}
    for path in files.values():
        _check_tokenization(path, tokenizer, docs)
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        scratch = tmp / ".scratch"
        scratch.mkdir()
        refs = _reference_logits(Path(model), texts, scratch, device)
        rows, ref_ppl = _reference_rows(Path(model), texts, refs)
        for quant, path in tqdm(files.items(), desc="llama.cpp", unit="file"):
            rows += _score_file(path, quant, texts, refs, ref_ppl, ctx=ctx, threads=threads)
        del refs
        import shutil

        shutil.rmtree(scratch)
        result = {
            "made_by": "kobllla.gguf.quant_report", "model": str(Path(model).resolve()),
            "files": {q: str(p.resolve()) for q, p in files.items()},
            "heldout": {lang: str(src) if not isinstance(src, list) else f"{len(src)} texts"
                        for lang, src in heldout.items()},
            "ctx": ctx, "max_tokens": max_tokens, "vocab_size": len(tokenizer),
            "rows": [asdict(r) for r in rows], "seconds": round(time.perf_counter() - start, 1),
        }
        write_json(tmp / "report.json", result)
        render_chart(rows, tmp / "report.png")
        (tmp / "report.md").write_text(render_markdown(result, rows), encoding="utf-8")
    return result


def _reference_rows(model: Path, texts: dict[str, list[list[int]]],
                    refs: dict[str, list[np.ndarray]]) -> tuple[list[Row], dict[str, float]]:
    size = sum(p.stat().st_size for p in model.iterdir() if p.suffix in (".safetensors", ".bin"))
    rows, ppl = [], {}
    for lang, wins in texts.items():
        stats = NextTokenStats()
        for w, ref in zip(wins, refs[lang], strict=True):
            stats.add(np.asarray(ref[:-1]), np.asarray(w[1:]))
        ppl[lang] = stats.perplexity
        rows.append(Row(REFERENCE, lang, size, stats.n, stats.perplexity, 0.0, 0.0, 1.0))
    return rows, ppl


def _by(rows: list[Row]) -> dict[str, dict[str, Row]]:
    table: dict[str, dict[str, Row]] = {}
    for r in rows:
        table.setdefault(r.quant, {})[r.lang] = r
    return table


def render_markdown(result: dict, rows: list[Row]) -> str:
    """``report.md``: the table, the per-language answer, and what the numbers can and cannot say."""
    table = _by(rows)
    langs = list(next(iter(table.values())))
    head = ["file", "MiB"] + [f"{m} {lang}" for lang in langs for m in ("ppl", "Δppl", "KL", "top-1")]
    lines = ["# What quantization costs, per language", "",
             f"Reference: transformers float32 on `{result['model']}`. Windows of {result['ctx']} tokens, at most "
             f"{result['max_tokens']} scored tokens per language ("
             + ", ".join(f"{lang}: {r.tokens}" for lang, r in table[REFERENCE].items()) + ").",
             "KL: mean KL(p_hf || p_gguf) of the next-token distribution, nats/token. top-1: how often the "
             "GGUF's most likely next token is the reference's.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for quant, by_lang in table.items():
        cells = [quant, f"{next(iter(by_lang.values())).bytes / 2**20:,.1f}"]
        for lang in langs:
            r = by_lang[lang]
            cells += [f"{r.perplexity:,.3f}", f"{100 * r.perplexity_change:+.2f} %", f"{r.mean_kl:.3g}",
                      f"{100 * r.top1_agreement:.1f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Korean vs English", ""] + _language_lines(table, langs) + [""] + _caveats(result, table)
    lines += ["", "![perplexity change and KL per quant and language](report.png)", ""]
    return "\n".join(lines)


def _language_lines(table: dict[str, dict[str, Row]], langs: list[str]) -> list[str]:
    if not {"ko", "en"} <= set(langs):
        return [f"(needs held-out `ko` and `en` text; got {', '.join(langs)})"]
    out = []
    for quant, by_lang in table.items():
        if quant == REFERENCE:
            continue
        ko, en = by_lang["ko"], by_lang["en"]
        ratio = ko.mean_kl / en.mean_kl if en.mean_kl > 0 else math.inf
        out.append(f"- **{quant}**: Korean perplexity {100 * ko.perplexity_change:+.2f} %, English "
                   f"{100 * en.perplexity_change:+.2f} %; KL {ko.mean_kl:.3g} vs {en.mean_kl:.3g} nats/token "
                   f"(Korean {ratio:.2f}x English); top-1 {100 * ko.top1_agreement:.1f} % vs "
                   f"{100 * en.top1_agreement:.1f} %.")
    return out


def _caveats(result: dict, table: dict[str, dict[str, Row]]) -> list[str]:
    vocab = result["vocab_size"]
    ref = table[REFERENCE]
    small = [lang for lang, r in ref.items() if r.tokens < 1000]
    notes = []
    if any(r.perplexity > vocab / 4 for r in ref.values()):
        ppl = ", ".join(f"{k} {r.perplexity:,.0f}" for k, r in ref.items())
        notes.append(f"- The reference model's perplexity ({ppl}) "
                     f"is near or above the vocabulary size ({vocab:,}): it has (near-)random weights and predicts "
                     "nothing. KL and top-1 still measure how far llama.cpp's quantized model is from the "
                     "unquantized one, but which language suffers more says nothing about a trained model.")
    if small:
        notes.append(f"- Few scored tokens for {', '.join(small)} (< 1,000): differences below a few tenths of a "
                     "percent are noise.")
    return notes


def render_chart(rows: list[Row], path: Path) -> None:
    """``report.png``: perplexity change (%) and mean KL per quant, one bar per language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = {q: by for q, by in _by(rows).items() if q != REFERENCE}
    langs = sorted({r.lang for r in rows})
    quants = list(table)
    x = np.arange(len(quants))
    width = 0.8 / max(len(langs), 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (("perplexity change vs float32 (%)", lambda r: 100 * r.perplexity_change),
              ("mean KL(hf || gguf), nats/token", lambda r: r.mean_kl))
    for ax, (title, value) in zip(axes, panels, strict=True):
        for i, lang in enumerate(langs):
            ax.bar(x + i * width, [value(table[q][lang]) for q in quants], width, label=lang)
        ax.set_xticks(x + width * (len(langs) - 1) / 2, quants)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
