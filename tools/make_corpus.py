"""Write the offline demo corpora: real Korean (konlpy's Constitution + bills) and English (pydoc).

    python -m tools.make_corpus --out runs/tiny/data

Writes ko_train.csv, ko_heldout.csv, en_train.csv, en_heldout.csv (a `text` column each, the
shape kobllla.datasets.kowikitext_dataset reads); every 10th document is held out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kobllla.corpora import english_documents, korean_documents, split_heldout, write_text_csv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heldout-every", type=int, default=10, help="hold out every k-th document (default 10)")
    args = parser.parse_args(argv)
    for lang, docs in (("ko", korean_documents()), ("en", english_documents())):
        train, held = split_heldout(docs, every=args.heldout_every)
        write_text_csv(args.out / f"{lang}_train.csv", train)
        write_text_csv(args.out / f"{lang}_heldout.csv", held)
        print(f"{lang}: {len(train)} train + {len(held)} held-out documents -> {args.out}/{lang}_{{train,heldout}}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
