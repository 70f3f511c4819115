"""``attention: cudnn``: packs collated as document offsets, cuDNN's fused attention on the GPU.

On the CPU the same config runs through torchtune's attention with torchtune's dense block-causal
mask (built from the offsets), so these tests check everything but the kernel against torchtune:
the collate's tensors and masks, the model's numbers and gradients, the recipe's losses, and the
config checks. The kernel itself is checked on a GPU (``gpu`` tests at the end, run through the
device tool: output and gradients against an fp32 per-document reference, and compiled against
eager).
"""

from __future__ import annotations

import random

import pytest
import torch
from torchtune.data import padded_collate_packed

from kobllla import models
from kobllla.datasets import packed_collate, packed_varlen_collate
from kobllla.datasets._collate import packed_block_mask
from kobllla.models._cudnn_attention import varlen_mask
from kobllla.packed_documents import MAX_SEQLEN_MIN, PackedDocuments, packed_documents
from tests.conftest import REPO
from tests.test_losses import _recipe_losses
from tests.test_packed_collate import _packs, _random_seq_lens

SHAPE = dict(vocab_size=1000, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=512,
             intermediate_dim=128, lora_rank=4, lora_alpha=8)


@pytest.mark.parametrize("seq", [32, 256, 300])
def test_the_offsets_give_torchtunes_dense_mask_and_tensors(seq):
    rng = random.Random(seq)
    for batch in (1, 2, 3):
        for _ in range(3):
            lens = _random_seq_lens(rng, batch, seq)
            packs = _packs(lens, seq)
            ours, ref = packed_varlen_collate(packs), padded_collate_packed(packs)
            assert all(torch.equal(ours[k], ref[k]) for k in ("tokens", "labels", "input_pos"))
            docs = ours["mask"]
            assert isinstance(docs, PackedDocuments)
            assert torch.equal(docs.block_causal_mask(batch, seq), ref["mask"])
            flat = [n for row in lens for n in row]
            cu = docs.cu_seqlens.tolist()
            n = len(cu) - 1
            assert n >= len(flat) and n & (n - 1) == 0 and n < 2 * len(flat)  # a power of two, the rest empty
            assert cu[:len(flat) + 1] == [0, *torch.tensor(flat).cumsum(0).tolist()]
            assert cu[len(flat):] == [batch * seq] * (n - len(flat) + 1)
            assert max(flat) <= docs.max_seqlen <= max(max(flat), seq)
            m = docs.max_seqlen
            assert m == seq or (m & (m - 1) == 0 and m >= MAX_SEQLEN_MIN and m < 2 * max(*flat, MAX_SEQLEN_MIN))


def test_the_recipes_plumbing_keeps_the_documents():
    from torch.distributed.utils import _recursive_to
    from torchtune.utils import batch_to_device

    batch = packed_varlen_collate(_packs([[3, 5], [8]], 8))
    want = batch["mask"].cu_seqlens.tolist()
    batch_to_device(batch, torch.device("cpu"))  # refuses anything but tensors, dicts and BlockMasks
    assert isinstance(batch["mask"], PackedDocuments) and batch["mask"].max_seqlen == 8
    # FSDP2's root forward moves its kwargs with this, rebuilding each dict from its items
    _, kwargs = _recursive_to(((), {"mask": batch["mask"]}), torch.device("cpu"), False)[0]
    docs = kwargs["mask"]
    assert isinstance(docs, PackedDocuments) and docs.max_seqlen == 8 and docs.cu_seqlens.tolist() == want
    assert docs["max_seqlen"].numel() == 0  # a shape, no storage


def test_bad_packs_are_refused_with_the_pack_named():
    with pytest.raises(ValueError, match=r"^pack 1: seq_lens \[4, 3\] must be positive and sum to its 8 tokens"):
        packed_documents([[8], [4, 3]], 8)
    with pytest.raises(ValueError, match="pack=True"):
        packed_varlen_collate([{"tokens": torch.zeros(4), "labels": torch.zeros(4)}])


def test_the_graph_offsets_scale_each_tensors_token_stride():
    mask = varlen_mask(torch.tensor([0, 3, 7, 7], dtype=torch.int32), 128, num_heads=32, num_kv_heads=8,
                       head_dim=128)
    assert mask.seq_lens.flatten().tolist() == [3, 4, 0] and mask.seq_lens.dtype == torch.int32
    assert mask.q_offsets.flatten().tolist() == [0, 3 * 4096, 7 * 4096, 7 * 4096]
    assert mask.kv_offsets.flatten().tolist() == [0, 3 * 1024, 7 * 1024, 7 * 1024]
    assert mask.stats_offsets.flatten().tolist() == [0, 3 * 32, 7 * 32, 7 * 32]
    assert all(t.dtype == torch.int64 and t.shape == (4, 1, 1, 1)
               for t in (mask.q_offsets, mask.kv_offsets, mask.stats_offsets))


def _models():
    torch.manual_seed(0)
    ref = models.lora_llama3(["q_proj", "v_proj"], **SHAPE)
    for name, p in ref.named_parameters():
        if "lora_b" in name:  # torchtune zero-inits B: give the adapters something to differentiate
            torch.nn.init.normal_(p, std=0.02)
    ours = models.lora_llama3(["q_proj", "v_proj"], **SHAPE, attention="cudnn")
    ours.load_state_dict(ref.state_dict())
    for m in (ref, ours):
        for name, p in m.named_parameters():
            p.requires_grad_("lora" in name)
    return ref, ours


def test_the_model_computes_what_torchtunes_computes_on_the_dense_mask():
    ref_model, model = _models()
    lens = [[100, 28, 128], [256], [7, 200, 49]]
    packs = _packs(lens, 256)
    ours, ref = packed_varlen_collate(packs), padded_collate_packed(packs)
    out = model(ours["tokens"], mask=ours["mask"], input_pos=ours["input_pos"])
    want = ref_model(ref["tokens"], mask=ref["mask"], input_pos=ref["input_pos"])
    assert torch.equal(out, want)
    out.square().mean().backward()
    want.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == 8  # q and v adapters, A and B, of both layers
    for name, p in ref_model.named_parameters():
        if p.grad is not None:  # the q and v adapters' A gradients come from one matmul: another summation order
            assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-9), name


def test_a_cudnn_model_given_a_block_mask_names_the_collate_to_use():
    _, model = _models()
    batch = packed_collate(_packs([[100, 156]], 256))
    mask = packed_block_mask([[100, 156]], 256)  # what packed_collate gives on a GPU
    with pytest.raises(ValueError, match=r"attention: cudnn takes packs collated by `collate_fn: "
                                         r"kobllla.datasets.packed_varlen_collate`.*got a flex BlockMask"):
        model(batch["tokens"], mask=mask, input_pos=batch["input_pos"])


def test_an_unknown_attention_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="model.attention must be one of flex, flex_inline, cudnn, got 'fa3'"):
        models.lora_llama3(["q_proj", "v_proj"], **SHAPE, attention="fa3")


def test_a_gpu_without_what_cudnn_attention_needs_is_refused_with_the_way_out(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    with pytest.raises(ValueError, match=r"^model.attention: cudnn needs an Ampere or newer GPU \(compute capability "
                                         r">= 8.0\), got Tesla T4; use attention: flex_inline$"):
        models.lora_llama3(["q_proj", "v_proj"], **SHAPE, attention="cudnn")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setitem(__import__("sys").modules, "cudnn", None)  # the package not installed
    with pytest.raises(ValueError, match=r"^model.attention: cudnn needs the cudnn-frontend package .*pip install "
                                         r"'nvidia-cudnn-frontend==1.16.0', or use attention: flex_inline$"):
        models.lora_llama3(["q_proj", "v_proj"], **SHAPE, attention="cudnn")


def test_the_kernel_refuses_fp32_with_the_setting_to_change():
    from kobllla.models._cudnn_attention import _io_type

    with pytest.raises(TypeError, match=r"cudnn runs in bf16 or fp16, got torch.float32 \(set dtype: bf16\)"):
        _io_type(torch.float32)


def test_without_packs_the_model_is_torchtunes_causal_model():
    ref_model, model = _models()
    tokens = torch.randint(0, 1000, (2, 64))
    assert torch.equal(model(tokens), ref_model(tokens))


def test_config_check_pairs_cudnn_attention_with_the_varlen_collate():
    from omegaconf import OmegaConf

    from kobllla.cpu_bridge import check_packed_collate

    def check(text: str) -> None:
        cfg = OmegaConf.create(text)
        check_packed_collate(cfg, [cfg.dataset], config="c.yaml")

    check("model: {attention: cudnn}\ndataset: {pack: True}\ncollate_fn: kobllla.datasets.packed_varlen_collate")
    with pytest.raises(ValueError, match=r"^c.yaml: model.attention: cudnn needs packs collated by `collate_fn: "
                                         r"kobllla.datasets.packed_varlen_collate` with dataset.pack: True "
                                         r"\(got kobllla.datasets.packed_collate\)"):
        check("model: {attention: cudnn}\ndataset: {pack: True}\ncollate_fn: kobllla.datasets.packed_collate")
    with pytest.raises(ValueError, match=r"\(got none\)"):
        check("model: {attention: cudnn}\ndataset: {packed: True}")
    with pytest.raises(ValueError, match=r"only a model built with `attention: cudnn` reads"):
        check("model: {attention: flex_inline}\ndataset: {pack: True}\n"
              "collate_fn: kobllla.datasets.packed_varlen_collate")
    with pytest.raises(ValueError, match=r"needs every dataset built with pack: True"):
        check("model: {attention: cudnn}\ndataset: {packed: True}\n"
              "collate_fn: kobllla.datasets.packed_varlen_collate")
    bad = r"^c.yaml: model.attention must be one of flex, flex_inline, cudnn, got 'sdpa'$"
    with pytest.raises(ValueError, match=bad):
        check("model: {attention: sdpa}\ndataset: {pack: True}\ncollate_fn: kobllla.datasets.packed_collate")


@pytest.mark.integration  # two real `tune run`s (~25 CPU-s)
def test_stock_recipe_trains_the_same_with_cudnn_attention_and_the_varlen_collate(tmp_path, tiny_base):
    flex = _recipe_losses(tmp_path, tiny_base, "inlinepc")
    ours = _recipe_losses(tmp_path, tiny_base, "cudnn")
    assert len(flex) >= 2 and ours == flex and flex[0] != flex[-1]


# ---------------------------------------------------------------------------------------------
# On a GPU: the kernel against an fp32 reference (device tool: pytest -m gpu tests/test_cudnn_attention.py)
# ---------------------------------------------------------------------------------------------

def _reference(q, k, v, dout, lens):
    """fp32 causal attention document by document (k/v repeated per query head): out, dq, dk, dv."""
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lens:
        sl = slice(start, start + n)
        qq = q32[sl].transpose(0, 1)
        kk = k32[sl].transpose(0, 1).repeat_interleave(rep, dim=0)
        vv = v32[sl].transpose(0, 1).repeat_interleave(rep, dim=0)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True).transpose(0, 1))
        start += n
    out = torch.cat(outs)
    out.backward(dout.float())
    return out.detach(), q32.grad, k32.grad, v32.grad


@pytest.mark.gpu
def test_the_kernel_matches_an_fp32_reference_eager_and_compiled():
    from kobllla.models._cudnn_attention import attention

    rng = random.Random(0)
    seq, heads, kv_heads, dim = 4096, 32, 8, 128
    for lens in _random_seq_lens(rng, 2, seq):
        docs = packed_documents([lens], seq, "cuda")
        mask = varlen_mask(docs.cu_seqlens, docs.max_seqlen, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim)
        q = torch.randn(seq, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(seq, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(seq, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn(seq, heads, dim, device="cuda", dtype=torch.bfloat16)
        ref = _reference(q, k, v, dout, lens)
        compiled = torch.compile(lambda a, b, c, m: attention(a, b, c, m))
        for fn in (attention, compiled):
            q.grad = k.grad = v.grad = None
            out = fn(q, k, v, mask)
            out.backward(dout)
            for got, want in zip((out, q.grad, k.grad, v.grad), ref, strict=True):
                err = (got.float() - want).norm() / want.norm()
                assert err < 1e-2, (lens, float(err))


def _distributed_losses(tmp_path, tiny_base, attention: str, collate: str) -> list[float]:
    """The tiny stage-1 config through lora_finetune_distributed on 2 CPU ranks (FSDP2 over gloo)."""
    from omegaconf import OmegaConf

    from kobllla.corpora import constitution_articles, write_text_csv
    from tests.test_recipes_integration import logged_losses, tune_cpu, wait_ok

    cfg = OmegaConf.load(REPO / "configs/tiny/stage1_kowiki_lora.yaml")
    cfg.model._component_ = "kobllla.models.lora_llama3"
    cfg.model.attention = attention
    cfg.dataset.pop("packed")
    cfg.dataset.pack = True
    cfg.collate_fn = collate
    corpus = write_text_csv(tmp_path / f"ko-{attention}.csv", constitution_articles()[:12], repeat=6)
    path = tmp_path / f"{attention}.yaml"
    path.write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    out, log = tmp_path / f"out-{attention}", tmp_path / f"{attention}.log"
    args = ["lora_finetune_distributed", "--config", str(path), f"output_dir={out}",
            f"checkpointer.checkpoint_dir={tiny_base}", f"tokenizer.path={tiny_base}/original/tokenizer.model",
            f"dataset.data_files={corpus}", "max_steps_per_epoch=3"]
    wait_ok(tune_cpu(args, log), log)
    return [loss for _, loss in sorted(logged_losses(out).items())]


@pytest.mark.integration  # two 2-rank `tune run`s (~40 CPU-s)
def test_the_distributed_recipe_trains_the_same_with_cudnn_attention(tmp_path, tiny_base):
    flex = _distributed_losses(tmp_path, tiny_base, "flex_inline", "kobllla.datasets.packed_collate")
    ours = _distributed_losses(tmp_path, tiny_base, "cudnn", "kobllla.datasets.packed_varlen_collate")
    assert len(flex) == 3 and ours == flex and flex[0] != flex[-1]
