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

Finished rows are cached in OUTPUT.cache.jsonl: rerun the same command after a kill, a crash or
failed rows and only the missing rows are sent. The output (same rows, same order, same fields,
turns translated) feeds ``kolima_dataset`` and, with the English file, ``bilima_dataset``.
Exit status: 0 done, 1 some rows failed (OUTPUT.errors.jsonl), 2 bad input or refused endpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kobllla.translate import (
    ChatEndpoint,
    FatalEndpointError,
    RowsFailedError,
    translate_dataset,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", type=Path, required=True, help="LIMA rows: .jsonl, .json or .parquet")
    parser.add_argument("--output", type=Path, required=True, help="KoLIMA rows (.jsonl), written when complete")
    parser.add_argument("--base-url", required=True, help="OpenAI-compatible API root, e.g. http://localhost:8000/v1")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the key (unset: no key sent)")
    parser.add_argument("--field", default="conversations", help="column with the list of turns")
    parser.add_argument("--system-field", default="system", help="optional per-row system prompt column")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one reply")
    parser.add_argument("--max-attempts", type=int, default=6, help="tries per row on 429/5xx/timeouts/bad replies")
    parser.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds, doubled each time")
    parser.add_argument("--temperature", type=float, default=0.3)
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="output token limit per reply (default: the server's)")
    parser.add_argument("--cache", type=Path, default=None, help="cache file (default OUTPUT.cache.jsonl)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows")
    parser.add_argument("--allow-partial", action="store_true", help="write the output without the rows that failed")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    endpoint = ChatEndpoint(
        base_url=args.base_url, model=args.model, api_key=os.environ.get(args.api_key_env) or None,
        key_env=args.api_key_env, timeout_s=args.timeout, max_attempts=args.max_attempts,
        backoff_s=args.backoff, temperature=args.temperature, max_tokens=args.max_tokens,
    )
    try:
        m = translate_dataset(
            input_path=args.input, output_path=args.output, endpoint=endpoint, cache_path=args.cache,
            field=args.field, system_field=args.system_field, concurrency=args.concurrency,
            limit=args.limit, allow_partial=args.allow_partial, progress=not args.no_progress,
        )
    except RowsFailedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FatalEndpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = f", {len(m['failed_rows'])} failed (see {args.output}.errors.jsonl)" if m["failed_rows"] else ""
    print(f"wrote {args.output}: {m['rows_out']} of {m['rows_in']} rows ({m['from_cache']} from cache, "
          f"{m['requested_this_run']} requested){failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
