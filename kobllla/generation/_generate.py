"""Batch generation with a Hugging Face model: left-padded batches, one KV-cached decode loop.

The loop is the one ``transformers`` ``generate`` runs (prefill with ``position_ids = cumsum(mask) - 1``,
then one token per step with the mask grown by a column; finished rows are fed the pad token), so greedy
output is ``generate(do_sample=False)``'s token for token (tests/test_generate.py compares them). What it
adds: it stops at ``<|eot_id|>`` and ``<|end_of_text|>`` whatever the checkpoint's eos says, reports why
each row stopped and when, and samples each row with its own generator seeded from ``(seed, id)``, so a
sampled answer does not depend on ``--batch-size`` or on a resumed run.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kobllla.atomic import refuse_output_over_inputs, write_json
from kobllla.chat_format import LLAMA3_CHAT_TEMPLATE, stop_token_ids
from kobllla.generation._prompts import read_prompts, row_key
from kobllla.jsonl import read_json
from kobllla.model_dir import resolve_model_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate; the same fields are the flags of ``tools.generate`` and ``tools.chat``."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "auto"  # auto: float32 on CPU (bf16 is several times slower there), the checkpoint's on CUDA

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "finite and >= 0 (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("dtype", self.dtype in ("auto", *DTYPES), f"one of auto, {', '.join(DTYPES)}"),
            ("device", re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None, "cpu, cuda or cuda:N"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: must be {want}")


@dataclass
class LoadedModel:
    """A model ready to generate: the transformers model and tokenizer plus its stop settings."""

    model: object
    tokenizer: object
    source: Path  # what the user passed
    model_dir: Path  # what was loaded (a merged dir for an adapter-only epoch_N/)
    stop_ids: list[int]
    pad_id: int
    device: torch.device
    dtype: torch.dtype
    chat_template: str
    chat_template_source: str  # "model" or "llama3 (the model has none)"
    max_positions: int
    _scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def close(self) -> None:
        """Frees the model and removes a merged adapter dir."""
        self.model = None
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None


def _torch_dtype(model_dir: Path, dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return DTYPES.get(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16", torch.bfloat16)


def _device(name: str) -> torch.device:
    if re.fullmatch(r"cpu|cuda(:\d+)?", name) is None:
        raise ValueError(f"--device {name!r}: must be cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch has no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


def load_model(model: Path, *, base: Path | None = None, device: str = "cpu", dtype: str = "auto") -> LoadedModel:
    """Loads any stage's output (see :func:`kobllla.model_dir.resolve_model_dir`) for generation.

    Raises:
        FileNotFoundError / ValueError: one line, from :func:`resolve_model_dir` or a bad device/dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    GenerationOptions(device=device, dtype=dtype)  # validates both
    dev = _device(device)
    scratch = None
    if base is not None:
        scratch = tempfile.TemporaryDirectory(prefix="kobllla-merged-")
    try:
        model_dir = resolve_model_dir(Path(model), base=base, scratch=Path(scratch.name) if scratch else None)
        torch_dtype = _torch_dtype(model_dir, dtype, dev)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        hf_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype)
    except BaseException:
        if scratch is not None:
            scratch.cleanup()
        raise
    hf_model.to(dev).eval()
    template = getattr(tokenizer, "chat_template", None)
    stops = stop_token_ids(model_dir)
    gen_eos = getattr(hf_model.generation_config, "eos_token_id", None)
    stops += [i for i in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) if i is not None and i not in stops]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[1]  # <|end_of_text|>
    return LoadedModel(
        model=hf_model, tokenizer=tokenizer, source=Path(model), model_dir=model_dir, stop_ids=stops, pad_id=pad,
        device=dev, dtype=torch_dtype, chat_template=template or LLAMA3_CHAT_TEMPLATE,
        chat_template_source="model" if template else "llama3 (the model has none)",
        max_positions=int(getattr(hf_model.config, "max_position_embeddings", 8192)), _scratch=scratch,
    )


def encode_row(loaded: LoadedModel, row: dict) -> list[int]:
    """Prompt token ids: the chat template with the assistant header for ``messages``, raw text for ``prompt``."""
    tok = loaded.tokenizer
    if "messages" in row:
        text = tok.apply_chat_template(row["messages"], chat_template=loaded.chat_template, tokenize=False,
                                       add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])
    return list(tok(row["prompt"])["input_ids"])


def row_seed(seed: int, rid: str | int) -> int:
    """The seed of one row's sampler, from ``--seed`` and the row id (independent of batching)."""
    digest = hashlib.sha256(f"{seed}\0{row_key(rid)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class Decoded:
    """One row's result of :func:`decode`."""

    token_ids: list[int]
    stop_reason: str  # "eos" or "max_new_tokens"
    seconds: float


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _pick(logits: torch.Tensor, options: GenerationOptions, gens: list[torch.Generator]) -> torch.Tensor:
    """Next tokens from fp32 last-position logits: argmax, or temperature + top-p sampling per row."""
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / options.temperature, dim=-1)
    if options.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= options.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])


@torch.inference_mode()
def decode(loaded: LoadedModel, prompts: list[list[int]], options: GenerationOptions, *,
           seeds: list[int] | None = None, on_token: Callable[[int, int], None] | None = None) -> list[Decoded]:
    """Generates for a batch of prompt id lists (left-padded together); ``on_token(row, id)`` streams.

    Each row stops at its first stop id (kept as its last token) or after ``max_new_tokens``.
    """
    from transformers import DynamicCache

    model, dev = loaded.model, loaded.device
    ids, mask = _left_pad(prompts, loaded.pad_id, dev)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    gens = []
    if options.temperature > 0:
        for s in seeds or [options.seed] * len(prompts):
            gens.append(torch.Generator(device=dev).manual_seed(s))
    stops = torch.tensor(loaded.stop_ids, device=dev)
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x
        cache = DynamicCache()
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: list[list[int]] = [[] for _ in prompts]
    done: list[Decoded | None] = [None] * len(prompts)
    unfinished = torch.ones(len(prompts), dtype=torch.bool, device=dev)
    unpadded = len({len(p) for p in prompts}) == 1  # no padding: no mask, as generate drops an all-ones mask
    start = time.perf_counter()
    step_ids = ids
    for step in range(options.max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=None if unpadded else mask, position_ids=pos,
                       use_cache=True, logits_to_keep=1, **{cache_kw: cache}).logits[:, -1, :].float()
        nxt = torch.where(unfinished, _pick(logits, options, gens), loaded.pad_id)  # finished rows get pad
        stop_now = torch.isin(nxt, stops) & unfinished
        tokens, stopped = torch.stack([nxt, stop_now.long()]).tolist()  # the step's one device sync
        now = time.perf_counter() - start
        for i, tid in enumerate(tokens):
            if done[i] is not None:
                continue
            out[i].append(tid)
            if on_token is not None:
                on_token(i, tid)
            if stopped[i]:
                done[i] = Decoded(out[i], "eos", now)
            elif step + 1 == options.max_new_tokens:
                done[i] = Decoded(out[i], "max_new_tokens", now)
        if all(d is not None for d in done):
            break
        unfinished &= ~stop_now
        step_ids = nxt[:, None]
        if not unpadded:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        pos = pos[:, -1:] + 1
    return [d for d in done if d is not None]


def _check_length(loaded: LoadedModel, row: dict, n: int, options: GenerationOptions) -> None:
    if n + options.max_new_tokens > loaded.max_positions:
        where = f"line {row['line']}, " if "line" in row else ""
        raise ValueError(f"row {row['id']!r} ({where}field '{'messages' if 'messages' in row else 'prompt'}'): "
                         f"{n} prompt tokens + --max-new-tokens {options.max_new_tokens} exceed the model's "
                         f"max_position_embeddings {loaded.max_positions}; shorten it or lower --max-new-tokens")


def encode_rows(loaded: LoadedModel, rows: list[dict], options: GenerationOptions) -> list[list[int]]:
    """Prompt ids of every row, each checked to fit the model's positions with ``max_new_tokens``.

    Raises:
        ValueError: naming the row (id, line, field) that does not fit.
    """
    encoded = [encode_row(loaded, row) for row in rows]
    for row, ids in zip(rows, encoded, strict=True):
        _check_length(loaded, row, len(ids), options)
    return encoded


def generate_rows(loaded: LoadedModel, rows: list[dict], options: GenerationOptions, *,
                  encoded: list[list[int]] | None = None) -> Iterator[dict]:
    """Answers validated prompt rows in order, ``options.batch_size`` at a time.

    Yields per row ``{"id", "text", "token_ids", "stop_reason", "new_tokens", "seconds"}``: ``token_ids``
    are the generated ids (the stop token last when ``stop_reason`` is ``eos``), ``text`` their decoding
    without the stop token and special tokens. The rows of a batch are decoded together, so no row has a
    time of its own: ``seconds`` is the row's share of its batch's wall time (batch time / rows in the
    batch; the ``seconds`` of all rows add up to the generation time).
    """
    encoded = encode_rows(loaded, rows, options) if encoded is None else encoded
    for b in range(0, len(rows), options.batch_size):
        batch = rows[b:b + options.batch_size]
        seeds = [row_seed(options.seed, row["id"]) for row in batch]
        t0 = time.perf_counter()
        results = decode(loaded, encoded[b:b + options.batch_size], options, seeds=seeds)
        batch_seconds = time.perf_counter() - t0
        for row, res in zip(batch, results, strict=True):
            body = res.token_ids[:-1] if res.stop_reason == "eos" else res.token_ids
            yield {
                "id": row["id"],
                "text": loaded.tokenizer.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False),
                "token_ids": res.token_ids,
                "stop_reason": res.stop_reason,
                "new_tokens": len(res.token_ids),
                "seconds": round(batch_seconds / len(batch), 4),
            }


@dataclass(frozen=True)
class GenerateSummary:
    """What :func:`generate_file` did."""

    out: Path
    model_dir: Path
    rows: int  # in the prompts file
    skipped: int  # already in --out
    generated: int
    new_tokens: int
    stopped: int  # generated rows that ended at a stop token
    seconds: float  # generation wall time

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def done_ids(out: Path, prompts: Path, wanted: set[str]) -> set[str]:
    """Ids already answered in ``out``; a last line cut off by a killed run is removed first.

    Raises:
        ValueError: a line that is not an output row, or an id the prompts file does not have.
    """
    if not out.exists():
        return set()
    if not out.is_file():
        raise ValueError(f"--out {out} is a directory; pass a .jsonl file path")
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping an unfinished last line (%d bytes) left by a killed run", out, len(data) - keep)
        with open(out, "r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    seen = set()
    for line_no, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or "id" not in obj or "token_ids" not in obj:
            raise ValueError(f"{out}: line {line_no}: not a row written by tools.generate; pick another --out")
        key = row_key(obj["id"])
        if key not in wanted:
            raise ValueError(f"{out}: line {line_no}: field 'id' {key} is not in {prompts}; this --out belongs "
                             "to another prompts file: pick another --out")
        seen.add(key)
    return seen


def generate_file(*, model: Path, prompts: Path, out: Path, options: GenerationOptions,
                  base: Path | None = None, progress: bool = True) -> GenerateSummary:
    """Answers every row of ``prompts`` into ``out`` (JSON Lines), resumably.

    Rows already in ``out`` (by id) are skipped; each new row is appended as one whole line and flushed,
    so a killed run leaves only complete rows (an unfinished last line is dropped on the next run).
    ``OUT.settings.json`` records the model and the flags that decide a row's text; a resume with
    others is refused. Prompts are validated before the model loads.

    Raises:
        ValueError / FileNotFoundError: one line (bad prompts, bad model dir, ``out`` over an input).
    """
    prompts, out = Path(prompts), Path(out)
    if not prompts.is_file():
        raise FileNotFoundError(f"prompts file {prompts} {'is a directory' if prompts.exists() else 'does not exist'}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; pass a .jsonl file path")
    refuse_output_over_inputs(out, [prompts, Path(model), base])
    rows = read_prompts(prompts)
    settings = check_resume_settings(out, model=Path(model), base=base, options=options)
    skip = done_ids(out, prompts, {row_key(r["id"]) for r in rows})
    todo = [r for r in rows if row_key(r["id"]) not in skip]
    loaded = load_model(Path(model), base=base, device=options.device, dtype=options.dtype)
    try:
        return _write_rows(loaded, todo, out, options, total=len(rows), skipped=len(rows) - len(todo),
                           progress=progress, settings=settings)
    finally:
        loaded.close()


# What decides a row's text; batch size and device do not (greedy rows equal their unbatched run).
_RESUME_KEYS = ("max_new_tokens", "temperature", "top_p", "seed", "dtype")


def settings_path(out: Path) -> Path:
    """The sidecar recording what wrote ``out``: ``OUT.settings.json`` beside it."""
    return out.with_name(out.name + ".settings.json")


def check_resume_settings(out: Path, *, model: Path, base: Path | None, options: GenerationOptions) -> dict:
    """The settings that decide ``out``'s rows; refuses a resume whose model or flags differ from its sidecar.

    Raises:
        ValueError: naming the flag that differs and both values.
    """
    want = {"model": str(model.resolve()), "base": None if base is None else str(Path(base).resolve()),
            **{k: getattr(options, k) for k in _RESUME_KEYS}}
    side = settings_path(out)
    have = read_json(side) if out.is_file() and out.stat().st_size > 0 else None
    for key, value in want.items() if have is not None else ():
        if have.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{out} was written with {flag} {have.get(key)!r}, not {value!r} ({side}); "
                             f"rerun with the same {flag} to resume, or pick a new --out")
    return want


def _write_rows(loaded: LoadedModel, todo: list[dict], out: Path, options: GenerationOptions, *, total: int,
                skipped: int, progress: bool, settings: dict) -> GenerateSummary:
    from tqdm import tqdm

    encoded = encode_rows(loaded, todo, options)  # every row checked before --out is touched
    tokens = stopped = 0
    start = time.perf_counter()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not (out.is_file() and out.stat().st_size > 0):  # a new file: these settings start it
            write_json(settings_path(out), settings)
        fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OSError(f"--out {out}: cannot write there ({exc.strerror or exc}); pick a writable path") from None
    try:
        with tqdm(total=len(todo), desc="generate", unit="row", disable=not progress or not todo) as bar:
            for res in generate_rows(loaded, todo, options, encoded=encoded):
                line = (json.dumps(res, ensure_ascii=False) + "\n").encode("utf-8")
                if os.write(fd, line) != len(line):
                    raise OSError(f"{out}: short write (disk full?); rerun to resume")
                tokens += res["new_tokens"]
                stopped += res["stop_reason"] == "eos"
                bar.update(1)
    finally:
        os.close(fd)
    return GenerateSummary(out=out, model_dir=loaded.model_dir, rows=total, skipped=skipped, generated=len(todo),
                           new_tokens=tokens, stopped=stopped, seconds=time.perf_counter() - start)
