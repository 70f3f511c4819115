"""Flex attention kernel options on packed document masks at the Llama-3-8B attention shape (GPU).

One layer's attention, forward + backward, compiled as ``attention: flex_inline`` compiles it:
32 query heads, k/v repeated to 32 heads (torchtune's layout), head dim 128, bf16, seq 4096, on
document-causal masks from ``kobllla.datasets.packed_block_mask`` over log-normal document
lengths (median ~700 tokens, as the stage-1 benchmark's packs). Per ``kernel_options`` set: the
median of CUDA-event timings and the largest difference of output and gradients from the
default options' (so a set that changes the math shows up).

Measured on one H200 (torch 2.11, docs/benchmarks.md): the defaults were fastest (1.26 ms); the
128 x 128 forward tile and the other backward tiles were 12-84 % slower; ``ROWS_GUARANTEED_SAFE`` +
``BLOCKS_ARE_CONTIGUOUS`` gave NaN outputs on these masks (and NaN losses in the recipe), so kobllla
passes no kernel options.

    python bench/flex_probe_gpu.py --out OUT/flex.json [--iters 20] [--deadline-s 200]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from kobllla.datasets._collate import packed_block_mask

SAFE = {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True}
OPTION_SETS: dict[str, dict] = {
    "default": {},
    "safe_contiguous": SAFE,
    "safe_contiguous_fwd128x128": {**SAFE, "fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8,
                                   "fwd_num_stages": 2},
    "safe_contiguous_bwd64x64": {**SAFE, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
                                 "bwd_BLOCK_N2": 64, "bwd_num_warps": 4, "bwd_num_stages": 3},
    "safe_contiguous_bwd32x128": {**SAFE, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                  "bwd_BLOCK_N2": 32, "bwd_num_warps": 4, "bwd_num_stages": 3},
    "safe_contiguous_tma": {**SAFE, "USE_TMA": True},
}


def doc_lengths(rng: random.Random, seq: int, median: int = 700) -> list[int]:
    out, left = [], seq
    while left:
        n = min(left, max(16, int(median * math.exp(rng.gauss(0.0, 1.0)))))
        out.append(n)
        left -= n
    return out


def main(argv: list[str] | None = None) -> int:
    from torch.nn.attention.flex_attention import flex_attention

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--deadline-s", type=float, default=200)
    p.add_argument("--seq", type=int, default=4096)
    args = p.parse_args(argv)
    t_start = time.time()
    rng = random.Random(0)
    masks = [packed_block_mask([doc_lengths(rng, args.seq)], args.seq, "cuda") for _ in range(4)]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 32, args.seq, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn(1, 32, args.seq, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    results, ref = {}, None
    for name, opts in OPTION_SETS.items():
        if time.time() - t_start > args.deadline_s:
            results[name] = {"error": "skipped: deadline"}
            continue
        torch._dynamo.reset()
        fn = torch.compile(lambda q, k, v, m, o=opts: flex_attention(q, k, v, block_mask=m, kernel_options=o or None),
                           dynamic=False)
        try:
            c0 = time.time()
            out = fn(q, k, v, masks[0])
            grads = torch.autograd.grad(out, (q, k, v), dout)
            torch.cuda.synchronize()
            compile_s = time.time() - c0
            times = []
            for i in range(args.iters):
                m = masks[i % len(masks)]
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                o = fn(q, k, v, m)
                torch.autograd.grad(o, (q, k, v), dout)
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e))
        except Exception as exc:  # noqa: BLE001 - a kernel option set the compiler rejects is a result
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(name, results[name], flush=True)
            continue
        times.sort()
        r = {"options": opts, "median_ms": times[len(times) // 2], "min_ms": times[0], "compile_s": compile_s}
        if ref is None:
            ref = (out.detach(), [x.detach() for x in grads])
        else:
            r["max_abs_diff_out"] = (out - ref[0]).abs().max().item()
            r["max_abs_diff_grad"] = max((a - b).abs().max().item() for a, b in zip(grads, ref[1], strict=True))
        results[name] = r
        print(name, json.dumps(r), flush=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "results": results}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
