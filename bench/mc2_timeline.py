"""Where an MC2 run's wall time goes outside lm_eval: interpreter start, imports, the evaluation, exit.

    python3 bench/mc2_timeline.py --model M --bench-dir B --out OUT [--variants default,full_exit,bg_imports]
        [--repeat 2] [--importtime]

Each run is ``python3 -m eval.run --model bench=M --task truthfulqa_mc2 --data-dir B/data --device cuda
--scorer shared_prefix`` started through a small wrapper (``-c``) that stamps the wall clock when the
interpreter reaches it and when the atexit handlers have run (main has returned); this process stamps the
launch and the exit.
So ``startup_s`` (launch -> wrapper: interpreter and site), ``main_s`` (wrapper -> main returned: imports,
checks, evaluate_model), ``exit_s`` (main returned -> process gone: interpreter teardown, CUDA context) and
the run record's own ``timing`` come from one run. Variants, alternated ``--repeat`` times:

- ``default``: the command as a user runs it (it ends through ``kobllla.cli.exit_fast``);
- ``full_exit``: the same with ``KOBLLLA_FAST_EXIT=0``: the interpreter's whole teardown at exit;
- ``bg_imports``: the wrapper first starts threads importing transformers' heavy dependencies (sympy via
  ``torch.distributed.tensor``, scikit-learn, ``torch._dynamo``) in parallel with the main thread.

``--importtime`` adds one ``-X importtime`` run and prints the 30 slowest imports (cumulative). One JSON
line per run on stdout. Measurement only: nothing here changes what eval.run computes.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import subprocess
import sys
import time
from pathlib import Path

WRAPPER = r"""
import atexit, json, os, sys, time
t_start = time.time()
stamps, variant = sys.argv[1], sys.argv[2]
sys.argv = ["eval.run", *sys.argv[3:]]


def _stamp():  # registered first, so it runs last of the atexit handlers: right before the teardown
    with open(stamps, "w") as f:
        json.dump({"t_start": t_start, "t_main_end": time.time()}, f)


atexit.register(_stamp)
if variant == "bg_imports":
    import importlib, threading
    def _imp(name):
        try:
            importlib.import_module(name)
        except Exception:
            pass
    for name in ("torch.distributed.tensor", "sklearn.metrics", "torch._dynamo", "transformers.modeling_utils"):
        threading.Thread(target=_imp, args=(name,), daemon=True).start()
if variant == "full_exit":
    os.environ["KOBLLLA_FAST_EXIT"] = "0"
import runpy
runpy.run_module("eval.run", run_name="__main__", alter_sys=True)
"""


def one_run(args, variant: str, k: int, importtime: bool = False) -> dict:
    label = f"{variant}_{k}" + ("_importtime" if importtime else "")
    res = args.out / label
    stamps = args.out / f"{label}.stamps.json"
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", WRAPPER, str(stamps), variant,
           "--model", f"bench={args.model}", "--task", "truthfulqa_mc2", "--data-dir", str(args.bench_dir / "data"),
           "--device", args.device, "--scorer", "shared_prefix", "--results-dir", str(res)]
    log = args.out / f"{label}.log"
    t_launch = time.time()
    with open(log, "w") as out, open(args.out / f"{label}.err", "w") as err:
        proc = subprocess.run(cmd, stdout=out, stderr=err)
    t_exit = time.time()
    row = {"run": label, "rc": proc.returncode, "wall_s": round(t_exit - t_launch, 2)}
    if stamps.is_file():
        s = json.loads(stamps.read_text())
        row.update(startup_s=round(s["t_start"] - t_launch, 2), main_s=round(s["t_main_end"] - s["t_start"], 2),
                   exit_s=round(t_exit - s["t_main_end"], 2))
    records = sorted(glob.glob(f"{res}/runs/*.json"))
    if records:
        rec = json.loads(Path(records[-1]).read_text())
        row["mc2"] = rec["tasks"]["truthfulqa_mc2"]["metrics"]["acc"]["value"]
        row["timing"] = rec["timing"]
    else:
        row["stderr_tail"] = (args.out / f"{label}.err").read_text()[-600:]
    if importtime:
        row["slowest_imports"] = slowest_imports((args.out / f"{label}.err").read_text(), 30)
    return row


def slowest_imports(text: str, n: int) -> list[str]:
    rows = []
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (.*)$", line)
        if m:
            rows.append((int(m.group(2)), int(m.group(1)), m.group(3)))
    rows.sort(reverse=True)
    return [f"{cum / 1e6:.2f}s cum {own / 1e6:.2f}s self {name}" for cum, own, name in rows[:n]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--bench-dir", type=Path, required=True, help="python -m eval.bench_mc2 --out DIR")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", default="default,full_exit,bg_imports")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--importtime", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no run after this many seconds")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    plan = [(v, k, False) for k in range(1, args.repeat + 1) for v in args.variants.split(",")]
    if args.importtime:
        plan.append(("default", 0, True))
    for variant, k, imp in plan:
        if time.perf_counter() - t0 > args.budget_s:
            print(json.dumps({"run": f"{variant}_{k}", "skipped": "out of time"}), flush=True)
            continue
        print(json.dumps(one_run(args, variant, k, imp)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
