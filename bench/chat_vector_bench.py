"""Benchmark the chat vector merge: kobllla vs mergekit task_arithmetic vs the naive approach.

    .venv/bin/python bench/chat_vector_bench.py --work /tmp/kobllla-bench-cv \\
        --mergekit /tmp/mergekit-venv/bin/mergekit-yaml

Makes three synthetic checkpoints of the Llama-3.2-1B shape (hidden 2048, 16 layers, MLP 8192,
vocab 128256, untied lm_head: 1.50B params, bf16, ~1 GB shards: 3 shards, 3.0 GB per model):
base from ``kobllla.tiny_model.make_model``, instruct and target = base + independent
N(0, 0.002) deltas (weights are N(0, 0.02)), like two fine-tunes of one base. Then it runs each
tool once under ``/usr/bin/time -v``:

- kobllla: ``python -m tools.chat_vector --base B --instruct I --target T --out O``;
- mergekit 0.1.5 (own venv: ``python3 -m venv /tmp/mergekit-venv &&
  /tmp/mergekit-venv/bin/pip install torch==2.13.0 mergekit==0.1.5``): ``task_arithmetic``
  with base_model B and models T (weight 1) + I (weight 1), ``normalize: false``, bf16, which
  is ``B + (T - B) + (I - B)``;
- naive: the seed script's way: load the three models whole, ``t + ratio * (i - b)`` in bf16,
  ``torch.save`` one pickle (``naive`` subcommand of this file).

Every output is then compared, element by element (bit patterns), with the reference
``bf16(fp32(T) + 1.0 * (fp32(I) - fp32(B)))`` computed here independently of kobllla's code
(safetensors ``safe_open``, one tensor at a time). Before each tool runs, the input files are
read once so every tool starts with them in the page cache. Results: a markdown table on
stdout and ``WORK/results.json``.

``cold`` measures kobllla alone at a larger shape with the page cache dropped before each run
(the GPU host's 16 cores; needs root for ``/proc/sys/vm/drop_caches``)::

    python3 bench/chat_vector_bench.py cold --work /root/cv --out-dir /dev/shm --preset llama3-8b

It writes three inputs of the preset's shape fast (header planned by kobllla, then a 64 MiB
block of N(0, 0.02) bf16 values, a different one per model, repeated: the merge's speed does not
depend on the values), then runs the default command, ``--no-hash --workers 8`` and, while time
allows, the default again warm, each under ``os.wait4`` (wall, CPU, peak RSS); it checks that the
manifest's sha256 of one input and one output file equal hashlib's. JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from disk_probe import drop_caches  # bench/ is sys.path[0] when this file runs as a script
from safetensors import safe_open

RATIO = 1.0
MERGEKIT_CONFIG = """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {target}
    parameters:
      weight: 1.0
  - model: {instruct}
    parameters:
      weight: 1.0
parameters:
  normalize: false
dtype: bfloat16
"""


SIGMA = 0.002  # fine-tune delta: N(0, 0.002) on weights drawn from N(0, 0.02), i.e. 10 % of their scale


def make_inputs(work: Path) -> dict[str, Path]:
    """base: random init; instruct and target: base + independent N(0, SIGMA) deltas, as a
    fine-tune and a continued-pretraining run of one base would be (kept between runs)."""
    from kobllla.tiny_model import make_model

    paths = {role: work / role for role in ("base", "instruct", "target")}
    if not (paths["base"] / "kobllla_model.json").is_file():
        make_model(paths["base"], preset="llama3.2-1b-untied", flavor="base", seed=0,
                   dtype="bfloat16", max_shard_bytes=10**9, overwrite=True)
    for role, flavor, seed in (("instruct", "instruct", 1), ("target", "base", 2)):
        if not (paths[role] / "bench_derived.json").is_file():
            derive(paths["base"], paths[role], flavor=flavor, seed=seed)
    return paths


def derive(base: Path, out: Path, *, flavor: str, seed: int) -> None:
    """Writes ``base + N(0, SIGMA)`` (bf16), shard by shard, with ``flavor``'s metadata files."""
    from safetensors.torch import load_file, save_file

    from kobllla.atomic import atomic_output_dir, write_json
    from kobllla.tiny_model import PRESETS, hf_config, write_tokenizer_files

    gen = torch.Generator().manual_seed(seed)
    with atomic_output_dir(out, overwrite=True) as tmp:
        for shard in sorted(base.glob("*.safetensors")):
            tensors = load_file(shard)
            for name, t in tensors.items():
                noise = torch.empty(t.shape, dtype=torch.float32).normal_(0.0, SIGMA, generator=gen)
                tensors[name] = noise.add_(t.float()).to(torch.bfloat16)
                del noise
            save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
            del tensors
        shutil.copyfile(base / "model.safetensors.index.json", tmp / "model.safetensors.index.json")
        shape = PRESETS["llama3.2-1b-untied"]
        write_json(tmp / "config.json", hf_config(shape, flavor=flavor, dtype="bfloat16"))
        write_tokenizer_files(tmp, flavor=flavor, max_len=shape.max_seq_len)
        write_json(tmp / "bench_derived.json", {"from": str(base), "sigma": SIGMA, "seed": seed, "flavor": flavor})


def warm_cache(paths: dict[str, Path]) -> None:
    for p in paths.values():
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as handle:
                while handle.read(64 * 2**20):
                    pass


def timed(cmd: list[str], log: Path) -> dict:
    """Runs ``cmd`` under /usr/bin/time -v; returns wall seconds, peak RSS and exit code."""
    load_before = os.getloadavg()[0]
    with open(log, "w") as out:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    text = log.read_text(errors="replace")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    parts = [float(x) for x in wall.split(":")]
    seconds = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): (\S+)", text).group(1)) for k in ("User", "System"))
    return {"cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": round(seconds, 2), "cpu_s": round(cpu, 2),
            "peak_rss_gb": round(rss_kb * 1024 / 1e9, 3), "load_before": round(load_before, 2)}


def open_output(path: Path):
    """``name -> tensor`` getter over a safetensors dir (via its index) or a torch pickle."""
    if path.is_file():
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return sorted(sd), sd.__getitem__
    index = path / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(path / "model.safetensors", "pt") as f:
            where = {k: "model.safetensors" for k in f.keys()}
    handles = {f: safe_open(path / f, "pt") for f in set(where.values())}
    return sorted(where), lambda name: handles[where[name]].get_tensor(name)


def count_differences(inputs: dict[str, Path], output: Path) -> dict:
    """Elements whose bits differ from bf16(fp32(t) + ratio * (fp32(i) - fp32(b)))."""
    ref_names, get_b = open_output(inputs["base"])
    _, get_i = open_output(inputs["instruct"])
    _, get_t = open_output(inputs["target"])
    out_names, get_o = open_output(output)
    missing = sorted(set(ref_names) - set(out_names))
    differ = total = 0
    for name in ref_names:
        if name in missing:
            continue
        ref = (get_t(name).float() + RATIO * (get_i(name).float() - get_b(name).float())).to(torch.bfloat16)
        got = get_o(name)
        if got.dtype != torch.bfloat16 or got.shape != ref.shape:
            differ += ref.numel()
        else:
            differ += int((got.view(torch.int16) != ref.view(torch.int16)).sum())
        total += ref.numel()
    return {"elements": total, "elements_differ": differ, "percent_differ": round(100 * differ / max(total, 1), 3),
            "missing_tensors": len(missing)}


def naive(base: Path, instruct: Path, target: Path, out: Path) -> None:
    """The seed's approach: three whole models in memory, bf16 arithmetic, one pickle."""
    from safetensors.torch import load_file

    def load(p: Path) -> dict[str, torch.Tensor]:
        sd = {}
        for f in sorted(p.glob("*.safetensors")):
            sd.update(load_file(f))
        return sd

    b, i, t = load(base), load(instruct), load(target)
    torch.save({k: t[k] + RATIO * (i[k] - b[k]) for k in t}, out)


def run_all(work: Path, mergekit: Path | None, python: str) -> dict:
    # made in a child process so this one stays small while the tools are measured
    subprocess.run([python, str(Path(__file__).resolve()), "make-inputs", str(work)], check=True)
    inputs = {role: work / role for role in ("base", "instruct", "target")}
    repo = Path(__file__).resolve().parents[1]
    kobllla = [python, "-m", "tools.chat_vector", "--base", str(inputs["base"]), "--instruct",
               str(inputs["instruct"]), "--target", str(inputs["target"]), "--max-shard-gb", "1", "--quiet"]
    runs = {
        "kobllla": kobllla + ["--out", str(work / "out-kobllla")],
        "kobllla --no-hash": kobllla + ["--out", str(work / "out-kobllla-nohash"), "--no-hash"],
        "naive": [python, str(Path(__file__).resolve()), "naive", str(inputs["base"]), str(inputs["instruct"]),
                  str(inputs["target"]), str(work / "out-naive.pt")],
    }
    if mergekit is not None:
        cfg = work / "mergekit.yml"
        cfg.write_text(MERGEKIT_CONFIG.format(**{k: v for k, v in inputs.items()}))
        runs["mergekit"] = [str(mergekit), str(cfg), str(work / "out-mergekit")]
    results = {}
    outs = {"kobllla": work / "out-kobllla", "kobllla --no-hash": work / "out-kobllla-nohash",
            "mergekit": work / "out-mergekit", "naive": work / "out-naive.pt"}
    for tool in ("kobllla", "mergekit", "naive", "kobllla --no-hash"):
        if tool not in runs:
            continue
        out = outs[tool]
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        warm_cache(inputs)
        os.chdir(repo)
        results[tool] = timed(runs[tool], work / f"{tool.replace(' --', '-')}.log")
        if results[tool]["rc"] == 0:
            results[tool].update(count_differences(inputs, out))
        print(json.dumps({tool: results[tool]}), file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    return results


def table(results: dict) -> str:
    rows = ["| tool | wall (s) | CPU user+sys (s) | peak RSS (GB) | elements differing from fp32-once | load before |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for tool, r in results.items():
        diff = (f"{r['elements_differ']:,} of {r['elements']:,} ({r['percent_differ']} %)"
                if "elements" in r else f"failed (rc {r['rc']})")
        rows.append(f"| {tool} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_gb']} | {diff} | {r['load_before']} |")
    return "\n".join(rows)


def write_fast_inputs(work: Path, preset: str) -> dict[str, Path]:
    """Three checkpoints of ``preset``'s shape, 5 GB shards, written at disk speed (in parallel)."""
    from kobllla.atomic import write_json
    from kobllla.checkpoint_io import INDEX_NAME, plan_shards
    from kobllla.tiny_model import PRESETS, hf_config, hf_tensor_shapes

    shape = PRESETS[preset]
    shards = plan_shards([(n, torch.bfloat16, s) for n, s in hf_tensor_shapes(shape)], max_shard_bytes=5 * 10**9)

    def one(role: str, seed: int) -> Path:
        out = work / role
        out.mkdir(parents=True, exist_ok=True)
        block = (torch.randn(32 * 2**20, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)
        view = memoryview(block.view(torch.uint8).numpy())
        for shard in shards:
            with open(out / shard.file_name, "wb") as handle:
                handle.write(shard.header)
                left = shard.data_bytes
                while left:
                    left -= handle.write(view[:min(left, len(view))])
        write_json(out / INDEX_NAME, {"metadata": {"total_size": sum(s.data_bytes for s in shards)},
                                      "weight_map": {n: s.file_name for s in shards for n in s.names}})
        write_json(out / "config.json", hf_config(shape, flavor="instruct" if role == "instruct" else "base",
                                                  dtype="bfloat16"))
        return out

    with ThreadPoolExecutor(3) as pool:
        jobs = {role: pool.submit(one, role, seed) for seed, role in enumerate(("base", "instruct", "target"))}
        return {role: job.result() for role, job in jobs.items()}


# Runs argv[2:] and writes its wall time, CPU time and peak RSS to argv[1]. A separate small
# process: a child forked from this one (torch imported, 64 MiB blocks made) would report this
# process's RSS at the fork as its own peak (Linux carries the old mm's high-water mark over exec).
_WAIT4 = """import json, os, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(proc.pid, 0)
json.dump({"rc": os.waitstatus_to_exitcode(status), "wall_s": round(time.perf_counter() - t, 2),
           "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "peak_rss_gb": round(ru.ru_maxrss * 1024 / 1e9, 3)},
          open(sys.argv[1], "w"))
"""


def measured(cmd: list[str], log: Path) -> dict:
    """Runs ``cmd``; its wall seconds, CPU seconds and peak RSS (``os.wait4`` in a small parent)."""
    stats = log.with_suffix(".json")
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-c", _WAIT4, str(stats), *cmd], stdout=out, stderr=subprocess.STDOUT)
    return {"cmd": " ".join(cmd[2:]), **json.loads(stats.read_text()), "tail": log.read_text()[-300:]}


def check_hashes(out: Path, instruct: Path) -> list[bool]:
    """The manifest's sha256 of instruct's last input file and of the last output file, against hashlib."""
    import hashlib

    m = json.loads((out / "kobllla_manifest.json").read_text())
    entries = [m["inputs"]["instruct"]["files"][-1], m["outputs"][-1]]
    files = [instruct / entries[0]["file"], out / entries[1]["file"]]

    def digest(f: Path) -> str:
        with open(f, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    with ThreadPoolExecutor(2) as pool:
        return [got == e["sha256"] for got, e in zip(pool.map(digest, files), entries, strict=True)]


# The CLI with torch imported first: what every run cost before the merge stopped importing torch.
WITH_TORCH = ("import sys, runpy, torch; sys.argv = ['tools.chat_vector', *sys.argv[1:]]; "
              "runpy.run_module('tools.chat_vector', run_name='__main__')")


def cold(work: Path, out_dir: Path, preset: str, budget_s: float, drop: bool, ab_torch: bool = False,
         ab_flags: str = "", reuse_inputs: bool = False) -> None:
    import time

    t0 = time.perf_counter()
    done = work / "inputs_done.json"
    if reuse_inputs and done.is_file():
        inputs = {role: work / role for role in ("base", "instruct", "target")}
    else:
        inputs = write_fast_inputs(work, preset)
        done.write_text(json.dumps({"preset": preset}))
    print(json.dumps({"inputs_written_s": round(time.perf_counter() - t0, 1),
                      "input_gb": round(sum(f.stat().st_size for p in inputs.values()
                                                for f in p.glob("*.safetensors")) / 1e9, 2)}), flush=True)
    args = ["--base", str(inputs["base"]), "--instruct", str(inputs["instruct"]), "--target", str(inputs["target"]),
            "--quiet"]
    plain, torch_first = [sys.executable, "-m", "tools.chat_vector", *args], [sys.executable, "-c", WITH_TORCH, *args]
    out = out_dir / "cv-out"
    runs = [("default, cold", [], True), ("--no-hash --workers 8, cold", ["--no-hash", "--workers", "8"], True),
            ("default, warm", [], False)]
    if ab_torch:  # alternated, so that a drifting disk shows in both
        runs = [("default, cold", [], True), ("default with torch imported first, cold", [], True),
                ("default, cold, 2nd", [], True), ("default with torch imported first, cold, 2nd", [], True),
                ("--no-hash --workers 8, cold", ["--no-hash", "--workers", "8"], True)]
    if ab_flags:  # the default command alternated with the same command plus these flags
        flags = ab_flags.split()
        runs = [("default, cold", [], True), (f"default {ab_flags}, cold", flags, True),
                ("default, cold, 2nd", [], True), (f"default {ab_flags}, cold, 2nd", flags, True)]
    for label, extra, want_cold in runs:
        base = torch_first if "torch imported" in label else plain
        if time.perf_counter() - t0 > budget_s:
            print(json.dumps({label: "skipped: out of time"}), flush=True)
            continue
        shutil.rmtree(out, ignore_errors=True)
        dropped = drop_caches() if want_cold and drop else None
        r = measured(base + ["--out", str(out)] + extra, work / "run.log")
        r.update({"caches_dropped": dropped, "cpus": len(os.sched_getaffinity(0)),
                  "elapsed_s": round(time.perf_counter() - t0, 1)})
        if r["rc"] == 0 and "--no-hash" not in extra and want_cold:
            r["sha256_matches"] = check_hashes(out, inputs["instruct"])
        print(json.dumps({label: r}), flush=True)
    shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "cold":
        p = argparse.ArgumentParser(prog="chat_vector_bench.py cold")
        p.add_argument("--work", type=Path, required=True, help="where the three inputs go (3 x 16 GB at 8B)")
        p.add_argument("--out-dir", type=Path, required=True, help="where the output goes (16 GB at 8B)")
        p.add_argument("--preset", default="llama3-8b")
        p.add_argument("--budget-s", type=float, default=150.0, help="start no run after this many seconds")
        p.add_argument("--keep-caches", action="store_true", help="do not drop the page cache (a shared machine)")
        p.add_argument("--ab-torch", action="store_true",
                       help="alternate the default command with the same command after `import torch`")
        p.add_argument("--ab-flags", default="", metavar="FLAGS",
                       help="alternate the default command with the same command plus FLAGS (e.g. '--workers 16')")
        p.add_argument("--reuse-inputs", action="store_true", help="keep inputs an earlier run wrote")
        a = p.parse_args(argv[1:])
        cold(a.work, a.out_dir, a.preset, a.budget_s, not a.keep_caches, a.ab_torch, a.ab_flags, a.reuse_inputs)
        return 0
    if argv and argv[0] == "naive":
        naive(*(Path(a) for a in argv[1:5]))
        return 0
    if argv and argv[0] == "make-inputs":
        make_inputs(Path(argv[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/kobllla-bench-cv"),
                        help="where the 3 x 2.5 GB inputs and the outputs go (needs ~12 GB free)")
    parser.add_argument("--mergekit", type=Path, default=None, help="path to mergekit-yaml (own venv)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = run_all(args.work.resolve(), args.mergekit, sys.executable)
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
