"""Check a model dir before chat-format training or export: stop tokens and untrained chat-token rows.

    python -m tools.check_model ./checkpoints/Llama-3-KoBLLa-ChatVec        # exit 0: ready for stage 3
    python -m tools.check_model ./checkpoints/Meta-Llama-3-8B               # exit 1: untrained chat tokens
    # a torchtune epoch_N/ trained from a base model keeps the base's eos <|end_of_text|>: write a fixed copy
    python -m tools.check_model out/stage3/epoch_2 --fix-stop-tokens --out out/stage3/epoch_2-chat
    # chat tokens never trained (tuning the base directly on chat data): set them to the mean of trained rows
    python -m tools.check_model ./checkpoints/Meta-Llama-3-8B --fix-untrained mean --out ./checkpoints/base-fixed
    python -m tools.check_model out/stage3/epoch_2 --base ./checkpoints/Llama-3-KoBLLa-ChatVec  # adapter-only

Checks (exit 1 with one line each when one fails): the tokenizer's eos is <|eot_id|> and
generation_config.json's eos_token_id holds [128001, 128009] (llama.cpp and vLLM stop at the eos only),
and the embed_tokens / lm_head rows of <|start_header_id|>, <|end_header_id|>, <|eot_id|> (plus any
--token) are trained: not near zero (norm < 1e-3 x the median row norm) nor near identical to each other.
The input is never modified: a fix writes a copy at --out and checks it again.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from kobllla.cli import cap, make_parser, run


def _work(args: argparse.Namespace) -> int:
    from kobllla.model_dir import resolve_model_dir
    from kobllla.untrained import CHAT_TOKENS, chat_token_ids, check_chat_model, refusal, write_fixed_copy

    fixing = args.fix_stop_tokens or args.fix_untrained
    if fixing and args.out is None:
        raise ValueError("--fix-stop-tokens / --fix-untrained write a fixed copy: pass --out NEWDIR "
                         "(the input is never modified)")
    if args.out is not None and not fixing:
        raise ValueError("--out is only used with --fix-stop-tokens or --fix-untrained mean")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file; the fixed copy is a model directory: "
                                 "pick another path (a file is never replaced)")
    with tempfile.TemporaryDirectory(prefix="kobllla-check-") as scratch:
        model_dir = resolve_model_dir(args.model, base=args.base, scratch=Path(scratch))
        names = [*CHAT_TOKENS, *[t for t in args.token if t not in CHAT_TOKENS]]
        if fixing:
            ids = chat_token_ids(model_dir, names)
            fixed = write_fixed_copy(model_dir, args.out, untrained=bool(args.fix_untrained),
                                     stop_tokens=args.fix_stop_tokens, token_ids=ids, overwrite=args.overwrite)
            rows = sorted({(r.token, r.matrix.split('.')[-2]) for r in fixed.rows})
            print(f"wrote {args.out}: {len(fixed.rows)} rows set to the trained mean "
                  f"({', '.join(f'{t} {m}' for t, m in rows) or 'none needed'}); stop-token files changed: "
                  f"{', '.join(fixed.stop_files) or 'none'}")
            model_dir, shown = Path(args.out), Path(args.out)
        else:
            shown = args.model
        stop, untrained = check_chat_model(model_dir, chat_token_ids(model_dir, names))
    for line in stop:
        print(f"{shown}: stop tokens: {line}")
    if stop:
        print(f"error: {cap(shown)}: stop tokens: {'; '.join(stop)}; llama.cpp and vLLM would not stop at a "
              f"turn's end: write a fixed copy with python -m tools.check_model {cap(shown)} --fix-stop-tokens "
              "--out NEWDIR", file=sys.stderr)
    if untrained:
        for row in untrained:
            print(f"{shown}: {row.describe()}")
        print(f"error: {refusal(shown, untrained)}", file=sys.stderr)
    if stop or untrained:
        return 1
    print(f"ok: {shown}: eos <|eot_id|>, generation eos [128001, 128009]; chat-token rows trained "
          f"({', '.join(dict.fromkeys([*CHAT_TOKENS, *args.token]))})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m tools.check_model")
    parser.add_argument("model", type=Path, help="HF dir, torchtune epoch_N/, chat-vector output")
    parser.add_argument("--base", type=Path, help="the base model of an adapter-only torchtune epoch_N/")
    parser.add_argument("--token", action="append", default=[], metavar="NAME",
                        help="also check this added token (e.g. <|reserved_special_token_0|>); repeatable")
    parser.add_argument("--fix-stop-tokens", action="store_true",
                        help="write a copy at --out with eos <|eot_id|> and generation eos [128001, 128009]")
    parser.add_argument("--fix-untrained", choices=["mean"],
                        help="write a copy at --out whose untrained chat-token rows are the mean of trained rows")
    parser.add_argument("--out", type=Path, help="where a fixed copy goes (built aside, renamed when whole)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    return run(lambda: _work(args))


if __name__ == "__main__":
    sys.exit(main())
