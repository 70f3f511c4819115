"""torchtune dataset builders for the KoBLLa stages, usable as ``_component_`` in configs.

- :func:`kowikitext_dataset`: stage 1, Korean Wikipedia text completion, no token dropped.
- :func:`kolima_dataset`: stage 3, KoLIMA chat (LIMA rows or the seed's ``[sep]`` CSV).
- :func:`bilima_dataset`: stage 3, bilingual LIMA (``en_ko`` / ``ko_en``).
- :func:`pretokenized_dataset`: stage 1 at scale, windows read from a ``tools.pretokenize`` file.
- :func:`parallel_dataset`: translation SFT from sentence pairs (Moses files or a two-column table).
- :func:`mixed_dataset`: several datasets interleaved at fixed ratios (English replay, en + zh alpaca).
- :func:`packed_collate`: ``collate_fn`` for ``pack=True`` datasets: the document mask without host syncs.
- :func:`packed_varlen_collate`: the same with the documents as offsets, for ``model.attention: cudnn``.
"""

from kobllla.datasets._bilima import bilima_dataset
from kobllla.datasets._chat import ChatDataset, kolima_dataset
from kobllla.datasets._collate import packed_collate, packed_varlen_collate
from kobllla.datasets._ko_wiki import PackedTextDataset, TextWindowDataset, kowikitext_dataset
from kobllla.datasets._mixed import MixedDataset, mixed_dataset
from kobllla.datasets._parallel import parallel_dataset
from kobllla.datasets._pretokenized import pretokenized_dataset

__all__ = [
    "ChatDataset",
    "MixedDataset",
    "PackedTextDataset",
    "TextWindowDataset",
    "bilima_dataset",
    "kolima_dataset",
    "kowikitext_dataset",
    "mixed_dataset",
    "packed_collate",
    "packed_varlen_collate",
    "parallel_dataset",
    "pretokenized_dataset",
]
