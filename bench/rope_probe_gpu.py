"""One layer's rotary embeddings at the Llama-3-8B shape, forward + backward: torchtune's RoPE compiled by
inductor (q's base and adapter outputs added first, as the layer does) against ``kobllla.models._rope.rope``
(``model.fused_rope``), each timed with CUDA events and checked against the other.

    python3 bench/rope_probe_gpu.py [--out probe.json] [--batch 2] [--seq 4096] [--iters 50]

Prints, per implementation, the milliseconds of one layer's four rotations (q and k, forward and backward)
and the bytes they must move per millisecond (TB/s): q's forward reads the base and adapter outputs and
writes the rotated q, its backward reads one gradient and writes one; k's read one and write one each way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _packed_positions(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """Positions restarting at each document, documents of log-normal lengths (the stage-1 mix)."""
    rows = []
    for _ in range(batch):
        pos, left = [], seq
        while left:
            n = min(left, max(16, int(760 * torch.empty(1).log_normal_(0, 1, generator=gen).item())))
            pos.append(torch.arange(n))
            left -= n
        rows.append(torch.cat(pos))
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("rope_probe_gpu: needs a CUDA device", file=sys.stderr)
        return 2
    from torchtune.modules import RotaryPositionalEmbeddings

    from kobllla.models._rope import rope

    dev, bf16 = "cuda", torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    b, s, hq, hkv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    rp = RotaryPositionalEmbeddings(d, max_seq_len=8192, base=500_000).to(dev)
    pos = _packed_positions(b, s, gen).to(dev)
    qb, dq = (torch.randn(b, s, hq, d, generator=gen).to(dev, bf16).requires_grad_() for _ in range(2))
    kb = torch.randn(b, s, hkv, d, generator=gen).to(dev, bf16).requires_grad_()
    gq = torch.randn(b, s, hq, d, generator=gen).to(dev, bf16)
    gk = torch.randn(b, s, hkv, d, generator=gen).to(dev, bf16)

    @torch.compile
    def torchtune_rope(qb, dq, kb, pos):  # noqa: ANN001, ANN202 - what FastAttention did before fused_rope
        return rp(qb + dq, input_pos=pos), rp(kb, input_pos=pos)

    def ours(qb, dq, kb, pos):  # noqa: ANN001, ANN202
        return rope(qb, rp.cache, pos, dq), rope(kb, rp.cache, pos)

    def step(fn):  # noqa: ANN001, ANN202
        q, k = fn(qb, dq, kb, pos)
        torch.autograd.backward([q, k], [gq, gk])
        return q.detach(), k.detach(), qb.grad, dq.grad, kb.grad

    elem = 2  # bf16
    q_bytes, k_bytes = b * s * hq * d * elem, b * s * hkv * d * elem
    moved = (3 * q_bytes + 2 * k_bytes) + (2 * q_bytes + 2 * k_bytes)
    results: dict = {"shape": {"batch": b, "seq": s, "heads": hq, "kv_heads": hkv, "head_dim": d},
                     "device": torch.cuda.get_device_name(), "torch": torch.__version__, "bytes_moved": moved}
    outs = {}
    for name, fn in (("torchtune_compiled", torchtune_rope), ("kobllla_fused_rope", ours)):
        for _ in range(3):
            qb.grad = dq.grad = kb.grad = None
            step(fn)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            qb.grad = dq.grad = kb.grad = None
            outs[name] = step(fn)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / args.iters
        results[name] = {"ms": round(ms, 4), "tb_per_s": round(moved / ms / 1e9, 3)}
        print(f"{name:20s} {ms:8.4f} ms per layer (fwd+bwd of q and k)  {moved / ms / 1e9:6.3f} TB/s", flush=True)
    worst = {}
    for i, what in enumerate(("q", "k", "dq_base", "dq_delta", "dk")):
        a, ref = outs["kobllla_fused_rope"][i].float(), outs["torchtune_compiled"][i].float()
        worst[what] = round(((a - ref).norm() / ref.norm()).item(), 8)
    results["relative_l2_vs_torchtune"] = worst
    results["speedup"] = round(results["torchtune_compiled"]["ms"] / results["kobllla_fused_rope"]["ms"], 3)
    print("relative L2 vs torchtune:", worst, " speedup:", results["speedup"], flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
