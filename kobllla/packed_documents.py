"""A batch of packs' documents as token offsets: the ``mask`` that ``attention: cudnn`` models take.

:func:`kobllla.datasets.packed_varlen_collate` builds it; the models in :mod:`kobllla.models` read it
(``kobllla.models._cudnn_attention``), or turn it into torchtune's dense block-causal mask where
there is no GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from kobllla.host_copy import to_device


class PackedDocuments(dict):
    """A batch's documents as token offsets, the ``mask`` of ``kobllla.datasets.packed_varlen_collate``.

    A ``dict`` of tensors, because that is what the recipes' plumbing passes through: torchtune's
    ``batch_to_device`` refuses anything but tensors, dicts and BlockMasks, and FSDP2's root forward
    rebuilds every dict argument from its items (``type(d)(items)``), so all it carries are items:

    - ``cu_seqlens``: ``[n + 1]`` int32 start offsets of every document over the batch's packs laid
      end to end (a pack's padding is one more document, as in torchtune's packs), with ``n`` rounded
      up to a power of two by empty documents at the end, so a run sees few shapes;
    - ``max_seqlen``: a zero-element ``[m, 0]`` tensor whose length ``m`` is the longest document
      rounded up to a power of two (at least :data:`MAX_SEQLEN_MIN`, at most the pack's length): a shape
      the model reads without a host sync.
    """

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedDocuments:
        bound = torch.empty(max_seqlen, 0, dtype=torch.int8, device=cu_seqlens.device)  # no storage
        return cls(cu_seqlens=cu_seqlens, max_seqlen=bound)

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return self["cu_seqlens"]

    @property
    def max_seqlen(self) -> int:
        return self["max_seqlen"].shape[0]

    def block_causal_mask(self, batch_size: int, seq_len: int) -> torch.Tensor:
        """``[batch, seq, seq]`` bool: True where a token may attend (its own document, not ahead), the
        dense mask torchtune builds for packs where it has no flex attention."""
        cu = self.cu_seqlens.to("cpu", torch.int64)
        lengths = (cu[1:] - cu[:-1])
        doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths).view(batch_size, seq_len)
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        return (doc[:, :, None] == doc[:, None, :]) & causal


# The cuDNN graphs' sequence dimension: the longest document rounded up to a power of two, at least this.
# A multiple of 128 (the rounding until the twelfth session) gave 41 shapes in the 8B benchmark's first 30
# steps, each a graph build that stalls the GPU; powers of two give 6, for the same kernel time
# (docs/benchmarks.md, "twelfth session").
MAX_SEQLEN_MIN = 128


def packed_documents(seq_lens: list, seq_len: int, device: torch.device | str = "cpu") -> PackedDocuments:
    """:class:`PackedDocuments` of packs with these ``seq_lens`` (each summing to ``seq_len``).

    Raises:
        ValueError: a pack whose lengths are not positive or do not sum to ``seq_len``.
    """
    lengths = np.concatenate(pack_lengths(seq_lens, seq_len))
    n = _next_pow2(len(lengths))
    cu = np.zeros(n + 1, dtype=np.int32)
    cu[1:len(lengths) + 1] = np.cumsum(lengths)
    cu[len(lengths) + 1:] = cu[len(lengths)]
    return PackedDocuments.build(to_device(torch.from_numpy(cu), torch.device(device)),
                                 graph_seqlen(int(lengths.max()), seq_len))


def graph_seqlen(longest: int, seq_len: int) -> int:
    """The cuDNN graphs' sequence dimension for a batch whose longest document has ``longest`` tokens: that
    rounded up to a power of two, at least :data:`MAX_SEQLEN_MIN`, at most the pack's ``seq_len``."""
    return min(max(MAX_SEQLEN_MIN, _next_pow2(longest)), seq_len)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def pack_lengths(seq_lens: list, seq_len: int) -> list[np.ndarray]:
    """Each pack's document lengths as int64 arrays, checked: positive, summing to ``seq_len``.

    Raises:
        ValueError: the first pack that is not, named by its row.
    """
    out = []
    for row, lens in enumerate(seq_lens):
        lens = np.asarray(lens, dtype=np.int64).reshape(-1)
        if lens.sum() != seq_len or (lens <= 0).any():
            raise ValueError(f"pack {row}: seq_lens {lens.tolist()} must be positive and sum to its "
                             f"{seq_len} tokens (padding counted as its own sequence, as PackedDataset does)")
        out.append(lens)
    return out

