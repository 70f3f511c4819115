"""Benchmark of pre-tokenized corpora: tokenization throughput and dataset start-up time / RSS.

    .venv/bin/python bench/pretokenize_bench.py --tokens 50000000 --workdir /tmp/ptbench

One run, same generated corpus for every contender:
1. Writes a CSV of real Korean text (konlpy's Constitution + bills, 147 documents, ~38k Llama 3
   tokens) repeated until it holds ``--tokens`` tokens.
2. ``kobllla.pretokenized.pretokenize`` on it with 1 worker (first tenth of the rows) and every
   core (all rows): tokens/s and peak RSS.
3. Dataset start-up at max_seq_len 2048, packed, each in a fresh process: time from the call to
   the first two samples (``ds[0]``, ``ds[len // 2]``) and peak RSS (``VmHWM``, imports
   included; the after-import RSS is given too) for
   ``kobllla.datasets.pretokenized_dataset``, ``kobllla.datasets.kowikitext_dataset`` and
   torchtune's ``text_completion_dataset(packed=True)`` (HF ``datasets`` csv loader; its arrow
   cache is built in an untimed warm-up process first, so only tokenizing + packing is timed).
4. ``pretokenized_dataset`` start-up on a synthetic stream of ``--synthetic-tokens`` tokens in
   ``--synthetic-docs`` documents (random ids and lengths, the manifest of step 2 adapted):
   the "any corpus size" claim at and beyond Korean Wikipedia's size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_SEQ_LEN = 2048


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """This process's peak RSS. Not ru_maxrss: Linux carries that across exec from the parent."""
    return _status_mb("VmHWM")


# ----------------------------------------------------------------------------- children


def child_startup(kind: str, path: str) -> dict:
    """Runs in a fresh process: import, then build the dataset and read two samples."""
    from torchtune.models.llama3 import llama3_tokenizer

    from kobllla.assets import llama3_tokenizer_model_path

    if kind == "pretokenized":
        from kobllla.datasets._pretokenized import pretokenized_dataset
    elif kind == "kowikitext":
        from kobllla.datasets import kowikitext_dataset
    else:
        from torchtune.datasets import text_completion_dataset
    tok = llama3_tokenizer(str(llama3_tokenizer_model_path()), max_seq_len=MAX_SEQ_LEN)
    base = rss_mb()
    start = time.perf_counter()
    if kind == "pretokenized":
        ds = pretokenized_dataset(tok, path=path, max_seq_len=MAX_SEQ_LEN, packed=True)
    elif kind == "kowikitext":
        ds = kowikitext_dataset(tok, source="csv", data_files=path, max_seq_len=MAX_SEQ_LEN, packed=True)
    elif kind == "torchtune":
        ds = text_completion_dataset(tok, source="csv", data_files=path, column="text", packed=True, split="train")
    elif kind == "warm":  # build HF datasets' arrow cache for the csv, untimed
        from datasets import load_dataset

        load_dataset("csv", data_files=path, split="train")
        return {}
    built = time.perf_counter() - start
    first = ds[0], ds[len(ds) // 2]
    total = time.perf_counter() - start
    assert all(len(s["tokens"]) == MAX_SEQ_LEN for s in first)
    return {"kind": kind, "packs": len(ds), "build_s": round(built, 2), "startup_s": round(total, 2),
            "rss_after_import_mb": round(base), "peak_rss_mb": round(peak_mb()), "rss_after_mb": round(rss_mb())}


def child_pretokenize(csv: str, out: str, workers: int, max_rows: int | None) -> dict:
    from kobllla.pretokenized import pretokenize

    src = csv
    if max_rows:  # the first max_rows rows, as their own csv
        src = str(Path(out).with_suffix(".head.csv"))
        with open(csv, encoding="utf-8") as f, open(src, "w", encoding="utf-8") as g:
            import csv as csvmod

            reader, writer = csvmod.reader(f), csvmod.writer(g)
            for i, row in enumerate(reader):
                if i > max_rows:
                    break
                writer.writerow(row)
    cpu0 = _cpu_s()
    start = time.perf_counter()
    m = pretokenize(source="csv", data_files=src, out_dir=out, tokenizer_path=_tokenizer_path(), workers=workers,
                    overwrite=True, progress=False)
    elapsed = time.perf_counter() - start
    cpu = _cpu_s() - cpu0  # this process + its (joined) workers, user + sys
    return {"workers": workers, "documents": m["counts"]["documents"], "tokens": m["counts"]["tokens"],
            "elapsed_s": round(elapsed, 1), "tokens_per_s": round(m["counts"]["tokens"] / elapsed),
            "cpu_s": round(cpu, 1), "tokens_per_cpu_s": round(m["counts"]["tokens"] / cpu),
            "peak_rss_main_mb": round(peak_mb())}


def _cpu_s() -> float:
    import resource

    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _tokenizer_path() -> Path:
    from kobllla.assets import llama3_tokenizer_model_path

    return llama3_tokenizer_model_path()


def run_child(*args: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- corpora


def write_corpus(path: Path, tokens: int) -> tuple[int, int]:
    """konlpy's Korean documents repeated to at least ``tokens`` Llama 3 tokens (BOS/EOS included)."""
    from torchtune.models.llama3 import llama3_tokenizer

    from kobllla.corpora import korean_documents, write_text_csv

    docs = korean_documents()
    tok = llama3_tokenizer(str(_tokenizer_path()))
    per_pass = sum(len(tok.encode(d.text, add_bos=True, add_eos=True)) for d in docs)
    repeat = -(-tokens // per_pass)
    if not path.exists():
        write_text_csv(path, docs, repeat=repeat)
    return repeat * len(docs), repeat * per_pass


def write_synthetic(real: Path, out: Path, docs: int, tokens: int) -> None:
    """A token stream of ``tokens`` random ids in ``docs`` documents, with ``real``'s manifest adapted."""
    import numpy as np

    from kobllla import pretokenized as pt

    if (out / pt.MANIFEST).is_file():
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 2 * tokens // docs - 2, size=docs, dtype=np.int64)
    lengths[-1] += tokens - int(lengths.sum())
    if lengths[-1] < 2:
        raise ValueError(f"cannot spread {tokens} tokens over {docs} documents this way; use fewer documents")
    ends = np.cumsum(lengths)
    ends.astype("<i8").tofile(out / pt.ENDS_FILE)
    with open(out / pt.TOKENS_FILE, "wb") as f:
        for lo in range(0, tokens, 1 << 26):
            rng.integers(0, 128000, size=min(1 << 26, tokens - lo), dtype=np.uint32).tofile(f)
    manifest = json.loads((real / pt.MANIFEST).read_text())
    manifest["counts"] = {"rows": docs, "documents": docs, "skipped_empty": 0, "tokens": tokens}
    manifest["files"]["tokens"]["count"], manifest["files"]["doc_ends"]["count"] = tokens, docs
    manifest["source"] = {"synthetic": "random ids, uniform random document lengths"}
    (out / pt.MANIFEST).write_text(json.dumps(manifest, indent=2))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=50_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ptbench"))
    parser.add_argument("--synthetic-docs", type=int, default=2_300_000)
    parser.add_argument("--synthetic-tokens", type=int, default=1_200_000_000)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "pretokenize":
            out = child_pretokenize(rest[0], rest[1], int(rest[2]), int(rest[3]) or None)
        else:
            out = child_startup(kind, rest[0])
        print(json.dumps(out))
        return 0
    return run_all(args)


def run_all(args: argparse.Namespace) -> int:
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    csv = w / "ko_repeated.csv"
    docs, tokens = write_corpus(csv, args.tokens)
    print(f"corpus: {csv} {docs:,} documents, {tokens:,} tokens, {csv.stat().st_size / 2**20:.0f} MiB", flush=True)
    results: dict = {"corpus": {"documents": docs, "tokens": tokens, "csv_mib": round(csv.stat().st_size / 2**20)},
                     "load_before": os.getloadavg()}
    one = run_child("pretokenize", str(csv), str(w / "head.tokens"), "1", str(docs // 10))
    print("pretokenize 1 worker (first tenth):", one, flush=True)
    both = run_child("pretokenize", str(csv), str(w / "ko.tokens"), "2", "0")
    print("pretokenize 2 workers:", both, flush=True)
    results["pretokenize"] = [one, both]
    hf = {"HF_DATASETS_CACHE": str(w / "hf_cache")}
    run_child("warm", str(csv), env=hf)
    results["startup"] = []
    for kind, path in (("pretokenized", w / "ko.tokens"), ("kowikitext", csv), ("torchtune", csv)):
        r = run_child(kind, str(path), env=hf)
        print(r, flush=True)
        results["startup"].append(r)
    write_synthetic(w / "ko.tokens", w / "synthetic.tokens", args.synthetic_docs, args.synthetic_tokens)
    r = run_child("pretokenized", str(w / "synthetic.tokens"))
    r |= {"kind": "pretokenized (synthetic)", "documents": args.synthetic_docs, "tokens": args.synthetic_tokens}
    print(r, flush=True)
    results["startup"].append(r)
    results["load_after"] = os.getloadavg()
    (w / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
