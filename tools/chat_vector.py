"""Add a chat vector to a model: ``out = target + ratio * (instruct - base)``, exact and streamed.

    # one shot (stage 2 of the method): the Korean-trained base gets Llama 3 Instruct's chat ability
    python -m tools.chat_vector --base ckpt/Meta-Llama-3-8B --instruct ckpt/Meta-Llama-3-8B-Instruct \\
        --target runs/ko-cp/epoch_0 --out runs/ko-chat
    # a target with Korean tokens added to its vocabulary: add the vector to the shared rows only
    python -m tools.chat_vector ... --embeddings overlap

    # extract once, apply to several targets (bit-identical to one shot with the float32 vector)
    python -m tools.chat_vector --base B --instruct I --save-vector runs/llama3-8b-chat-vector
    python -m tools.chat_vector --vector runs/llama3-8b-chat-vector --target T --out O --ratio 0.5

    # tiny CPU run (seconds): make three 65M-param models, then merge them
    python -m tools.make_tiny_model --out runs/tiny/base
    python -m tools.make_tiny_model --out runs/tiny/instruct --flavor instruct --seed 1
    python -m tools.make_tiny_model --out runs/tiny/target --seed 2
    python -m tools.chat_vector --base runs/tiny/base --instruct runs/tiny/instruct \\
        --target runs/tiny/target --out runs/tiny/chat

Inputs: Hugging Face dirs (single or sharded safetensors), torchtune ``epoch_N/`` dirs, Meta
``consolidated.00.pth`` dirs (weights-only load). Output: HF sharded safetensors + index, the
target's tokenizer with the instruct model's chat template / eos / generation config, and
``kobllla_manifest.json`` (inputs with sizes and sha256, ratio, policy, versions) written last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kobllla.chat_vector import (
    EMBEDDING_POLICIES,
    OUT_DTYPES,
    ChatVectorOptions,
    ChatVectorResult,
    apply_chat_vector,
    extract_chat_vector,
    merge_chat_vector,
)
from kobllla.cli import make_parser, run


def _parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, prog="python -m tools.chat_vector")
    p.add_argument("--base", type=Path, help="model the instruct model was tuned from")
    p.add_argument("--instruct", type=Path, help="the chat model whose chat ability is transferred")
    p.add_argument("--target", type=Path, help="model that receives the vector")
    p.add_argument("--out", type=Path, help="output directory (built aside, renamed when whole)")
    p.add_argument("--save-vector", type=Path, metavar="DIR",
                   help="with --base/--instruct only: save instruct - base to DIR and stop")
    p.add_argument("--vector", type=Path, metavar="DIR",
                   help="a vector saved by --save-vector, instead of --base/--instruct")
    p.add_argument("--vector-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of a saved vector (float32: exact, 4 bytes/param; default float32)")
    p.add_argument("--ratio", type=float, default=1.0, help="scale of the vector (default 1.0)")
    p.add_argument("--embeddings", default="error", choices=list(EMBEDDING_POLICIES),
                   help="if the target's vocabulary differs: error (default), skip (keep the "
                        "target's embedding/lm_head), overlap (add the vector to shared rows)")
    p.add_argument("--dtype", default="auto", choices=list(OUT_DTYPES),
                   help="output dtype; auto keeps each target tensor's dtype (default)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="output shard size in GiB (default 5)")
    p.add_argument("--workers", type=int, default=None,
                   help="threads reading, computing and hashing slices (default: one per core, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-hash", action="store_true", help="skip sha256 of inputs/outputs in the manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _mode(args: argparse.Namespace) -> str:
    """Which of the three invocations this is; raises ValueError naming the flag to fix."""
    if args.save_vector is not None:
        extra = [f for f in ("target", "out", "vector") if getattr(args, f) is not None]
        if extra or args.base is None or args.instruct is None:
            raise ValueError("--save-vector DIR takes --base and --instruct only"
                             + (f" (drop --{extra[0]})" if extra else ""))
        return "extract"
    if args.vector is not None:
        if args.base is not None or args.instruct is not None:
            raise ValueError("--vector replaces --base/--instruct: pass one or the other")
        if args.target is None or args.out is None:
            raise ValueError("--vector DIR needs --target and --out")
        return "apply"
    missing = [f"--{f}" for f in ("base", "instruct", "target", "out") if getattr(args, f) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: a merge needs --base, --instruct, --target "
                         "and --out (or --save-vector / --vector for the two-step form)")
    return "merge"


def _options(args: argparse.Namespace) -> ChatVectorOptions:
    return ChatVectorOptions(ratio=args.ratio, embeddings=args.embeddings, dtype=args.dtype,
                             vector_dtype=args.vector_dtype, overwrite=args.overwrite,
                             max_shard_bytes=int(args.max_shard_gb * 2**30), workers=args.workers,
                             progress=not args.quiet, hash_files=not args.no_hash)


def _run(args: argparse.Namespace, mode: str) -> ChatVectorResult:
    options = _options(args)
    if mode == "extract":
        return extract_chat_vector(base=args.base, instruct=args.instruct, out=args.save_vector, options=options)
    if mode == "apply":
        return apply_chat_vector(vector=args.vector, target=args.target, out=args.out, options=options)
    return merge_chat_vector(base=args.base, instruct=args.instruct, target=args.target, out=args.out,
                             options=options)


def _report(args: argparse.Namespace, mode: str, result: ChatVectorResult) -> None:
    gb = result.input_bytes_read / 1e9
    print(f"wrote {result.out} ({mode}: {result.tensors} tensors, {result.output_bytes / 1e9:.2f} GB) "
          f"in {result.seconds:.1f} s, read {gb:.2f} GB ({gb / max(result.seconds, 1e-9):.2f} GB/s)")
    if mode != "extract":
        policy = result.manifest["embeddings"]["policy"]
        # policy "error" only acts on a vocabulary mismatch; on success it means the vocabularies matched
        what = "vocabularies match (a mismatch would have been refused)" if policy == "error" else f"policy {policy}"
        print(f"ratio {args.ratio}, embeddings: {what}")
        for name, note in result.embeddings.items():
            print(f"  {name}: {note}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def work() -> None:
        mode = _mode(args)
        _report(args, mode, _run(args, mode))

    return run(work)

if __name__ == "__main__":
    sys.exit(main())
