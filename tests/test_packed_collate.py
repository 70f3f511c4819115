"""kobllla.datasets.packed_collate: torchtune's packed batches, the document mask built without host syncs.

The flex ``BlockMask`` is compared table by table with ``create_block_mask`` on torchtune's own
mask_mod (the reference torchtune's ``padded_collate_packed`` calls), and flex attention through
it with SDPA on torchtune's dense block-causal mask. The recipe test runs the stock ``tune run``
with ``pack: True`` + ``collate_fn`` against ``packed: True``.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torchtune.data import padded_collate_packed
from torchtune.modules.attention_utils import create_block_causal_mask

from kobllla.datasets import kowikitext_dataset, packed_collate
from kobllla.datasets._collate import document_ids, packed_block_mask
from tests.test_losses import _recipe_losses

TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def _random_seq_lens(rng: random.Random, batch: int, seq: int) -> list[list[int]]:
    out = []
    for _ in range(batch):
        lens, left = [], seq
        while left:
            n = min(left, rng.choice([1, 5, 64, 127, 128, 129, 200, 500, 1000, 3000]))
            lens.append(n)
            left -= n
        out.append(lens)
    return out


def _torchtune_block_mask(seq_lens: list[list[int]], seq: int):
    """What torchtune's packed_block_causal_mask builds, on the CPU (it hard-codes cuda)."""
    doc = torch.from_numpy(document_ids(seq_lens, seq)).long()

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    return create_block_mask(mask_mod, len(seq_lens), None, seq, seq, device="cpu")


@pytest.mark.parametrize("seq", [128, 256, 300, 1024, 2125])
def test_block_tables_equal_create_block_mask_on_torchtunes_mask(seq):
    rng = random.Random(seq)
    for batch in (1, 2, 3):
        for _ in range(4):
            lens = _random_seq_lens(rng, batch, seq)
            ref, got = _torchtune_block_mask(lens, seq), packed_block_mask(lens, seq)
            for name in TABLES:
                r, g = getattr(ref, name), getattr(got, name)
                assert r.dtype == g.dtype and torch.equal(r, g), (name, lens)
            assert got.seq_lengths == ref.seq_lengths == (seq, seq) and got.BLOCK_SIZE == ref.BLOCK_SIZE


def test_flex_attention_through_the_mask_equals_sdpa_on_torchtunes_dense_mask():
    # forward only: flex attention has no backward on the CPU (the GPU benchmark compares losses)
    torch.manual_seed(0)
    seq, lens = 384, [[100, 28, 256], [384]]
    q, k, v = (torch.randn(2, 2, seq, 16) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=packed_block_mask(lens, seq))
    dense = create_block_causal_mask([torch.tensor(x) for x in lens])[:, None]  # [b, 1, s, s] bool
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    assert torch.allclose(out, ref, atol=1e-5)
    wrong = flex_attention(q, k, v, block_mask=packed_block_mask([[384], [384]], seq))  # no document mask
    assert not torch.allclose(wrong, ref, atol=1e-3)


def _packs(lens: list[list[int]], seq: int) -> list[dict]:
    out = []
    for row in lens:
        tokens = torch.randint(1, 1000, (seq,))
        pos = torch.cat([torch.arange(n) for n in row])
        out.append({"tokens": tokens, "labels": tokens.clone(), "input_pos": pos, "seq_lens": torch.tensor(row)})
    return out


def test_without_flex_attention_it_is_torchtunes_collate_exactly():
    batch = _packs([[10, 22], [32]], 32)
    ours, ref = packed_collate(batch, padding_idx=0, ignore_idx=-100), padded_collate_packed(batch)
    assert ours.keys() == ref.keys() == {"tokens", "labels", "input_pos", "mask"}
    assert all(torch.equal(ours[k], ref[k]) for k in ours)


def test_bad_packs_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="sum to its 32 tokens"):
        document_ids([[10, 20]], 32)
    with pytest.raises(ValueError, match="pack=True"):
        packed_collate([{"tokens": torch.zeros(4), "labels": torch.zeros(4)}])


def test_pack_dataset_is_torchtunes_packs_and_refuses_packed_too(llama3_tok, assets):
    kw = dict(source="csv", data_files=str(assets / "kowiki_tiny.csv"), max_seq_len=32)
    with pytest.raises(ValueError, match=r"kowikitext_dataset: set dataset.packed \(torchtune's collate\) or "
                                         r"dataset.pack \(with collate_fn: kobllla.datasets.packed_collate\), "
                                         r"not both"):
        kowikitext_dataset(llama3_tok, packed=True, pack=True, **kw)
    ds = kowikitext_dataset(llama3_tok, pack=True, **kw)
    ref = kowikitext_dataset(llama3_tok, packed=True, **kw)
    assert len(ds) == len(ref) > 4
    # read directly (stats, tests): every item, no loader to check, nothing refused
    assert all(torch.equal(ds[i][k], ref[i][k]) for i in range(len(ref)) for k in ref[i])


def test_pack_dataset_refuses_a_data_loader_with_another_collate_at_its_first_batch(llama3_tok, assets):
    from functools import partial

    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchtune.data import padded_collate_sft

    kw = dict(source="csv", data_files=str(assets / "kowiki_tiny.csv"), max_seq_len=32)
    wrong = partial(padded_collate_sft, padding_idx=0, ignore_idx=-100)  # what the recipe passes by default
    loader = StatefulDataLoader(kowikitext_dataset(llama3_tok, pack=True, **kw), batch_size=2, collate_fn=wrong)
    with pytest.raises(RuntimeError, match=r"the data loader collates with padded_collate_sft; add `collate_fn: "
                                           r"kobllla.datasets.packed_collate` to the config"):
        next(iter(loader))
    right = partial(packed_collate, padding_idx=0, ignore_idx=-100)
    ds = kowikitext_dataset(llama3_tok, pack=True, **kw)
    ds[0]  # a direct read first does not switch the check off
    with pytest.raises(RuntimeError, match="collates with padded_collate_sft"):
        next(iter(StatefulDataLoader(ds, batch_size=2, collate_fn=wrong)))
    batches = list(StatefulDataLoader(ds, batch_size=2, collate_fn=right))
    ref = list(StatefulDataLoader(kowikitext_dataset(llama3_tok, packed=True, **kw), batch_size=2,
                                  collate_fn=padded_collate_packed))
    assert len(batches) == len(ref) > 1
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, ref, strict=True) for k in a)


@pytest.mark.integration  # two real `tune run`s (~25 CPU-s)
def test_stock_recipe_trains_the_same_with_pack_and_packed_collate(tmp_path, tiny_base):
    stock = _recipe_losses(tmp_path, tiny_base, "stock")
    ours = _recipe_losses(tmp_path, tiny_base, "stockpc")
    assert len(stock) >= 2 and ours == stock


def test_config_check_pairs_pack_with_packed_collate():
    from omegaconf import OmegaConf

    from kobllla.cpu_bridge import check_packed_collate

    def check(text: str) -> None:
        cfg = OmegaConf.create(text)
        check_packed_collate(cfg, [cfg.dataset], config="c.yaml")

    check("dataset: {pack: True}\ncollate_fn: kobllla.datasets.packed_collate")
    check("dataset: {packed: True}")
    with pytest.raises(ValueError, match=r"^c.yaml: dataset.pack: True needs `collate_fn: kobllla.datasets."
                                         r"packed_collate` at the config's top level \(got none\)"):
        check("dataset: {pack: True}")
    with pytest.raises(ValueError, match=r"needs every dataset built with pack: True"):
        check("dataset: {packed: True}\ncollate_fn: kobllla.datasets.packed_collate")


def test_the_flex_branch_gives_torchtunes_tensors_and_block_tables(monkeypatch):
    # the GPU branch, run on the CPU: the same tensors as padded_collate_packed and the BlockMask
    # torchtune would build (its own mask is dense on the CPU, so compare with create_block_mask)
    monkeypatch.setattr("kobllla.datasets._collate._flex_device", lambda: torch.device("cpu"))
    lens = [[100, 28, 128], [256]]
    batch = _packs(lens, 256)
    ours, ref = packed_collate(batch, padding_idx=0, ignore_idx=-100), padded_collate_packed(batch)
    assert all(torch.equal(ours[k], ref[k]) for k in ("tokens", "labels", "input_pos"))
    want = _torchtune_block_mask(lens, 256)
    assert all(torch.equal(getattr(ours["mask"], name), getattr(want, name)) for name in TABLES)
