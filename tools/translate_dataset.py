"""Translate LIMA rows into KoLIMA (user turns in banmal, assistant turns in jondaetmal) via an OpenAI-compatible API.

    # vLLM on this machine (no key needed)
    python -m tools.translate_dataset --input data/lima_train.jsonl --output data/kolima_train.jsonl \\
        --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-72B-Instruct
    # OpenAI / Gemini's OpenAI-compatible API: the key is read from the named environment variable
    OPENAI_API_KEY=... python -m tools.translate_dataset --input lima.jsonl --output kolima.jsonl \\
        --base-url https://api.openai.com/v1 --model gpt-4o-mini
    GEMINI_API_KEY=... python -m tools.translate_dataset --input lima.jsonl --output kolima.jsonl \\
        --base-url https://generativelanguage.googleapis.com/v1beta/openai --model gemini-2.0-flash \\
        --api-key-env GEMINI_API_KEY
    # Ollama, first 5 rows to check the style
    python -m tools.translate_dataset --input lima.jsonl --output /tmp/k5.jsonl \\
        --base-url http://localhost:11434/v1 --model llama3.1:70b --limit 5
    # restyle instead of translate: your rules in a file, Korean speech levels checked (Kiwi)
    python -m tools.translate_dataset --input kolima.jsonl --output kolima_casual.jsonl \\
        --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-72B-Instruct \\
        --instructions rules.txt --check-speech-level user=banmal,assistant=jondaetmal

Every row is checked first with the dataset builders' own validation (an even number of
non-empty turns, user first): bad rows are listed by file and line and nothing is sent, unless
--skip-invalid. Finished rows are cached in OUTPUT.cache.jsonl: rerun the same command after a
kill, a crash or failed rows and only the missing rows are sent. Rows that fail are appended to
OUTPUT.errors.jsonl as they fail. A URL without http(s)://, nothing listening at it, or HTTP
401/403/404 stops the run at once; an endpoint that stops answering stops it after
--give-up-after seconds without a successful reply. The output (same rows, same order, same
fields, turns translated) feeds kolima_dataset and, with the English file, bilima_dataset.
Exit status: 0 done, 1 some rows failed (OUTPUT.errors.jsonl), 2 bad input or refused endpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kobllla.cli import USER_ERRORS, cap, error_exit, make_parser, number_arg, run
from kobllla.translate import (
    ChatEndpoint,
    FatalEndpointError,
    Prompt,
    RowsFailedError,
    parse_speech_levels,
    translate_dataset,
)

_AT_LEAST_1 = number_arg(int, minimum=1)
_POSITIVE = number_arg(float, minimum=0, inclusive=False)
_NON_NEGATIVE = number_arg(float, minimum=0)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m tools.translate_dataset")
    parser.add_argument("--input", type=Path, required=True, help="LIMA rows: .jsonl, .json, .csv or .parquet")
    parser.add_argument("--output", type=Path, required=True, help="KoLIMA rows (.jsonl), written when complete")
    parser.add_argument("--base-url", required=True, help="OpenAI-compatible API root, e.g. http://localhost:8000/v1")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the key (unset: no key sent)")
    parser.add_argument("--field", default="conversations", help="column with the list of turns")
    parser.add_argument("--system-field", default="system", help="optional per-row system prompt column")
    parser.add_argument("--instructions", type=Path, default=None,
                        help="text file of rules that replace the built-in translation rules (restyling)")
    parser.add_argument("--check-speech-level", default=None, metavar="ROLE=LEVEL,...",
                        help="retry replies whose Korean turns are in another speech level, e.g. "
                        "user=banmal,assistant=jondaetmal (banmal or jondaetmal)")
    parser.add_argument("--concurrency", type=_AT_LEAST_1, default=8, help="requests in flight (default 8)")
    parser.add_argument("--timeout", type=_POSITIVE, default=300.0, help="seconds to wait for one reply")
    parser.add_argument("--max-attempts", type=_AT_LEAST_1, default=6,
                        help="tries per row on 429/5xx/timeouts/bad replies")
    parser.add_argument("--backoff", type=_NON_NEGATIVE, default=2.0,
                        help="first retry delay in seconds, doubled each time")
    parser.add_argument("--give-up-after", type=_POSITIVE, default=600.0, metavar="SECONDS",
                        help="stop the run when no request has succeeded for this long (default 600)")
    parser.add_argument("--temperature", type=float, default=0.3)
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="output token limit per reply (default: the server's)")
    parser.add_argument("--cache", type=Path, default=None, help="cache file (default OUTPUT.cache.jsonl)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="translate the valid rows when some rows are not chat rows (they are left out)")
    parser.add_argument("--allow-partial", action="store_true", help="write the output without the rows that failed")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    return run(lambda: _work(args), errors=(*USER_ERRORS, FatalEndpointError))


def _work(args) -> int:
    levels = parse_speech_levels(args.check_speech_level) if args.check_speech_level else None
    prompt = Prompt.from_file(args.instructions, levels)
    endpoint = ChatEndpoint(
        base_url=args.base_url, model=args.model, api_key=os.environ.get(args.api_key_env) or None,
        key_env=args.api_key_env, timeout_s=args.timeout, max_attempts=args.max_attempts,
        backoff_s=args.backoff, give_up_after_s=args.give_up_after, temperature=args.temperature,
        max_tokens=args.max_tokens,
    )
    try:
        m = translate_dataset(
            input_path=args.input, output_path=args.output, endpoint=endpoint, cache_path=args.cache,
            field=args.field, system_field=args.system_field, concurrency=args.concurrency,
            limit=args.limit, allow_partial=args.allow_partial, skip_invalid=args.skip_invalid, prompt=prompt,
            progress=not args.no_progress,
        )
    except RowsFailedError as exc:
        return error_exit(exc, 1)
    if m["skipped_invalid"]:
        print(f"warning: left out {len(m['skipped_invalid'])} rows the dataset builders refuse (first: "
              f"{cap(m['skipped_invalid'][0])}); the output has fewer rows than the input, so bilima_dataset "
              "cannot pair it row by row with the English file", file=sys.stderr)
    failed = f", {len(m['failed_rows'])} failed (see {args.output}.errors.jsonl)" if m["failed_rows"] else ""
    skipped = f", {len(m['skipped_invalid'])} invalid rows left out" if m["skipped_invalid"] else ""
    print(f"wrote {args.output}: {m['rows_out']} of {m['rows_in']} rows ({m['from_cache']} from cache, "
          f"{m['requested_this_run']} requested){failed}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
