"""Export speed: ``tools.export_gguf`` (f16, then q4_k_m) vs llama.cpp's convert + quantize run by hand, same run.

    # on a machine with a llama.cpp tree whose build/bin/llama-quantize is built
    python bench/export_gguf_bench.py --preset llama3-8b --work /tmp/gguf-bench --llama-cpp ~/src/llama.cpp \\
        --json /tmp/gguf-bench.json
    # tiny CPU run (kobllla's converter copy, llama-cpp-python's quantizer)
    python bench/export_gguf_bench.py --preset tiny --work /tmp/gguf-bench-tiny

By hand (the peer) is what llama.cpp's README says:
    python convert_hf_to_gguf.py MODEL --outfile NAME-f16.gguf --outtype f16
    llama-quantize NAME-f16.gguf NAME-q4_k_m.gguf Q4_K_M THREADS
kobllla: python -m tools.export_gguf --model MODEL --out OUT --quant f16,q4_k_m (the same two steps plus
verification of every file, sha256 and the manifest). The model's files are read once before either
run (page cache warm for both); the outputs of the two are compared byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kobllla.gguf.locate import find_llama_cpp  # noqa: E402


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 * 2**20):
            h.update(block)
    return h.hexdigest()


def timed(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def by_hand(lc, model: Path, out: Path, name: str, threads: int) -> dict[str, float]:
    out.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(lc.gguf_py), os.environ.get("PYTHONPATH")) if p))
    f16, q4 = out / f"{name}-f16.gguf", out / f"{name}-q4_k_m.gguf"
    convert = timed([sys.executable, str(lc.converter), str(model), "--outfile", str(f16), "--outtype", "f16",
                     "--model-name", name], env=env)
    if lc.quantize_binary is not None:
        cmd = [str(lc.quantize_binary), str(f16), str(q4), "Q4_K_M", str(threads)]
    else:
        cmd = [sys.executable, "-m", "kobllla.gguf._quantize", str(f16), str(q4), "15", str(threads)]
    quantize = timed(cmd)
    return {"convert_f16_s": convert, "quantize_q4_k_m_s": quantize, "total_s": convert + quantize}


def ours(lc, model: Path, out: Path, threads: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "tools.export_gguf", "--model", str(model), "--out", str(out), "--quant", "f16,q4_k_m",
           "--llama-cpp", str(lc.root), "--threads", str(threads), "--no-progress"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - start
    steps = json.loads((out / "kobllla_manifest.json").read_text())["outputs"]
    return {"convert_f16_s": steps[f"{model.name}-f16.gguf"]["seconds"],
            "quantize_q4_k_m_s": steps[f"{model.name}-q4_k_m.gguf"]["seconds"], "total_s": total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="an HF model dir (default: make one of --preset in --work)")
    p.add_argument("--preset", default="tiny", help="kobllla.tiny_model preset when --model is not given")
    p.add_argument("--flavor", default="instruct", choices=["base", "instruct"],
                   help="of the made model: a base one (chat template, eos <|end_of_text|>) gets eos <|eot_id|> "
                        "from tools.export_gguf, so its files differ from the hand run's in that one key")
    p.add_argument("--work", type=Path, required=True, help="scratch directory (emptied)")
    p.add_argument("--llama-cpp", type=Path, help="llama.cpp tree (default: as tools.export_gguf finds it)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    lc = find_llama_cpp(args.llama_cpp, fetch=True)
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    model = args.model
    make_s = None
    if model is None:
        from kobllla.tiny_model import make_model

        start = time.perf_counter()
        model = make_model(args.work / args.preset, preset=args.preset, flavor=args.flavor, dtype="bfloat16")
        make_s = time.perf_counter() - start
    weights = [f for f in model.iterdir() if f.suffix == ".safetensors"]
    for f in weights:  # read once: both runs start with the page cache warm
        sha256(f)
    model_bytes = sum(f.stat().st_size for f in weights)
    hand = by_hand(lc, model, args.work / "hand", model.name, args.threads)
    mine = ours(lc, model, args.work / "ours", args.threads)
    files = {q: [args.work / run / f"{model.name}-{q}.gguf" for run in ("hand", "ours")] for q in ("f16", "q4_k_m")}
    same = {q: sha256(hand_file) == sha256(our_file) for q, (hand_file, our_file) in files.items()}
    result = {
        "model": str(model), "preset": None if args.model else args.preset, "flavor": args.flavor,
        "model_bytes": model_bytes,
        "make_model_s": make_s, "machine": f"{platform.node()} {os.cpu_count()} CPUs", "threads": args.threads,
        "llama_cpp": lc.describe(), "by_hand": hand, "kobllla": mine, "byte_identical": same,
        "ratio_total": mine["total_s"] / hand["total_s"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
