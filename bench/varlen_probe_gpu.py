"""Attention on packed documents at the Llama-3-8B shape: flex attention against varlen kernels (GPU).

One layer's attention, forward + backward, bf16, 32 query heads, 8 kv heads, head dim 128, packs of
4,096 tokens whose documents are drawn log-normal (median ~700 tokens, as the stage-1 benchmark's).
Providers, each where it imports:

- ``flex``: what the shipped config runs (k/v copied to 32 heads, ``flex_attention`` on the pack's
  ``BlockMask``, compiled), from the model's ``[b, s, h, d]`` layout;
- ``aten``: ``torch.ops.aten._cudnn_attention_forward`` with ``cum_seq_q/k`` (PyTorch's own cuDNN
  ragged path), on ``[tokens, heads, dim]``;
- ``cudnn``: the cudnn-frontend package's ``torch.ops.cudnn.sdpa_fwd`` (THD varlen, GQA, differentiable);
- ``fa2``: ``torch.ops.aten._flash_attention_forward`` varlen (FlashAttention-2, GQA);
- ``kobllla``: kobllla's ops (``attention: cudnn``) under several graph-key roundings;
- ``plans``: every execution plan cuDNN offers for kobllla's graphs, each timed.

For each: the median of CUDA-event timings over the packs, the first call's time per new layout
(graph builds), and the largest error of output and gradients against an fp32 per-document reference
on one pack (flex's own error printed beside it for scale).

    python3 bench/varlen_probe_gpu.py --out OUT/probe.json --providers flex,aten,fa2,cudnn
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.layer_probe_gpu import lognormal_seq_lens as lognormal_packs  # noqa: E402

H, HKV, D, SEQ = 32, 8, 128, 4096


def cu_of(lens: list[int], device="cuda") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def timed(fn, n_layouts: int, iters: int) -> dict:
    firsts = []
    for i in range(n_layouts):  # first call per layout: graph builds, compiles
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(i)
        torch.cuda.synchronize()
        firsts.append(time.perf_counter() - t0)
    for i in range(3):
        fn(i)
    times = []
    for it in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(it % n_layouts)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    # host time of one call (launch overhead), synchronised before and after
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for it in range(iters):
        fn(it % n_layouts)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / iters * 1e3
    return {"median_ms": times[len(times) // 2], "min_ms": times[0], "wall_per_call_ms": wall,
            "first_call_s": [round(x, 4) for x in firsts]}


def kernel_ms(fn, n_layouts: int, iters: int = 10) -> float:
    """GPU kernel time per call (sum of kernel durations under the profiler, gaps excluded)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for it in range(iters):
            fn(it % n_layouts)
        torch.cuda.synchronize()
    total_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    tops = sorted(((e.device_time_total / iters, e.key[:90]) for e in prof.key_averages()
                   if e.device_type.name == "CUDA"), reverse=True)[:6]
    return total_us / iters / 1e3, [(round(t, 1), k) for t, k in tops]


def reference(q, k, v, dout, lens):
    """fp32 per-document causal attention (GQA by copying k/v): out, dq, dk, dv in [T, H, D]."""
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    outs, start = [], 0
    for n in lens:
        sl = slice(start, start + n)
        qq = q32[sl].transpose(0, 1)[None]
        kk = k32[sl].transpose(0, 1).repeat_interleave(H // HKV, dim=0)[None]
        vv = v32[sl].transpose(0, 1).repeat_interleave(H // HKV, dim=0)[None]
        outs.append(F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)[0].transpose(0, 1))
        start += n
    out = torch.cat(outs)
    out.backward(dout.float())
    return out.detach(), q32.grad, k32.grad, v32.grad


def errors(got, ref) -> dict:
    names = ("out", "dq", "dk", "dv")
    res = {}
    for name, a, b in zip(names, got, ref, strict=True):
        a = a.float()
        res[name] = {"max_abs": (a - b).abs().max().item(), "rel_l2": ((a - b).norm() / b.norm()).item()}
    return res


def provider_flex(q, k, v, dout, packs):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    masks = []
    for lens in packs:
        doc = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))

        def mask_mod(b, h, qi, ki, doc=doc):
            return (qi >= ki) & (doc[qi] == doc[ki])

        masks.append(create_block_mask(mask_mod, 1, None, SEQ, SEQ, device="cuda"))

    @torch.compile(dynamic=False)
    def attn(q4, k4, v4, mask):  # the model's path: [b, s, h, d] in, k/v copied to 32 heads
        qt, kt, vt = q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2)
        kt = kt.unsqueeze(2).expand(1, HKV, H // HKV, SEQ, D).flatten(1, 2)
        vt = vt.unsqueeze(2).expand(1, HKV, H // HKV, SEQ, D).flatten(1, 2)
        return flex_attention(qt, kt, vt, block_mask=mask).transpose(1, 2)

    q4, k4, v4 = (t.detach()[None].requires_grad_() for t in (q, k, v))

    def run(i):
        q4.grad = k4.grad = v4.grad = None
        attn(q4, k4, v4, masks[i]).backward(dout[None])

    run(0)
    got = (attn(q4, k4, v4, masks[0])[0].detach(), q4.grad[0], k4.grad[0], v4.grad[0])
    return run, got


def provider_aten(q, k, v, dout, packs, *, gqa=True, max_mode="exact"):
    cus = [cu_of(p) for p in packs]
    maxes = [max(p) if max_mode == "exact" else SEQ for p in packs]
    kk, vv = k, v
    if not gqa:
        kk = k.repeat_interleave(H // HKV, dim=1)
        vv = v.repeat_interleave(H // HKV, dim=1)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, kk, vv))
    info = {}

    def fwd(i):
        return torch.ops.aten._cudnn_attention_forward(
            qg, kg, vg, None, cus[i], cus[i], maxes[i], maxes[i], True, 0.0, True, False, scale=None)

    r = fwd(0)
    info["out_shape"] = list(r[0].shape)
    info["lse_shape"] = list(r[1].shape)
    info["lse_stride"] = list(r[1].stride())
    info["autograd"] = r[0].grad_fn is not None
    info["schema_fwd"] = str(torch.ops.aten._cudnn_attention_forward.default._schema)
    info["schema_bwd"] = str(torch.ops.aten._cudnn_attention_backward.default._schema)

    def run(i):
        out, lse, _, _, _, _, seed, off, _ = fwd(i)
        if out.grad_fn is not None:
            qg.grad = kg.grad = vg.grad = None
            out.backward(dout)
            return qg.grad, kg.grad, vg.grad, out
        grads = torch.ops.aten._cudnn_attention_backward(
            dout, qg, kg, vg, out, lse, seed, off, None, cus[i], cus[i], maxes[i], maxes[i], 0.0, True, scale=None)
        return (*grads, out)

    dq, dk, dv, out = run(0)
    if not gqa:
        dk = dk.view(SEQ, HKV, H // HKV, D).sum(2)
        dv = dv.view(SEQ, HKV, H // HKV, D).sum(2)
    return run, (out.detach(), dq, dk, dv), info


def provider_fa2(q, k, v, dout, packs):
    cus = [cu_of(p) for p in packs]
    maxes = [max(p) for p in packs]
    scale = 1.0 / math.sqrt(D)

    def run(i):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cus[i], cus[i], maxes[i], maxes[i], 0.0, True, False, scale=scale)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, cus[i], cus[i], maxes[i], maxes[i], 0.0, True, rng, unused, scale=scale)
        return dq, dk, dv, out

    dq, dk, dv, out = run(0)
    return run, (out, dq, dk, dv)


def provider_cudnn(q, k, v, dout, packs, *, max_mode="exact", bucket_b=False):
    import cudnn  # noqa: F401
    import cudnn.sdpa.fwd.torch_op  # noqa: F401 - registers torch.ops.cudnn.sdpa_fwd/bwd

    cus, maxes = [], []
    for p in packs:
        lens = list(p)
        if bucket_b:
            n = 1 << (len(lens) - 1).bit_length()
            lens = lens + [0] * (n - len(lens))
        cus.append(cu_of(lens))
        if max_mode == "exact":
            maxes.append(max(p))
        elif max_mode == "pow2":
            maxes.append(1 << (max(p) - 1).bit_length())
        else:
            maxes.append(SEQ)
    scale = 1.0 / math.sqrt(D)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def run(i):
        qg.grad = kg.grad = vg.grad = None
        out, _ = torch.ops.cudnn.sdpa_fwd(qg, kg, vg, scale, is_causal=True, cu_seqlens_q=cus[i],
                                          cu_seqlens_kv=cus[i], max_seqlen_q=maxes[i], max_seqlen_kv=maxes[i],
                                          return_lse=True)
        out.backward(dout)
        return out

    out = run(0)
    info = {"version": getattr(cudnn, "__version__", "?"), "backend_version": cudnn.backend_version()}
    return run, (out.detach(), qg.grad, kg.grad, vg.grad), info


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def provider_kobllla(q, k, v, dout, packs, *, docs="pow2", smax="pow2"):
    from kobllla.models._cudnn_attention import attention, varlen_mask

    masks = []
    for p in packs:
        n = _pow2(len(p)) if docs == "pow2" else len(p)
        s = {"pow2": _pow2(max(p)), "exact": max(p), "total": SEQ, "r128": -(-max(p) // 128) * 128}[smax]
        masks.append(varlen_mask(cu_of(list(p) + [0] * (n - len(p))), s, num_heads=H, num_kv_heads=HKV, head_dim=D))
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def run(i):
        qg.grad = kg.grad = vg.grad = None
        out = attention(qg, kg, vg, masks[i])
        out.backward(dout)
        return out

    out = run(0)
    got = (out.detach(), qg.grad, kg.grad, vg.grad)

    # the same inside torch.compile, as a compiled layer calls it: recompiles over layouts, same numbers
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda a, b, c, m: attention(a * 1.0, b, c, m) * 1.0)
    info = {}
    for i in range(len(packs)):
        qg.grad = kg.grad = vg.grad = None
        compiled(qg, kg, vg, masks[i]).backward(dout)
        if i == 0:
            info["compiled_vs_eager_max_abs_dq"] = (qg.grad - got[1]).abs().max().item()
    info["compile_stats"] = dict(counters["stats"])
    info["docs_bucketed"] = [m.seq_lens.shape[0] for m in masks]
    return run, got, info


def cudnn_plans(q, k, v, dout, packs, iters: int = 20) -> dict:
    """Every execution plan cuDNN offers for kobllla's forward and backward graphs of one pack (heuristic
    modes A, B and FALLBACK), each timed on its own, with its kernels and its outputs against the plan
    kobllla uses."""
    import cudnn

    from kobllla.models import _cudnn_attention as ca

    p = packs[0]
    n, s = _pow2(len(p)), -(-max(p) // 128) * 128
    m = ca.varlen_mask(cu_of(list(p) + [0] * (n - len(p))), s, num_heads=H, num_kv_heads=HKV, head_dim=D)
    scale = 1.0 / math.sqrt(D)
    out, stats = ca.thd_attention(q, k, v, m.seq_lens, s, m.q_offsets, m.kv_offsets, m.stats_offsets, scale)
    ref_grads = ca.thd_attention_backward(dout, q, k, v, out, stats, m.seq_lens, s, m.q_offsets, m.kv_offsets,
                                          m.stats_offsets, scale)
    common = {"seq": m.seq_lens, "off_q": m.q_offsets, "off_kv": m.kv_offsets, "off_st": m.stats_offsets,
              "q": q, "k": k, "v": v}
    handle = ca._handle(q.device)
    res = {}
    for kind in ("fwd", "bwd"):
        key = (kind, q.dtype, n, H, HKV, s, D, scale, -(-SEQ // 64) * 64, q.device)
        entry = res[kind] = {"plans": []}
        try:
            g, tensors = ca._define(key, handle)
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
            try:
                g.check_support()
            except Exception as exc:  # noqa: BLE001
                entry["check_support"] = f"{type(exc).__name__}: {exc}"[:300]
            count = g.get_execution_plan_count()
        except Exception as exc:  # noqa: BLE001
            entry["error"] = f"{type(exc).__name__}: {exc}"[:600]
            continue
        for i in range(count):
            plan = {"index": i}
            entry["plans"].append(plan)
            try:
                plan["name"] = g.get_plan_name_at_index(i)
                g.build_plan_at_index(i)
                ws = g.get_workspace_size_plan_at_index(i)
                plan["workspace_mib"] = round(ws / 2**20, 1)
                workspace = torch.empty(max(ws, 1), dtype=torch.uint8, device=q.device)
                if kind == "fwd":
                    bufs = {**common, "o": torch.empty_like(q), "stats": torch.empty_like(stats)}
                    check = [("o", bufs["o"], out)]
                else:
                    bufs = {**common, "o": out, "do": dout, "stats": stats, "dq": torch.empty_like(q),
                            "dk": torch.empty_like(k), "dv": torch.empty_like(v)}
                    check = [(nm, bufs[nm], r) for nm, r in zip(("dq", "dk", "dv"), ref_grads, strict=True)]
                pack = {tensors[nm]: buf for nm, buf in bufs.items()}

                def fn(_i, pack=pack, workspace=workspace, i=i, g=g):
                    g.execute_plan_at_index(pack, workspace, i, handle=handle)

                fn(0)
                torch.cuda.synchronize()
                plan["max_abs_vs_kobllla"] = {nm: (a.float() - r.float()).abs().max().item() for nm, a, r in check}
                t = timed(fn, 1, iters)
                plan["median_ms"], plan["min_ms"] = t["median_ms"], t["min_ms"]
                plan["kernel_ms"], plan["top_kernels_us"] = kernel_ms(fn, 1)
            except Exception as exc:  # noqa: BLE001 - a probe: record what failed and go on
                plan["error"] = f"{type(exc).__name__}: {exc}"[:400]
            print(kind, json.dumps(plan)[:700], flush=True)
    return res


def compile_check_cudnn(q, k, v, dout, packs) -> dict:
    """The cudnn op inside torch.compile (as a model layer would call it): recompiles over layouts."""
    import cudnn.sdpa.fwd.torch_op  # noqa: F401

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    scale = 1.0 / math.sqrt(D)
    w = torch.randn(H * D, H * D, device="cuda", dtype=torch.bfloat16) * 0.01

    @torch.compile
    def layer(x, cu, max_t):
        qq = (x @ w).view(SEQ, H, D)
        out, _ = torch.ops.cudnn.sdpa_fwd(qq, k, v, scale, is_causal=True, cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                          max_seqlen_q=max_t, max_seqlen_kv=max_t, return_lse=True)
        return out.reshape(SEQ, H * D) @ w

    x = torch.randn(SEQ, H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    res = {}
    for i, p in enumerate(packs[:4]):
        layer(x, cu_of(p), SEQ).sum().backward()
        res[f"after_{i}"] = dict(counters["stats"])
    torch.cuda.synchronize()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--providers", default="flex,aten,fa2,cudnn")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--packs", type=int, default=8)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    packs = lognormal_packs(args.packs, SEQ)
    q = torch.randn(SEQ, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(SEQ, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(SEQ, HKV, D, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(SEQ, H, D, device="cuda", dtype=torch.bfloat16)
    ref = reference(q, k, v, dout, packs[0])
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn_backend": torch.backends.cudnn.version(), "docs_per_pack": [len(x) for x in packs],
              "max_doc_per_pack": [max(x) for x in packs], "runs": {}}
    print(json.dumps({k_: result[k_] for k_ in ("device", "torch", "cudnn_backend", "docs_per_pack")}), flush=True)
    variants = []
    for prov in args.providers.split(","):
        if prov == "flex":
            variants.append(("flex", lambda: provider_flex(q, k, v, dout, packs)))
        elif prov == "aten":
            variants += [("aten_gqa_exact", lambda: provider_aten(q, k, v, dout, packs)),
                         ("aten_expand_exact", lambda: provider_aten(q, k, v, dout, packs, gqa=False)),
                         ("aten_gqa_max4096", lambda: provider_aten(q, k, v, dout, packs, max_mode="full"))]
        elif prov == "fa2":
            variants.append(("fa2_gqa_exact", lambda: provider_fa2(q, k, v, dout, packs)))
        elif prov == "kobllla":
            for d_, s_ in (("pow2", "total"), ("pow2", "pow2"), ("exact", "exact"), ("pow2", "r128")):
                variants.append((f"kobllla_docs{d_}_s{s_}",
                                 lambda d_=d_, s_=s_: provider_kobllla(q, k, v, dout, packs, docs=d_, smax=s_)))
        elif prov == "plans":
            variants.append(("cudnn_plans", "plans"))
        elif prov == "cudnn":
            variants += [("cudnn_exact", lambda: provider_cudnn(q, k, v, dout, packs)),
                         ("cudnn_max4096", lambda: provider_cudnn(q, k, v, dout, packs, max_mode="full")),
                         ("cudnn_bucketb_max4096", lambda: provider_cudnn(q, k, v, dout, packs, max_mode="full",
                                                                          bucket_b=True)),
                         ("cudnn_bucketb_pow2", lambda: provider_cudnn(q, k, v, dout, packs, max_mode="pow2",
                                                                       bucket_b=True)),
                         ("cudnn_compile", None)]
    for name, make in variants:
        try:
            if make is None:
                r = {"compile": compile_check_cudnn(q, k, v, dout, packs)}
            elif make == "plans":
                r = cudnn_plans(q, k, v, dout, packs)
            else:
                built = make()
                run, got = built[0], built[1]
                r = {"errors_vs_fp32": errors(got, ref), **(built[2] if len(built) > 2 else {})}
                r.update(timed(run, len(packs), args.iters))
                try:
                    r["kernel_ms"], r["top_kernels_us"] = kernel_ms(run, len(packs))
                except Exception as exc:  # noqa: BLE001
                    r["kernel_ms_error"] = f"{type(exc).__name__}: {exc}"[:300]
        except Exception as exc:  # noqa: BLE001 - a probe: record what failed and go on
            r = {"error": f"{type(exc).__name__}: {exc}"[:1500], "trace": traceback.format_exc()[-2500:]}
        result["runs"][name] = r
        print(name, json.dumps(r)[:1500], flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
