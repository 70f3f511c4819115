"""Generation speed: tools.generate's library path vs plain transformers ``generate``, same model, same run.

    # one GPU, Llama-3-8B shape (random bf16 weights built on the GPU; no checkpoint on disk):
    python bench/generate_bench.py --preset llama3-8b --device cuda --out runs/bench/generate_8b.json
    # CPU, the tiny model only:
    .venv/bin/python bench/generate_bench.py --preset tiny --device cpu --new-tokens 32 --out runs/bench/gen_tiny.json

Both sides get the same left-padded batch of chat prompts (Korean and English, 15-70 tokens), greedy,
``--new-tokens`` at most, stop ids ``<|eot_id|>`` + ``<|end_of_text|>``. Tokens/s counts every row's new
tokens up to its stop (a random model rarely stops, so rows run to the limit) over the wall time of the
whole batch (CUDA synchronized), median of ``--repeats`` (order alternated) after a full-length warm-up
each. Also recorded: how many rows got the same tokens from both (all in fp32; in bf16 a random model's
near-tied logits can flip on kernel-level rounding differences).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kobllla.chat_format import stop_token_ids  # noqa: E402
from kobllla.generation import GenerationOptions, LoadedModel, decode, encode_row  # noqa: E402
from kobllla.tiny_model import PRESETS, hf_config, write_tokenizer_files  # noqa: E402

QUESTIONS = [
    "한국의 수도는 어디야?",
    "What is the tallest mountain in Korea, and how high is it?",
    "김치찌개 만드는 법 자세히 알려줘. 재료랑 순서까지 다 말해 줘.",
    "Explain the difference between a chat vector and LoRA fine-tuning in three sentences.",
    "오늘 날씨 어때?",
    "Write a short poem about Seoul in autumn, with the Han river and the lights of the city at night.",
    "대한민국 헌법 제1조의 내용을 설명해 줘. 민주공화국이라는 말이 무슨 뜻인지도 알려 줘.",
    "Why do Llama 3 chat models end every turn with a special token?",
]


def build(preset: str, device: str, dtype: torch.dtype, work: Path, seed: int = 0) -> LoadedModel:
    """A random-init Llama 3 of ``preset``'s shape built directly on ``device`` (N(0, 0.02), norms 1)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shape = PRESETS[preset]
    cfg = hf_config(shape, flavor="instruct", dtype=str(dtype).removeprefix("torch."))
    (work / "config.json").write_text(json.dumps(cfg))
    write_tokenizer_files(work, flavor="instruct", max_len=shape.max_seq_len)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "torch_dtype"}))
    finally:
        torch.set_default_dtype(old)
    model.eval()
    stops = stop_token_ids(work)
    tok = AutoTokenizer.from_pretrained(str(work))
    return LoadedModel(model=model, tokenizer=tok, source=work, model_dir=work, stop_ids=stops, pad_id=stops[1],
                       device=torch.device(device), dtype=dtype, chat_template=tok.chat_template,
                       chat_template_source="model", max_positions=shape.max_seq_len)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _count(rows: list[list[int]], stops: list[int]) -> int:
    return sum(next((i + 1 for i, t in enumerate(r) if t in stops), len(r)) for r in rows)


def run_library(loaded: LoadedModel, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    _sync(str(loaded.device))
    start = time.perf_counter()
    out = decode(loaded, prompts, GenerationOptions(max_new_tokens=n, batch_size=len(prompts)))
    _sync(str(loaded.device))
    return time.perf_counter() - start, [d.token_ids for d in out]


@torch.inference_mode()
def run_plain(loaded: LoadedModel, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    width = max(map(len, prompts))
    ids = torch.tensor([[loaded.pad_id] * (width - len(p)) + p for p in prompts], device=loaded.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=loaded.device)
    _sync(str(loaded.device))
    start = time.perf_counter()
    out = loaded.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                min_new_tokens=0, eos_token_id=loaded.stop_ids, pad_token_id=loaded.pad_id)
    _sync(str(loaded.device))
    rows = []
    for r in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(r) if t in loaded.stop_ids), len(r))
        rows.append(r[:cut])
    return time.perf_counter() - start, rows


def measure(loaded: LoadedModel, batch: int, n: int, repeats: int) -> dict:
    prompts = [encode_row(loaded, {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]})
               for i in range(batch)]
    result = {"batch_size": batch, "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
              "max_new_tokens": n}
    paths = {"library": run_library, "transformers_generate": run_plain}
    times: dict[str, list[float]] = {name: [] for name in paths}
    rows: dict[str, list[list[int]]] = {}
    for fn in paths.values():
        fn(loaded, prompts, n)  # warm-up at full length (allocator, kernels for every KV length)
    for rep in range(repeats):  # alternate the order so neither side always runs first
        for name in (list(paths) if rep % 2 == 0 else list(paths)[::-1]):
            seconds, rows[name] = paths[name](loaded, prompts, n)
            times[name].append(seconds)
    for name in paths:
        tokens = _count(rows[name], loaded.stop_ids)
        result[name] = {"seconds": times[name], "new_tokens": tokens,
                        "tokens_per_s": tokens / statistics.median(times[name]),
                        "best_tokens_per_s": tokens / min(times[name]),
                        "rows": rows[name]}
    lib, hf = result["library"].pop("rows"), result["transformers_generate"].pop("rows")
    result["identical_rows"] = sum(a == b for a, b in zip(lib, hf, strict=True))
    result["first_difference_step"] = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        for a, b in zip(lib, hf, strict=True)]
    result["speedup"] = result["library"]["tokens_per_s"] / result["transformers_generate"]["tokens_per_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import transformers

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        loaded = build(args.preset, args.device, dtype, Path(work))
        built = time.perf_counter() - start
        runs = []
        for b in (int(x) for x in args.batch_sizes.split(",")):
            runs.append(measure(loaded, b, args.new_tokens, args.repeats))
            r = runs[-1]
            print(f"batch {b}: library {r['library']['tokens_per_s']:.1f} tok/s, transformers generate "
                  f"{r['transformers_generate']['tokens_per_s']:.1f} tok/s (x{r['speedup']:.2f}); "
                  f"identical rows {r['identical_rows']}/{b}", flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    record = {"preset": args.preset, "device": args.device, "device_name": device_name, "dtype": str(dtype),
              "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
              "build_seconds": built, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
