"""Tokenize a text dataset once into a memory-mapped token file for stage 1 at any corpus size.

    python -m tools.pretokenize --source data/kowikitext-20240501/train.parquet \\
        --tokenizer checkpoints/Meta-Llama-3-8B/original/tokenizer.model --out data/kowiki-20240501.tokens
    python -m tools.pretokenize --source csv --data-files data/kowikitext_20240501.csv \\
        --tokenizer checkpoints/Meta-Llama-3-8B/original/tokenizer.model --out data/kowiki-csv.tokens
    python -m tools.pretokenize --source wikimedia/wikipedia --name 20231101.ko \\
        --tokenizer checkpoints/Meta-Llama-3-8B/original/tokenizer.model --out data/kowiki-hub.tokens
    python -m tools.pretokenize --source runs/tiny/data/ko_train.csv \\
        --tokenizer runs/tiny/base/original/tokenizer.model --out runs/tiny/data/ko_train.tokens  # tiny CPU check

Writes OUT/tokens.uint32.bin (every document as <|begin_of_text|> text <|end_of_text|>, text
NFC-normalised, empty rows skipped and counted), OUT/doc_ends.int64.bin and OUT/manifest.json
(written last), tokenizing on every core. OUT appears only when complete; a killed run resumes
where it stopped when the same command is run again. Train on it with
``dataset._component_: kobllla.datasets.pretokenized_dataset`` and ``dataset.path: OUT``
(configs/tiny/stage1_pretokenized_lora.yaml).
"""

from __future__ import annotations

import sys
from pathlib import Path

from kobllla.cli import USER_ERRORS, make_parser, number_arg, run
from kobllla.pretokenized import pretokenize

_AT_LEAST_1 = number_arg(int, minimum=1)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m tools.pretokenize")
    parser.add_argument("--source", required=True,
                        help="csv|json|jsonl|parquet (with --data-files), a local file, or a hub dataset id")
    parser.add_argument("--data-files", nargs="+", default=None, help="local file(s) when --source names a format")
    parser.add_argument("--name", default=None, help="hub dataset configuration, e.g. 20231101.ko")
    parser.add_argument("--split", default="train", help="hub split (default train)")
    parser.add_argument("--column", default="text", help="the text column (default text)")
    parser.add_argument("--tokenizer", type=Path, required=True,
                        help="Llama 3 tokenizer.model (a checkpoint's original/tokenizer.model)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (appears when complete)")
    parser.add_argument("--workers", type=_AT_LEAST_1, default=None, help="tokenizer processes (default: every core)")
    parser.add_argument("--chunk-rows", type=_AT_LEAST_1, default=512,
                        help="rows per worker task and per resumable commit (default 512)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    # RuntimeError: a worker died, or another process is writing the same --out
    return run(lambda: _work(args), errors=(*USER_ERRORS, RuntimeError))


def _work(args) -> None:
    manifest = pretokenize(
        source=args.source, data_files=args.data_files, name=args.name, split=args.split, column=args.column,
        tokenizer_path=args.tokenizer, out_dir=args.out, workers=args.workers, chunk_rows=args.chunk_rows,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    c = manifest["counts"]
    resumed = manifest["settings"]["resumed_at_row"]
    rate = f", {manifest['tokens_per_s']:,} tokens/s" if manifest["tokens_per_s"] else f" (resumed at row {resumed})"
    print(f"wrote {args.out}: {c['documents']:,} documents ({c['skipped_empty']} empty rows skipped), "
          f"{c['tokens']:,} tokens in {manifest['elapsed_s']} s{rate}")

if __name__ == "__main__":
    sys.exit(main())
