r"""Talk to any stage's output in the terminal: streamed tokens, multi-turn history.

    python -m tools.chat --model runs/demo/stage3/epoch_0
    python -m tools.chat --model ./checkpoints/Llama-3-KoBLLa-ChatVec --device cuda --system "한국어로 답하세요."
    python -m tools.chat --model M --temperature 0.7 --top-p 0.9 --seed 1
    # scripted: with stdin not a terminal, every line is one user turn and each answer is printed
    printf '안녕?\n이름이 뭐야?\n' | python -m tools.chat --model M --max-new-tokens 64

Commands (any case): /reset forgets the conversation (the --system message stays), /exit leaves (or Ctrl-D).
A line that is not UTF-8, or a turn too long for the model's context, is reported ("error: ...") and
skipped; with piped stdin the exit status is then 1 once the input ends (0 when every turn was answered).
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

    line_no = 0

    def read(prompt: str) -> str:
        nonlocal line_no
        line_no += 1
        if interactive:
            try:
                return input(prompt)
            except UnicodeDecodeError:
                raise ValueError("that line is not UTF-8 text; set the terminal to UTF-8 and type it again") from None
        raw = sys.stdin.buffer.readline()
        if not raw:
            raise EOFError
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"stdin line {line_no} is not UTF-8 (byte {exc.start + 1}); skipped it: "
                             "send UTF-8 text") from None

    try:
        chat_loop(session, read=read, write=write, note=note, interactive=interactive)
    finally:
        loaded.close()
    return 1 if session.failed and not interactive else 0


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
