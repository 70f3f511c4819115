"""Where a stage-1 step's time goes at the Llama-3-8B shape: one decoder layer, its attention, the output.

Times forward + backward (frozen base, LoRA q/v r8, bf16, seq 4096, batch 1, the recipe's
per-layer ``compile``) on CUDA with events, on packed document masks (torchtune's
``packed_block_causal_mask``) whose document lengths are read from the benchmark's packs
(``--packs``, the ``packs.npz`` of bench/train_gpu.py) or drawn log-normal. Variants:

- layers: kobllla.models' options (``stock`` = torchtune's layer, ``fuse`` = fused q/k/v and gate/up,
  ``inline`` = flex attention traced into the layer's graph, ``fp8`` = float8 base matmuls, and their
  combinations);
- attention alone: torchtune's call (k/v copied to 32 heads, compiled flex), flex with GQA,
  ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 kernels, per-document lengths) and,
  as a reference without document masking, SDPA causal (flash, cuDNN);
- the 4,096 x 4,096 -> 128,256 output projection forward + input gradient in bf16 and float8.

One kernel-level profile (torch.profiler, top kernels by CUDA time) of the stock and the fastest
fp8 layer is written beside the JSON. Usage (GPU machine, wheels as in bench/train_gpu.sh)::

    python3 bench/layer_probe_gpu.py --out OUT [--packs /tmp/kobllla-bench-train/packs.npz]
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPE = dict(vocab_size=1024, num_layers=1, num_heads=32, num_kv_heads=8, embed_dim=4096, max_seq_len=8192,
             intermediate_dim=14336, norm_eps=1e-5, rope_base=500_000, lora_rank=8, lora_alpha=16)
LAYER_VARIANTS = {
    "stock": {},
    "inline": dict(attention="flex_inline"),
    "fuse": dict(fuse_projections=True),
    "fuse+inline": dict(fuse_projections=True, attention="flex_inline"),
    "fp8": dict(fp8=True),
    "fp8+fuse": dict(fp8=True, fuse_projections=True),
    "fp8+fuse+inline": dict(fp8=True, fuse_projections=True, attention="flex_inline"),
}


def seq_lens_from_packs(path: Path, n: int) -> list[list[int]]:
    import numpy as np

    pos = np.load(path)["input_pos"][:n]
    out = []
    for row in pos:
        starts = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1] + 1] + [len(row)]
        out.append([b - a for a, b in zip(starts, starts[1:], strict=False)])
    return out


def lognormal_seq_lens(n: int, seq: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    packs, cur = [], []
    while len(packs) < n:
        length = int(torch.exp(torch.randn(1, generator=g) * 0.9 + 6.5).clamp(16, 3 * seq))
        while length > 0:
            take = min(length, seq - sum(cur))
            cur.append(take)
            length -= take
            if sum(cur) == seq:
                packs.append(cur)
                cur = []
    return packs


def timed(fn, *, iters: int, warmup: int) -> float:
    """Median ms of ``fn()`` over ``iters`` calls after ``warmup`` (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def masks_for(seq_lens: list[list[int]]):
    from torchtune.modules.attention_utils import packed_block_causal_mask

    out = []
    for lens in seq_lens:
        mask = packed_block_causal_mask([torch.tensor(lens)])
        pos = torch.cat([torch.arange(n) for n in lens])[None].cuda()
        out.append((mask, pos, lens))
    return out


def build_layer(opts: dict):
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from kobllla import models

    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = models.lora_llama3(["q_proj", "v_proj"], **SHAPE, **opts)
        finally:
            torch.set_default_dtype(torch.float32)
    set_trainable_params(model, get_adapter_params(model))
    layer = model.layers[0]
    layer.compile()  # what torchtune's training.compile_model does per layer
    return layer


def layer_variant_ms(name: str, opts: dict, masks: list, *, iters: int) -> dict:
    layer = build_layer(opts)
    h = torch.randn(1, 4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(h) * 1e-3
    state = {"i": 0}

    def step():
        mask, pos, _ = masks[state["i"] % len(masks)]
        state["i"] += 1
        out = layer(h, mask=mask, input_pos=pos)
        out.backward(grad)

    t0 = time.time()
    step()
    torch.cuda.synchronize()
    first = time.time() - t0
    ms = timed(step, iters=iters, warmup=3)
    torch.cuda.reset_peak_memory_stats()
    return {"variant": name, "opts": opts, "ms": ms, "first_call_s": first, "layer": layer, "step": step}


def profile(step, path: Path) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    path.write_text(p.key_averages().table(sort_by="cuda_time_total", row_limit=30), encoding="utf-8")


def attention_ms(masks: list, *, iters: int) -> dict:
    from torch.nn.attention.flex_attention import flex_attention
    from torchtune.modules.attention_utils import _sdpa_or_flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def _flex_gqa(q, k, v, m):
        return compiled(q, k, v, block_mask=m, enable_gqa=True)

    q = torch.randn(1, 32, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    go = torch.randn_like(q)
    tt = _sdpa_or_flex_attention()
    st = {"i": 0}

    def mask():
        m = masks[st["i"] % len(masks)]
        st["i"] += 1
        return m

    def run_tt():
        m, _, _ = mask()
        ke = k.unsqueeze(2).expand(1, 8, 4, 4096, 128).flatten(1, 2)
        ve = v.unsqueeze(2).expand(1, 8, 4, 4096, 128).flatten(1, 2)
        tt(q, ke, ve, mask=m, dropout_p=0.0, is_causal=False).backward(go)

    def run_gqa():
        m, _, _ = mask()
        _flex_gqa(q, k, v, m).backward(go)

    res = {"torchtune_flex_expand": timed(run_tt, iters=iters, warmup=3),
           "flex_gqa": timed(run_gqa, iters=iters, warmup=3)}
    try:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        qv = q.detach().transpose(1, 2)[0].contiguous().requires_grad_(True)
        kv = k.detach().transpose(1, 2)[0].contiguous().requires_grad_(True)
        vv = v.detach().transpose(1, 2)[0].contiguous().requires_grad_(True)
        gv = go.transpose(1, 2)[0].contiguous()
        kw = {}
        if "window_size" in params:
            kw["window_size"] = (-1, 0)
        else:
            kw["is_causal"] = True
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        cus = [torch.tensor([0] + torch.tensor(m[2]).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
               for m in masks]

        def run_varlen():
            cu = cus[st["i"] % len(cus)]
            st["i"] += 1
            varlen_attn(qv, kv, vv, cu, cu, 4096, 4096, **kw).backward(gv)

        res["varlen_fa2"] = timed(run_varlen, iters=iters, warmup=3)
        res["varlen_signature"] = str(inspect.signature(varlen_attn))
        # the same numbers as flex on one mask?
        m, _, lens = masks[0]
        cu = cus[0]
        a = varlen_attn(qv, kv, vv, cu, cu, 4096, 4096, **kw).float()
        b = _flex_gqa(q, k, v, m).transpose(1, 2)[0].float()
        res["varlen_vs_flex_max_abs"] = (a - b).abs().max().item()
    except Exception as e:  # noqa: BLE001 - a probe: record what failed
        res["varlen_error"] = f"{type(e).__name__}: {e}"[:400]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ke = k.detach().unsqueeze(2).expand(1, 8, 4, 4096, 128).flatten(1, 2).requires_grad_(True)
    ve = v.detach().unsqueeze(2).expand(1, 8, 4, 4096, 128).flatten(1, 2).requires_grad_(True)
    for name, backend in (("sdpa_causal_flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa_causal_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            def run(backend=backend):
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True).backward(go)
            res[name] = timed(run, iters=iters, warmup=3)
        except Exception as e:  # noqa: BLE001
            res[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
    return res


def output_ms(*, iters: int) -> dict:
    from torch import nn

    from kobllla.models._fp8 import convert_frozen_linears_to_fp8

    h = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    res = {}
    for name in ("bf16", "fp8"):
        lin = nn.Linear(4096, 128256, bias=False, device="cuda", dtype=torch.bfloat16)
        lin.weight.requires_grad_(False)
        if name == "fp8":
            convert_frozen_linears_to_fp8(lin)
        g = torch.randn(4096, 128256, device="cuda", dtype=torch.bfloat16) * 1e-3
        res[name] = timed(lambda lin=lin, g=g: lin(h).backward(g), iters=iters, warmup=3)
        del lin, g
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--packs", default="")
    p.add_argument("--n-masks", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--only", default="", help="comma-separated layer variants (default: all)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    packs = Path(args.packs) if args.packs else None
    seq_lens = (seq_lens_from_packs(packs, args.n_masks) if packs and packs.exists()
                else lognormal_seq_lens(args.n_masks, 4096))
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "seq_lens_source": str(packs) if packs and packs.exists() else "lognormal",
                 "docs_per_pack": [len(x) for x in seq_lens],
                 "attention_density": [sum(n * (n + 1) / 2 for n in x) / (4096 * 4097 / 2) for x in seq_lens]}
    masks = masks_for(seq_lens)

    def save():
        (out / "layer_probe.json").write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")

    for key, fn in (("attention_ms", attention_ms), ("output_projection_ms", output_ms)):
        try:
            res[key] = fn(masks, iters=args.iters) if key == "attention_ms" else fn(iters=args.iters)
        except Exception as e:  # noqa: BLE001 - a probe: record what failed, go on
            res[key] = {"error": f"{type(e).__name__}: {e}"[:600]}
        print(key, res[key], flush=True)
        torch.cuda.empty_cache()
        save()
    names = [n for n in LAYER_VARIANTS if not args.only or n in args.only.split(",")]
    res["layer_ms"] = {}
    for name in names:
        try:
            r = layer_variant_ms(name, LAYER_VARIANTS[name], masks, iters=args.iters)
        except Exception as e:  # noqa: BLE001
            res["layer_ms"][name] = {"error": f"{type(e).__name__}: {e}"[:600]}
            print("layer", name, res["layer_ms"][name], flush=True)
            save()
            continue
        res["layer_ms"][name] = {"ms": r["ms"], "first_call_s": r["first_call_s"],
                                 "x32_layers_ms": 32 * r["ms"]}
        print("layer", name, res["layer_ms"][name], flush=True)
        if name in ("stock", "fp8+fuse+inline"):
            profile(r["step"], out / f"profile_{name.replace('+', '_')}.txt")
        del r
        torch.cuda.empty_cache()
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
