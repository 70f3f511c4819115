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


def _hash_parallel(paths: list[Path]) -> dict[str, str]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(paths))) as ex:  # hashlib releases the GIL
        return dict(zip((p.name for p in paths), ex.map(sha256, paths), strict=True))


def _machine() -> dict[str, str]:
    boot = Path("/proc/sys/kernel/random/boot_id")
    return {"node": platform.node(), "cpus": str(os.cpu_count()),
            "boot_id": boot.read_text().strip() if boot.exists() else "", "at": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                          time.gmtime())}


def _make(args: argparse.Namespace) -> tuple[Path, float | None]:
    model = args.work / args.preset
    if (model / "config.json").exists() and args.reuse_work:
        return model, None
    start = time.perf_counter()
    if args.draw_device == "cpu":
        from kobllla.tiny_model import make_model

        model = make_model(model, preset=args.preset, flavor=args.flavor, dtype="bfloat16")
    else:  # N(0, 0.02) drawn on the GPU (bench/train_gpu.py): 20 s instead of 60-90 s for 16 GB at 8B
        sys.path.insert(0, str(REPO / "bench"))
        from train_gpu import write_random_checkpoint

        write_random_checkpoint(model, preset=args.preset, device=args.draw_device, seed=0, flavor=args.flavor)
    return model, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="an HF model dir (default: make one of --preset in --work)")
    p.add_argument("--preset", default="tiny", help="kobllla.tiny_model preset when --model is not given")
    p.add_argument("--flavor", default="instruct", choices=["base", "instruct"],
                   help="of the made model: a base one (chat template, eos <|end_of_text|>) gets eos <|eot_id|> "
                        "from tools.export_gguf, so its files differ from the hand run's in that one key")
    p.add_argument("--draw-device", default="cpu", help="where the made model's weights are drawn (cpu, cuda)")
    p.add_argument("--work", type=Path, required=True, help="scratch directory (emptied unless --reuse-work)")
    p.add_argument("--reuse-work", action="store_true",
                   help="keep --work: reuse its model and the figures of runs done before (one run per call)")
    p.add_argument("--runs", default="hand,ours", help="which runs now, in this order: hand, ours or both")
    p.add_argument("--free-outputs", action="store_true",
                   help="delete a run's .gguf files once hashed (an 8B run writes 21 GB: the disk holds one)")
    p.add_argument("--llama-cpp", type=Path, help="llama.cpp tree (default: as tools.export_gguf finds it)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or any(r not in ("hand", "ours") for r in runs):
        p.error(f"--runs: hand, ours or hand,ours, not {args.runs!r}")
    lc = find_llama_cpp(args.llama_cpp, fetch=True)
    if args.work.exists() and not args.reuse_work:
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    model, make_s = (args.model, None) if args.model else _make(args)
    weights = [f for f in model.iterdir() if f.suffix == ".safetensors"]
    if make_s is None:  # a model made in this process is in the page cache already
        _hash_parallel(weights)  # read once: every run starts with the page cache warm
    model_bytes = sum(f.stat().st_size for f in weights)
    for run in runs:
        out = args.work / run
        if out.exists():
            shutil.rmtree(out)
        figures = (by_hand(lc, model, out, model.name, args.threads) if run == "hand"
                   else ours(lc, model, out, args.threads))
        files = [out / f"{model.name}-{q}.gguf" for q in ("f16", "q4_k_m")]
        if run == "hand":
            digests = _hash_parallel(files)
        else:
            outputs = json.loads((out / "kobllla_manifest.json").read_text())["outputs"]
            digests = {f.name: outputs[f.name]["sha256"] for f in files}
        record = {"figures": figures, "sha256": digests, "bytes": {f.name: f.stat().st_size for f in files},
                  "machine": _machine(), "make_model_s": make_s}
        (args.work / f"{run}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(run, json.dumps(figures), flush=True)
        if args.free_outputs:
            for f in files:
                f.unlink()
    done = {r: json.loads((args.work / f"{r}.json").read_text())
            for r in ("hand", "ours") if (args.work / f"{r}.json").exists()}
    result = {
        "model": str(model), "preset": None if args.model else args.preset, "flavor": args.flavor,
        "model_bytes": model_bytes, "threads": args.threads, "llama_cpp": lc.describe(),
        **{("by_hand" if r == "hand" else "kobllla"): rec["figures"] for r, rec in done.items()},
        "machines": {r: rec["machine"] for r, rec in done.items()},
    }
    if len(done) == 2:
        hand, mine = done["hand"], done["ours"]
        names = {q: f"{model.name}-{q}.gguf" for q in ("f16", "q4_k_m")}
        result["byte_identical"] = {q: hand["sha256"][n] == mine["sha256"][n] for q, n in names.items()}
        result["same_boot"] = hand["machine"]["boot_id"] == mine["machine"]["boot_id"]
        result["ratio_total"] = mine["figures"]["total_s"] / hand["figures"]["total_s"]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
