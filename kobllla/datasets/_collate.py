"""Collation of packs with the document mask built for the device, without host syncs.

torchtune 0.6.1's ``padded_collate_packed`` (what its recipes use whenever ``dataset.packed`` is
set) builds each batch's flex-attention ``BlockMask`` with an eager ``create_block_mask`` over the
whole ``seq x seq`` mask: ~370 small ops per batch, after copying the document ids to the GPU with
a blocking copy; the recipe then copies tokens, labels and positions with three more blocking
copies. Each blocking copy waits for the GPU to finish all queued work, so the CPU cannot prepare
batch n+1 while the GPU still runs batch n.

:func:`packed_collate` gives the same batch: the same tensors and a ``BlockMask`` whose block
tables equal ``create_block_mask``'s (``tests/test_packed_collate.py``), computed on the CPU from
the pack's ``seq_lens`` at block granularity (32 x 32 entries at seq 4096 instead of 16.8M mask
elements), then sent with non-blocking copies from pinned memory, so nothing in it waits for the
GPU. Use it with a dataset built with ``pack=True`` (torchtune's recipes only honour
``collate_fn`` when ``packed`` is not set; such a dataset refuses any other collate, see
:class:`CollateGuard`)::

    dataset:
      _component_: kobllla.datasets.kowikitext_dataset
      pack: True
    collate_fn: kobllla.datasets.packed_collate

:func:`packed_varlen_collate` gives the same tokens, labels and positions with the documents as
token offsets (:class:`PackedDocuments`) instead of a ``BlockMask``: what a model built with
``attention: cudnn`` (cuDNN's fused attention over ragged documents) takes::

    model:
      attention: cudnn
    collate_fn: kobllla.datasets.packed_varlen_collate
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import torch

from kobllla.host_copy import to_device
from kobllla.packed_documents import pack_lengths, packed_documents

BLOCK_SIZE = 128  # flex attention's default sparse block, what create_block_mask uses

COLLATE_PATH = "kobllla.datasets.packed_collate"  # what a config names as its collate_fn
VARLEN_COLLATE_PATH = "kobllla.datasets.packed_varlen_collate"  # the same for model.attention: cudnn
COLLATE_PATHS = (COLLATE_PATH, VARLEN_COLLATE_PATH)


def check_pack_flags(builder: str, *, packed: bool, pack: bool) -> None:
    """A builder takes ``packed`` (torchtune's collate) or ``pack`` (this module's), not both.

    Raises:
        ValueError: both are set, naming the two keys.
    """
    if packed and pack:
        raise ValueError(f"{builder}: set dataset.packed (torchtune's collate) or dataset.pack "
                         f"(with collate_fn: {COLLATE_PATH}), not both")


class CollateGuard:
    """Fails a ``pack=True`` dataset whose batches are not collated by :func:`packed_collate`.

    Without ``dataset.packed`` set, torchtune's recipes collate with ``collate_fn`` (by default
    ``padded_collate_sft``), which would silently drop ``seq_lens`` and let every token attend
    across document boundaries. Call :meth:`check` from ``__getitem__``: at the first item it
    looks up the data loader fetching it (the caller frames' ``self`` with this ``dataset`` and a
    ``collate_fn``) and refuses any other collate at once; once a loader with ``packed_collate``
    has been seen it stops looking. Items read without a data loader (stats, tests) are not
    checked; ``tools.tune_cpu --check-only`` checks the config itself.
    """

    def __init__(self, builder: str) -> None:
        self.builder = builder
        self.checked = False

    def check(self, dataset: object) -> None:
        if self.checked:
            return
        collate = _loader_collate(dataset)
        if collate is None:  # read directly: nothing to check yet
            return
        if not _is_packed_collate(collate):
            name = getattr(_unwrap(collate), "__qualname__", repr(collate))
            raise RuntimeError(
                f"{self.builder}(pack=True): the data loader collates with {name}; add `collate_fn: {COLLATE_PATH}` "
                "to the config (or use `packed: True` for torchtune's own collate): without it the batches lose "
                "their document masks")
        self.checked = True


def _unwrap(fn: object) -> object:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _is_packed_collate(fn: object) -> bool:
    return _unwrap(fn) in (packed_collate, packed_varlen_collate)


def _loader_collate(dataset: object, depth: int = 8) -> object | None:
    """The ``collate_fn`` of the data-loader fetcher reading ``dataset`` (torch's ``_MapDatasetFetcher``
    calls ``dataset[i]`` from ``fetch``), found among the caller frames; None if there is none."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if owner is not None and getattr(owner, "dataset", None) is dataset:
            return getattr(owner, "collate_fn", None)
        frame = frame.f_back
    return None


def document_ids(seq_lens: list[list[int]] | list[torch.Tensor], seq_len: int) -> np.ndarray:
    """``[batch, seq_len]`` int32 document index of every position (torchtune's rule)."""
    out = np.empty((len(seq_lens), seq_len), dtype=np.int32)
    for row, lens in enumerate(pack_lengths(seq_lens, seq_len)):
        out[row] = np.repeat(np.arange(len(lens), dtype=np.int32), lens)
    return out


def block_tables(doc: np.ndarray, block: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Per ``(q block, kv block)``: partial and full masks of the document-causal mask.

    ``doc`` is ``[batch, seq]`` non-decreasing document ids. A tile is *full* when every
    ``(q, kv)`` in it is allowed, *partial* when some are; ``create_block_mask`` pads the mask
    to whole blocks with disallowed positions. Returns two ``[batch, 1, nq, nkv]`` int32 arrays.
    """
    b, s = doc.shape
    n = -(-s // block)
    first = doc[:, ::block]                                   # [b, n] id at each block's start
    last_idx = np.minimum(np.arange(n) * block + block - 1, s - 1)
    last = doc[:, last_idx]                                   # [b, n] id at each block's last real position
    whole = (np.arange(n) * block + block) <= s               # [n] block has no padding
    qi, kj = np.arange(n)[:, None], np.arange(n)[None, :]
    below = kj < qi
    # kv tile j entirely before q tile i: some pair shares a document iff kv's last == q's first;
    # every pair does iff kv's first == q's last (ids are non-decreasing) and q's tile is whole.
    some = below & (last[:, None, :] == first[:, :, None])
    every = below & (first[:, None, :] == last[:, :, None]) & whole[None, :, None]
    diag = np.broadcast_to(qi == kj, some.shape)               # (q == kv) is always allowed, never all
    partial = (some & ~every) | diag
    return partial[:, None].astype(np.int32), every[:, None].astype(np.int32)


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flex attention's ``(num_blocks, indices)`` for a dense block table, as create_block_mask
    orders them: the set blocks first, ascending, then the rest, ascending."""
    num = dense.sum(dim=-1).to(torch.int32)
    idx = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


def packed_block_mask(seq_lens: list, seq_len: int, device: torch.device | str = "cpu"):
    """The ``BlockMask`` of torchtune's ``packed_block_causal_mask`` for these packs, on ``device``,
    built without a blocking copy or a dense mask."""
    from torch.nn.attention.flex_attention import BlockMask

    device = torch.device(device)
    doc_np = document_ids(seq_lens, seq_len)
    partial, full = block_tables(doc_np)
    kv_num, kv_idx = _ordered(torch.from_numpy(partial))
    full_num, full_idx = _ordered(torch.from_numpy(full))
    doc = to_device(torch.from_numpy(doc_np), device)
    tables = [to_device(t, device) for t in (kv_num, kv_idx, full_num, full_idx)]

    def mask_mod(b, h, q_idx, kv_idx):  # torchtune's packed mask_mod, on the same ids
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    return BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod,
                                    seq_lengths=(seq_len, seq_len))


def _flex_device() -> torch.device | None:
    """The device the recipe's attention runs flex attention on, or None where torchtune falls
    back to SDPA with a dense mask (its ``_SUPPORTS_FLEX_ATTENTION`` rule: CUDA, sm >= 7.5)."""
    # torchtune's recipes set the current CUDA device (one per rank) before the data loader runs
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (7, 5):
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _check_packs(batch: list[dict], collate: str) -> None:
    if not batch or "seq_lens" not in batch[0]:
        raise ValueError(f"{collate} needs packs (samples with seq_lens): build the dataset with pack=True")


def _stacked(batch: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """The packs' tokens, labels and positions as ``[batch, seq]`` tensors on ``device``, without a host sync."""
    return {key: to_device(torch.stack([torch.as_tensor(x[key]) for x in batch]), device)
            for key in ("tokens", "labels", "input_pos")}


def packed_collate(batch: list[dict], padding_idx: int = 0, ignore_idx: int = -100) -> dict:
    """Packs -> ``{"tokens", "labels", "input_pos", "mask"}`` on the recipe's device, no host sync.

    Same output as torchtune's ``padded_collate_packed`` (``padding_idx``/``ignore_idx`` are
    accepted because the recipes pass them to every ``collate_fn``; packs are already padded).
    The tensors are placed on the current CUDA device, so the recipe's own ``batch_to_device``
    has nothing to copy. Where torchtune uses no flex attention (CPU, GPUs before sm 7.5) this
    returns exactly what ``padded_collate_packed`` does (a dense mask on the CPU).
    """
    _check_packs(batch, "packed_collate")
    device = _flex_device()
    if device is None:
        from torchtune.data import padded_collate_packed

        return padded_collate_packed(batch)
    out = _stacked(batch, device)
    out["mask"] = packed_block_mask([x["seq_lens"] for x in batch], out["tokens"].shape[-1], device)
    return out


def packed_varlen_collate(batch: list[dict], padding_idx: int = 0, ignore_idx: int = -100) -> dict:
    """Packs -> ``{"tokens", "labels", "input_pos", "mask"}``, ``mask`` a :class:`PackedDocuments`.

    For models built with ``attention: cudnn``: the same tokens, labels and positions as
    :func:`packed_collate`, on the current CUDA device (the CPU where there is none) with
    non-blocking copies; the documents as offsets instead of a ``BlockMask``.
    """
    _check_packs(batch, "packed_varlen_collate")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    out = _stacked(batch, device)
    out["mask"] = packed_documents([x["seq_lens"] for x in batch], out["tokens"].shape[-1], device)
    return out
