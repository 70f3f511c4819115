"""Where a training step leaves the GPU idle: a torch profiler trace, step by step.

Reads a Chrome/Kineto trace (``*.pt.trace.json[.gz]``, what torchtune's profiler writes) and, per
``ProfilerStep#N`` window: wall time, GPU busy time (the union of kernel, memcpy and memset
intervals), idle time, and kernel time by kind. Every gap between GPU work is charged to the CPU
code that launched the work after it (the runtime call with the next kernel's correlation id, and
the CPU ops around that call on its thread), so the report says which part of the step the GPU
waited for: the data loader and mask, host syncs, the compiled layers' wrappers, the optimizer.
It also totals the host-blocking runtime calls (``cudaStreamSynchronize``, blocking ``cudaMemcpy``).

    python bench/trace_gaps.py TRACE.pt.trace.json.gz [--out gaps.json] [--min-gap-us 5]

The profiler adds its own CPU cost per op (~1-2 us), so gaps in a traced run are larger than in an
untraced one: read the shares, not the absolute idle time.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
CPU_CATS = {"cpu_op", "user_annotation", "python_function"}
RUNTIME_CATS = {"cuda_runtime", "cuda_driver"}
BLOCKING = re.compile(r"(Synchronize|^cudaMemcpy$|^cudaMemcpy2D$|cudaEventSynchronize)")
STEP = re.compile(r"^ProfilerStep#(\d+)$")


def load_trace(path: str | Path) -> dict:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def kernel_kind(name: str) -> str:
    low = name.lower()
    if "flex" in low or "triton_tem" in low:
        return "flex attention"
    if any(k in low for k in ("gemm", "cutlass", "nvjet", "xmma", "cublas", "_scaled_mm", "matmul")):
        return "matmul"
    if "memcpy" in low:
        return "memcpy"
    if "memset" in low:
        return "memset"
    if "triton" in low:
        return "triton (fused elementwise/reductions)"
    return "other"


def _merge(intervals: list[tuple[float, float, dict]]) -> list[tuple[float, float, dict]]:
    """Union of ``(start, end, first event)`` intervals, sorted; the event is the first to start."""
    out: list[list] = []
    for s, e, ev in sorted(intervals, key=lambda x: x[0]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e, ev])
    return [tuple(x) for x in out]


def _launch_chains(events: list[dict]) -> dict[int, list[str]]:
    """Correlation id -> names of the CPU ops open around its runtime call (outermost first)."""
    by_tid: dict[object, list[dict]] = defaultdict(list)
    for ev in events:
        if ev.get("ph") == "X" and (ev.get("cat") in CPU_CATS or ev.get("cat") in RUNTIME_CATS):
            by_tid[(ev.get("pid"), ev.get("tid"))].append(ev)
    chains: dict[int, list[str]] = {}
    for evs in by_tid.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack: list[tuple[float, str]] = []
        for ev in evs:
            ts = ev["ts"]
            while stack and stack[-1][0] <= ts:
                stack.pop()
            if ev.get("cat") in RUNTIME_CATS:
                corr = (ev.get("args") or {}).get("correlation")
                if corr is not None:
                    chains[corr] = [name for _, name in stack] + [ev["name"]]
            else:
                stack.append((ts + ev.get("dur", 0), ev["name"]))
    return chains


def _label(chain: list[str] | None) -> tuple[str, str]:
    """(the op just under the step, the innermost CPU op) for a launch chain."""
    if not chain:
        return "(no launch found)", "(no launch found)"
    names = [n for n in chain[:-1] if not STEP.match(n)]
    top = names[0] if names else chain[-1]
    inner = names[-1] if names else chain[-1]
    return top[:120], inner[:120]


def gap_report(trace: dict, *, min_gap_us: float = 5.0, top: int = 15) -> dict:
    events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict)]
    steps = sorted(((int(STEP.match(e["name"]).group(1)), e["ts"], e["ts"] + e.get("dur", 0))
                    for e in events if e.get("ph") == "X" and STEP.match(str(e.get("name", "")))
                    and e.get("cat") in CPU_CATS), key=lambda x: x[1])
    gpu = [(e["ts"], e["ts"] + e.get("dur", 0), e) for e in events
           if e.get("ph") == "X" and e.get("cat") in GPU_CATS]
    if not steps or not gpu:
        raise ValueError(f"trace has {len(steps)} ProfilerStep windows and {len(gpu)} GPU events; "
                         "profile with CUDA activity and at least one active step")
    chains = _launch_chains(events)
    merged = _merge(gpu)
    starts = [m[0] for m in merged]
    per_step, idle_top, idle_inner = [], defaultdict(float), defaultdict(float)
    kinds: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    biggest: list[tuple[float, str, str, int]] = []
    for num, t0, t1 in steps:
        busy, idle = 0.0, 0.0
        i = max(bisect.bisect_right(starts, t0) - 1, 0)
        prev_end = t0
        while i < len(merged) and merged[i][0] < t1:
            s, e, ev = merged[i]
            s_c, e_c = max(s, t0), min(e, t1)
            if e_c > s_c:
                busy += e_c - s_c
                gap = s_c - prev_end
                if gap >= min_gap_us:
                    top_name, inner = _label(chains.get((ev.get("args") or {}).get("correlation")))
                    idle += gap
                    idle_top[top_name] += gap
                    idle_inner[inner] += gap
                    biggest.append((gap, top_name, inner, num))
                prev_end = max(prev_end, e_c)
            i += 1
        if t1 - prev_end >= min_gap_us:
            idle += t1 - prev_end
            idle_top["(end of step: nothing launched)"] += t1 - prev_end
        per_step.append({"step": num, "wall_ms": (t1 - t0) / 1e3, "gpu_busy_ms": busy / 1e3,
                         "idle_ms": idle / 1e3, "idle_share": idle / (t1 - t0) if t1 > t0 else 0.0})
    lo, hi = steps[0][1], steps[-1][2]
    for s, e, ev in gpu:
        if s >= lo and e <= hi:
            kinds[kernel_kind(ev.get("name", ""))] += e - s
            by_name[ev.get("name", "")[:160]][0] += 1
            by_name[ev.get("name", "")[:160]][1] += e - s
    blocking: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in events:
        if ev.get("ph") == "X" and ev.get("cat") in RUNTIME_CATS and BLOCKING.search(ev.get("name", "")) \
                and lo <= ev["ts"] <= hi:
            blocking[ev["name"]][0] += 1
            blocking[ev["name"]][1] += ev.get("dur", 0)
    n = len(steps)
    total_idle = sum(idle_top.values())

    def ranked(d: dict[str, float]) -> list[dict]:
        return [{"where": k, "idle_ms_per_step": v / 1e3 / n, "share_of_idle": v / total_idle if total_idle else 0}
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {
        "steps": per_step,
        "mean": {key: sum(s[key] for s in per_step) / n for key in ("wall_ms", "gpu_busy_ms", "idle_ms", "idle_share")},
        "idle_by_top_op": ranked(idle_top),
        "idle_by_inner_op": ranked(idle_inner),
        "largest_gaps": [{"us": g, "top": t, "inner": i, "step": s}
                         for g, t, i, s in sorted(biggest, reverse=True)[:top]],
        "gpu_ms_per_step_by_kind": {k: v / 1e3 / n for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": k, "calls_per_step": c / n, "ms_per_step": d / 1e3 / n}
                        for k, (c, d) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:40]],
        "blocking_calls_per_step": {k: {"calls": c / n, "ms": d / 1e3 / n} for k, (c, d) in blocking.items()},
        "min_gap_us": min_gap_us,
    }


def markdown(rep: dict) -> str:
    m = rep["mean"]
    lines = [f"mean step {m['wall_ms']:.1f} ms: GPU busy {m['gpu_busy_ms']:.1f} ms, idle {m['idle_ms']:.1f} ms "
             f"({100 * m['idle_share']:.1f} %) over {len(rep['steps'])} steps", "",
             "| idle charged to (op under the step) | ms / step | share of idle |", "| --- | ---: | ---: |"]
    lines += [f"| `{r['where']}` | {r['idle_ms_per_step']:.2f} | {100 * r['share_of_idle']:.1f} % |"
              for r in rep["idle_by_top_op"]]
    lines += ["", "| idle charged to (innermost op) | ms / step | share of idle |", "| --- | ---: | ---: |"]
    lines += [f"| `{r['where']}` | {r['idle_ms_per_step']:.2f} | {100 * r['share_of_idle']:.1f} % |"
              for r in rep["idle_by_inner_op"]]
    lines += ["", "| GPU time by kind | ms / step |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in rep["gpu_ms_per_step_by_kind"].items()]
    lines += ["", "| kernel | calls / step | ms / step |", "| --- | ---: | ---: |"]
    lines += [f"| `{r['name'][:100]}` | {r['calls_per_step']:.0f} | {r['ms_per_step']:.2f} |"
              for r in rep["top_kernels"]]
    lines += ["", "| host-blocking call | calls / step | ms / step |", "| --- | ---: | ---: |"]
    lines += [f"| `{k}` | {v['calls']:.1f} | {v['ms']:.2f} |" for k, v in rep["blocking_calls_per_step"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--min-gap-us", type=float, default=5.0)
    args = p.parse_args(argv)
    rep = gap_report(load_trace(args.trace), min_gap_us=args.min_gap_us)
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1), encoding="utf-8")
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
