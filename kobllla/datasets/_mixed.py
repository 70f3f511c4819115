"""Weighted, deterministic interleave of several SFT datasets (LLaMA-Factory's ``mix_strategy``).

``stop`` says when the mix ends, with LLaMA-Factory's semantics:

* ``first_exhausted`` (its ``interleave_under``): stop when the next sample would have to come from a
  source that has none left; no sample repeats, the larger sources are cut.
* ``all_exhausted`` (its ``interleave_over``): stop when every source has been seen whole at least
  once; smaller sources repeat (each pass in a fresh order).
* an int ``N``: exactly ``N`` samples; sources repeat or are cut as the weights require.

Unlike LLaMA-Factory (which draws the source at random with ``interleave_probs``), the source of
sample ``n`` is the one furthest behind its share (``w_i * (n + 1) - taken_i`` largest, ties to the
first): every prefix of the mix holds each source's share to within one sample, so a 3:1 weighting
is 75 % exactly, whatever the seed. ``seed`` only orders each source's rows (a fresh permutation per
pass), which decides which rows a cut source drops. The mix is a map-style dataset with a fixed
``__len__``: the recipe's sampler shuffles it, and a ``DistributedSampler`` splits it into disjoint
rank shards like any other dataset (every rank computes the same schedule).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.datasets import PackedDataset
from torchtune.modules.transforms import Transform
from torchtune.utils import get_logger

# torchtune's own logger: the recipes set it to INFO/DEBUG, so this line shows in `tune run` output
# (a kobllla logger would stay at the root's WARNING there).
log = get_logger()

Stop = Literal["first_exhausted", "all_exhausted"] | int
STOPS = ("first_exhausted", "all_exhausted")
# Sources with more distinct rows in the mix than this have their trained-token share estimated
# from this many random rows (the log says "~"), so the start-up log costs seconds, not minutes.
TOKEN_COUNT_SAMPLE = 2000


def check_weights(weights: Sequence[float], n_datasets: int) -> list[float]:
    """The weights normalized to sum to 1; zero switches a source off.

    Raises:
        ValueError: a count that differs from the datasets', a negative or non-numeric weight, or all zero.
    """
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ValueError(f"mixed_dataset: weights must be a list of numbers, one per dataset, got {weights!r}")
    if len(weights) != n_datasets:
        raise ValueError(
            f"mixed_dataset: {n_datasets} datasets but {len(weights)} weights; give one weight per dataset"
        )
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
            raise ValueError(
                f"mixed_dataset: weights[{i}] is {w!r}; weights must be numbers >= 0 (e.g. [3, 1] for a 3:1 mix)"
            )
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("mixed_dataset: every weight is 0; give at least one dataset a positive weight")
    return [float(w) / total for w in weights]


def _check_stop(stop: Any) -> str | int:
    if stop in STOPS or (isinstance(stop, int) and not isinstance(stop, bool) and stop > 0):
        return stop
    raise ValueError(
        f"mixed_dataset: stop must be 'first_exhausted', 'all_exhausted' or a positive sample count, got {stop!r}"
    )


def _source_order(seed: int, source: int, n_rows: int):
    """Row indices of one source, pass after pass, each pass a fresh seeded permutation."""
    passes = 0
    while True:
        order = list(range(n_rows))
        random.Random(f"{seed}:{source}:{passes}").shuffle(order)
        yield from order
        passes += 1


def interleave_schedule(lengths: Sequence[int], shares: Sequence[float], stop: str | int, seed: int) -> np.ndarray:
    """``(n, 2)`` array of (source, row) for every sample of the mix, in order."""
    live = [i for i, w in enumerate(shares) if w > 0]
    taken = [0] * len(lengths)
    orders = [_source_order(seed, i, n) for i, n in enumerate(lengths)]
    schedule: list[tuple[int, int]] = []
    unseen = sum(1 for i in live if lengths[i] > 0)  # live sources not yet seen whole
    while True:
        n = len(schedule)
        if (stop == "all_exhausted" and unseen == 0) or (isinstance(stop, int) and n == stop):
            break
        source = max(live, key=lambda i: (shares[i] * (n + 1) - taken[i], -i))  # furthest behind; ties: first
        if stop == "first_exhausted" and taken[source] == lengths[source]:
            break
        schedule.append((source, next(orders[source])))
        taken[source] += 1
        unseen -= taken[source] == lengths[source]
    return np.asarray(schedule, dtype=np.int64).reshape(-1, 2)


class MixedDataset(Dataset):
    """Samples of several datasets in a fixed weighted order (see the module docstring).

    Attributes:
        names: one name per source (for logs).
        schedule: ``(len, 2)`` array of (source index, row index in that source).
    """

    def __init__(self, datasets: list[Dataset], names: list[str], schedule: np.ndarray) -> None:
        self.datasets, self.names, self.schedule = datasets, names, schedule

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        source, row = self.schedule[index]
        return self.datasets[int(source)][int(row)]

    def sample_counts(self) -> list[int]:
        """Samples of the mix drawn from each source."""
        return np.bincount(self.schedule[:, 0], minlength=len(self.datasets)).tolist()

    def trained_token_counts(self, *, sample_limit: int = TOKEN_COUNT_SAMPLE) -> tuple[list[float], list[bool]]:
        """Trained (unmasked label) tokens each source contributes to the mix, and whether each is exact.

        A source with more than ``sample_limit`` distinct rows in the mix is estimated from a
        fixed random sample of its rows (mean trained tokens per row x rows in the mix).
        """
        counts, exact = [], []
        for source, ds in enumerate(self.datasets):
            rows = self.schedule[self.schedule[:, 0] == source, 1]
            unique, times = np.unique(rows, return_counts=True)
            if len(unique) <= sample_limit:
                per_row = [_trained_tokens(ds[int(r)]) for r in unique]
                counts.append(float(np.dot(per_row, times)))
                exact.append(True)
            else:
                picked = random.Random(source).sample(list(unique), sample_limit)
                mean = float(np.mean([_trained_tokens(ds[int(r)]) for r in picked]))
                counts.append(mean * len(rows))
                exact.append(False)
        return counts, exact


def _trained_tokens(sample: Mapping[str, Any]) -> int:
    return sum(1 for label in sample["labels"] if label != CROSS_ENTROPY_IGNORE_IDX)


def _build_source(spec: Any, tokenizer: Transform | None, i: int) -> tuple[Dataset, str]:
    if isinstance(spec, Mapping) and "_component_" in spec:
        from omegaconf import OmegaConf
        from torchtune import config as tt_config

        if tokenizer is None:
            raise ValueError(f"mixed_dataset: datasets[{i}] is a config ({spec['_component_']}); pass the tokenizer")
        name = str(spec["_component_"]).rsplit(".", 1)[-1]
        files = spec.get("data_files") or spec.get("en_data_files") or spec.get("source")
        details = ", ".join(str(x) for x in (spec.get("mode"), files) if x)
        return tt_config.instantiate(OmegaConf.create(dict(spec)), tokenizer), f"{name}({details})" if details else name
    if isinstance(spec, Dataset) or (
        not isinstance(spec, (str, bytes, Mapping)) and hasattr(spec, "__len__") and hasattr(spec, "__getitem__")
    ):
        return spec, type(spec).__name__
    raise ValueError(
        f"mixed_dataset: datasets[{i}] is {type(spec).__name__}; expected a dataset config "
        "(a mapping with _component_) or a built dataset"
    )


def _log_shares(mix: MixedDataset, stop: str | int, seed: int, shares: list[float], lengths: list[int]) -> None:
    counts = mix.sample_counts()
    tokens, exact = mix.trained_token_counts()
    total_tokens = sum(tokens) or 1.0
    parts = []
    for name, weight, n, rows, tok, ok in zip(mix.names, shares, counts, lengths, tokens, exact, strict=True):
        if weight == 0:
            parts.append(f"{name}: off (weight 0)")
            continue
        parts.append(
            f"{name}: {n:,} samples ({100 * n / len(mix):.1f} %; {n / rows:.2f} passes over {rows:,} rows), "
            f"{'' if ok else '~'}{100 * tok / total_tokens:.1f} % of trained tokens"
        )
    log.info("mixed_dataset: %s samples (stop=%s, seed %d); %s", f"{len(mix):,}", stop, seed, "; ".join(parts))


def mixed_dataset(
    tokenizer: Transform | None = None,
    *,
    datasets: list[Any],
    weights: list[float],
    stop: Stop = "first_exhausted",
    seed: int = 0,
    packed: bool = False,
) -> MixedDataset | PackedDataset:
    """Several datasets mixed at fixed ratios into one (LLaMA-Factory's interleave_under/over).

    Args:
        tokenizer (Transform | None): the model tokenizer; the recipe passes it, and it is handed to
            every dataset config in ``datasets``.
        datasets (list): dataset configs (mappings with ``_component_``, built with ``tokenizer``) or
            built datasets; each must be unpacked (the mix is packed as a whole).
        weights (list[float]): one per dataset, >= 0, any scale (``[3, 1]`` = 75 % / 25 %); 0 turns a
            source off without removing it from the config.
        stop (str | int): ``first_exhausted`` (no repeats; larger sources cut), ``all_exhausted``
            (smaller sources repeat until every source was seen whole), or a sample count.
        seed (int): orders each source's rows (which rows are cut or repeated); the shares do not depend on it.
        packed (bool): pack the mixed samples into ``tokenizer.max_seq_len`` sequences.

    Returns:
        MixedDataset | PackedDataset: samples ``{"tokens", "labels"}`` of the sources, in mix order.
        At start it logs each source's share of samples and of trained tokens.

    Raises:
        ValueError: weights negative, all zero or not one per dataset; an unknown ``stop``; a packed or
            empty source; and any error of the datasets themselves.

    Example (configs/llama3_8b/alpaca_en_zh_lora.yaml)::

        dataset:
          _component_: kobllla.datasets.mixed_dataset
          weights: [1, 1]
          stop: all_exhausted
          packed: True
          datasets:
            - _component_: torchtune.datasets.alpaca_dataset
              source: yahma/alpaca-cleaned
              train_on_input: False
            - _component_: torchtune.datasets.alpaca_dataset
              source: shibing624/alpaca-zh
              train_on_input: False
    """
    if isinstance(datasets, (str, bytes, Mapping)) or not isinstance(datasets, Sequence) or not datasets:
        raise ValueError("mixed_dataset: datasets must be a non-empty list of dataset configs")
    shares = check_weights(weights, len(datasets))
    stop = _check_stop(stop)
    built, names = [], []
    for i, spec in enumerate(datasets):
        ds, name = _build_source(spec, tokenizer, i)
        if isinstance(ds, PackedDataset):
            raise ValueError(
                f"mixed_dataset: datasets[{i}] ({name}) is packed; set packed: False on it and packed: True "
                "on mixed_dataset, so the mix is packed after interleaving"
            )
        if len(ds) == 0:
            raise ValueError(f"mixed_dataset: datasets[{i}] ({name}) has no samples")
        built.append(ds)
        names.append(f"[{i}] {name}")
    lengths = [len(ds) for ds in built]
    mix = MixedDataset(built, names, interleave_schedule(lengths, shares, stop, seed))
    _log_shares(mix, stop, seed, shares, lengths)
    if not packed:
        return mix
    max_seq_len = getattr(tokenizer, "max_seq_len", None)
    if not max_seq_len:
        raise ValueError("mixed_dataset: packed: True needs tokenizer.max_seq_len set in the config")
    packs = PackedDataset(mix, max_seq_len=max_seq_len, padding_idx=tokenizer.pad_id, split_across_pack=False)
    packs.mix = mix
    return packs
