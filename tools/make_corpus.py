"""Write the offline demo corpora: real Korean (konlpy's Constitution + bills) and English (pydoc).

    python -m tools.make_corpus --out runs/tiny/data
    python -m tools.make_corpus --out runs/tiny/data --overwrite   # replace files written before

Writes ko_train.csv, ko_heldout.csv, en_train.csv, en_heldout.csv (a `text` column each, the
shape kobllla.datasets.kowikitext_dataset reads); every 10th document is held out. Files that
already exist in --out (perhaps edited by hand) are kept unless --overwrite.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kobllla.cli import USER_ERRORS, make_parser, run
from kobllla.corpora import write_demo_corpora


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m tools.make_corpus")
    parser.add_argument("--out", type=Path, required=True, help="directory for the four CSV files")
    parser.add_argument("--heldout-every", type=int, default=10, help="hold out every k-th document (default 10)")
    parser.add_argument("--overwrite", action="store_true", help="replace the CSV files if --out already has them")
    args = parser.parse_args(argv)
    return run(lambda: _work(args), errors=(*USER_ERRORS, ImportError))  # ImportError: konlpy missing


def _work(args) -> None:
    counts = write_demo_corpora(args.out, heldout_every=args.heldout_every, overwrite=args.overwrite)
    for lang, (train, held) in counts.items():
        print(f"{lang}: {train} train + {held} held-out documents -> {args.out}/{lang}_{{train,heldout}}.csv")


if __name__ == "__main__":
    sys.exit(main())
