"""Talk to any stage's output in the terminal: streamed tokens, multi-turn history.

    python -m tools.chat --model runs/demo/stage3/epoch_0
    python -m tools.chat --model ./checkpoints/Llama-3-KoBLLa-ChatVec --device cuda --system "한국어로 답하세요."
    python -m tools.chat --model M --temperature 0.7 --top-p 0.9 --seed 1
    # scripted: with stdin not a terminal, every line is one user turn and each answer is printed
    printf '안녕?\n이름이 뭐야?\n' | python -m tools.chat --model M --max-new-tokens 64

Commands: /reset forgets the conversation (the --system message stays), /exit leaves (or Ctrl-D).
Ctrl-C while the model writes stops that answer. Generation stops at <|eot_id|> and <|end_of_text|>;
when the history outgrows the model's context the oldest exchanges are dropped (and it says so).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kobllla.cli import make_parser, run
from kobllla.generation import add_generation_flags


def _work(args: argparse.Namespace) -> int:
    from kobllla.generation import ChatSession, chat_loop, load_model, options_from_args

    options = options_from_args(args, batch_size=1)
    interactive = sys.stdin.isatty()
    if args.system is not None and not args.system.strip():
        raise ValueError("--system must not be empty")
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    loaded = load_model(args.model, base=args.base, device=options.device, dtype=options.dtype)
    session = ChatSession(loaded, options, system=args.system)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        note(f"chat with {args.model} (template: {loaded.chat_template_source}); /reset, /exit, Ctrl-D to leave")

    def read(prompt: str) -> str:
        if interactive:
            return input(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line

    try:
        chat_loop(session, read=read, write=write, note=note, interactive=interactive)
    finally:
        loaded.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m tools.chat")
    parser.add_argument("--model", type=Path, required=True,
                        help="HF dir, torchtune epoch_N/, chat-vector output (adapter-only epoch_N/: add --base)")
    parser.add_argument("--system", help="a system message that starts every conversation")
    add_generation_flags(parser, batch_size=False)
    args = parser.parse_args(argv)
    return run(lambda: _work(args))


if __name__ == "__main__":
    sys.exit(main())
