"""Export a model to GGUF (f32/f16/bf16/q8_0 and llama.cpp's K-quants) with llama.cpp's own converter and quantizer.

    # any stage's output: HF dir, torchtune epoch_N/, chat-vector output
    python -m tools.export_gguf --model ./checkpoints/Llama-3-KoBLLa-ChatVec --out ./gguf/kobllla \\
        --quant f16,q8_0,q5_k_m,q4_k_m
    # an adapter-only epoch_N/ (save_adapter_weights_only: True): merged into --base first
    python -m tools.export_gguf --model ./checkpoints/stage3/epoch_2 --base ./checkpoints/Llama-3-KoBLLa-ChatVec \\
        --out ./gguf/stage3 --quant q4_k_m
    # your own llama.cpp clone (its build/bin/llama-quantize is used when built)
    python -m tools.export_gguf --model M --out O --quant q4_k_m --llama-cpp ~/src/llama.cpp
    # tiny CPU example (seconds)
    python -m tools.make_tiny_model --out runs/tiny/instruct --flavor instruct
    python -m tools.export_gguf --model runs/tiny/instruct --out runs/tiny/gguf --quant f16,q8_0,q4_k_m
    # get kobllla's copy of llama.cpp's converter once (what `make llama-cpp` runs)
    python -m tools.export_gguf --fetch-llama-cpp

Writes OUT/<name>-<quant>.gguf and OUT/kobllla_manifest.json (inputs, sha256 of every output, tensor
types, llama.cpp commit, commands), built aside and renamed when whole. A chat model gets eos
<|eot_id|> in the GGUF even when its directory says otherwise (the input is not modified).
Serve a file: python -m llama_cpp.server --model OUT/<name>-q4_k_m.gguf --port 8000
"""

from __future__ import annotations

import sys
from pathlib import Path

from kobllla.cli import make_parser, run


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m tools.export_gguf")
    parser.add_argument("--model", type=Path, help="HF dir, torchtune epoch_N/, chat-vector output")
    parser.add_argument("--out", type=Path, help="output directory (OUT/<name>-<quant>.gguf + manifest)")
    parser.add_argument("--quant", default="f16",
                        help="comma-separated: f32,f16,bf16,q8_0,q6_k,q5_k_m,q5_k_s,q4_k_m,q4_k_s,q3_k_l,q3_k_m,"
                             "q3_k_s,q2_k,q5_1,q5_0,q4_1,q4_0 (default f16)")
    parser.add_argument("--base", type=Path, help="the base model of an adapter-only epoch_N/ (merged first)")
    parser.add_argument("--name", help="file name stem (default: the model directory's name)")
    parser.add_argument("--llama-cpp", type=Path,
                        help="a llama.cpp clone (default: $LLAMA_CPP_DIR, else kobllla's copy)")
    parser.add_argument("--threads", type=int, help="quantizer threads (default: all cores)")
    parser.add_argument("--allow-untrained", action="store_true",
                        help="export a chat model whose chat-token rows are untrained")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--fetch-llama-cpp", action="store_true",
                        help="extract llama.cpp's converter from the llama-cpp-python sdist into kobllla's cache, exit")
    parser.add_argument("--sdist", type=Path, help="with --fetch-llama-cpp: a local llama_cpp_python-X.tar.gz")
    args = parser.parse_args(argv)
    if not args.fetch_llama_cpp and (args.model is None or args.out is None):
        parser.error("--model and --out are required (or --fetch-llama-cpp)")
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(lambda: _work(args, argv))


def _work(args, argv: list[str]) -> int:
    if args.fetch_llama_cpp:
        from kobllla.gguf import install_llama_cpp

        print(f"llama.cpp converter in {install_llama_cpp(sdist=args.sdist)}")
        return 0
    from kobllla.gguf import export_gguf

    manifest = export_gguf(
        model=args.model, out=args.out, quants=args.quant, base=args.base, llama_cpp=args.llama_cpp,
        name=args.name, overwrite=args.overwrite, allow_untrained=args.allow_untrained, threads=args.threads,
        command=[sys.executable, "-m", "tools.export_gguf", *argv], progress=not args.no_progress,
    )
    fixed = manifest["stop_tokens"]["fixed_in_scratch"]
    if fixed:
        print(f"note: {args.model} is a chat model whose eos is not <|eot_id|> "
              f"({'; '.join(manifest['stop_tokens']['problems'])}); the GGUF carries eos <|eot_id|> "
              "(the input was not modified)")
    for fname, facts in manifest["outputs"].items():
        types = ", ".join(f"{t} x{n}" for t, n in facts["tensor_types"].items())
        print(f"wrote {args.out / fname}: {facts['bytes'] / 2**20:,.1f} MiB, {types}, {facts['seconds']} s")
    print(f"manifest: {args.out / 'kobllla_manifest.json'} ({manifest['seconds']} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
