"""GGUF export of any stage's output through llama.cpp's own converter and quantizer.

One pass of the converter, then llama.cpp's quantizer for every other type::

    convert_hf_to_gguf.py MODEL --outtype SRC      SRC = f32/f16/bf16: a requested one that loses nothing of
                                                   the checkpoint's dtype first, else the checkpoint's own
                                                   precision (an intermediate, removed afterwards)
    quantize SRC -> f16, q8_0, q5_k_m, q4_k_m ...  (llama_model_quantize, or a clone's llama-quantize)

which is the path llama.cpp's README gives (convert to 16 bits, then llama-quantize) and reads the
weights through Python once. A lone converter type (``--quant q8_0``) is written by the converter.

Every file is built in a hidden sibling of ``OUTDIR`` and the directory is renamed into place when
all files are whole and verified, so a killed export leaves nothing at the final names. A chat
model (one with a chat template) must stop at ``<|eot_id|>``; when its directory says otherwise the
input is not touched: the converter reads a scratch directory of symlinks whose metadata files
carry Meta's stop settings (:func:`kobllla.chat_format.write_chat_stop_tokens`), and the manifest
says so.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from kobllla.atomic import atomic_output_dir, refuse_output_over_inputs, write_json
from kobllla.chat_format import EOT, chat_stop_token_problems, stop_token_ids, write_chat_stop_tokens
from kobllla.gguf.gguf_info import GGUFInfo, read_gguf_info
from kobllla.gguf.locate import LlamaCpp, find_llama_cpp, llama_cpp_python_version

MANIFEST = "kobllla_manifest.json"
LLAMA_BPE = "llama-bpe"


@dataclass(frozen=True)
class Quant:
    """One output type: written by the converter (``outtype``) or by the quantizer (``ftype``)."""

    name: str
    ggml_type: str  # the tensor type most matrices must get
    outtype: str | None = None  # convert_hf_to_gguf.py --outtype
    ftype: int | None = None  # llama_ftype number (vendor/llama.cpp/include/llama.h)

    @property
    def is_k_quant(self) -> bool:
        return self.ggml_type.endswith("_K")


QUANTS: dict[str, Quant] = {q.name: q for q in (
    Quant("f32", "F32", outtype="f32", ftype=0),
    Quant("f16", "F16", outtype="f16", ftype=1),
    Quant("bf16", "BF16", outtype="bf16", ftype=32),
    Quant("q8_0", "Q8_0", outtype="q8_0", ftype=7),
    Quant("q6_k", "Q6_K", ftype=18),
    Quant("q5_k_m", "Q5_K", ftype=17),
    Quant("q5_k_s", "Q5_K", ftype=16),
    Quant("q4_k_m", "Q4_K", ftype=15),
    Quant("q4_k_s", "Q4_K", ftype=14),
    Quant("q3_k_l", "Q3_K", ftype=13),
    Quant("q3_k_m", "Q3_K", ftype=12),
    Quant("q3_k_s", "Q3_K", ftype=11),
    Quant("q2_k", "Q2_K", ftype=10),
    Quant("q5_1", "Q5_1", ftype=9),
    Quant("q5_0", "Q5_0", ftype=8),
    Quant("q4_1", "Q4_1", ftype=3),
    Quant("q4_0", "Q4_0", ftype=2),
)}
# Types llama.cpp falls back to when a row length is not a multiple of a K-quant's 256-element block.
_FALLBACK_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32"}
# Which 16/32-bit file the quantizer reads, by checkpoint dtype: first the one that loses nothing.
_QUANTIZE_SOURCE = {"bfloat16": ("bf16", "f32", "f16"), "float16": ("f16", "f32", "bf16"),
                    "float32": ("f32", "f16", "bf16")}


def parse_quants(spec: str | Sequence[str]) -> list[Quant]:
    """``"f16,q4_k_m"`` (or a list of names) -> the quants, in order, each once.

    Raises:
        ValueError: an empty list or an unknown name, listing the valid ones.
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip().lower() for n in names if n.strip()]
    if not names:
        raise ValueError(f"--quant is empty; give a comma-separated list of: {', '.join(QUANTS)}")
    for n in names:
        if n not in QUANTS:
            raise ValueError(f"unknown quant {n!r}; valid quants: {', '.join(QUANTS)}")
    return [QUANTS[n] for n in dict.fromkeys(names)]


def default_name(model: Path) -> str:
    """File stem: the directory's name, with its parent's for a torchtune ``epoch_N``."""
    model = Path(model).resolve()
    return f"{model.parent.name}-{model.name}" if re.fullmatch(r"epoch_\d+", model.name) else model.name


def chat_template(model_dir: Path) -> str | None:
    """The model's chat template (``tokenizer_config.json`` or ``chat_template.jinja``), if any."""
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    cfg_path = model_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        return None
    try:
        template = json.loads(cfg_path.read_text(encoding="utf-8")).get("chat_template")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    return template if isinstance(template, str) and template else None


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _die_with_parent() -> None:  # preexec_fn: a SIGKILLed export takes its converter with it
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (AttributeError, OSError):  # no prctl (macOS): the child outlives a killed parent, outputs stay aside
        pass


def _failure_line(log: Path) -> str:
    """The converter's/quantizer's own reason: its last ERROR line, else the exception's last line."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:") or ln.startswith("error:")]
    if errors:
        return re.sub(r"^ERROR:[\w.-]+:", "", errors[-1]).strip()
    exc = [ln for ln in lines if re.match(r"^[A-Za-z_.]+(Error|Exception): ", ln)]
    return (exc or lines or ["no output"])[-1]


def run_logged(cmd: list[str], log: Path, *, what: str, env: dict[str, str] | None = None) -> float:
    """Runs ``cmd`` with its output in ``log``; returns seconds; raises ValueError with its reason."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
    if proc.returncode != 0:
        raise ValueError(f"{what} failed (exit {proc.returncode}): {_failure_line(log)}")
    return time.perf_counter() - start


def convert(lc: LlamaCpp, model_dir: Path, dst: Path, outtype: str, *, name: str, log: Path) -> tuple[list[str], float]:
    """``convert_hf_to_gguf.py MODEL --outfile DST --outtype T``, with its own gguf-py; -> (command, seconds)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(lc.gguf_py), env.get("PYTHONPATH")) if p)
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, str(lc.converter), str(model_dir), "--outfile", str(dst), "--outtype", outtype,
           "--model-name", name]
    return cmd, run_logged(cmd, log, what=f"llama.cpp's converter ({lc.converter.name} --outtype {outtype})", env=env)


def quantize(lc: LlamaCpp, src: Path, dst: Path, quant: Quant, *, threads: int, log: Path) -> tuple[list[str], float]:
    """llama.cpp's quantizer: the clone's ``llama-quantize`` binary, else ``llama_model_quantize``."""
    if lc.quantize_binary is not None:
        cmd = [str(lc.quantize_binary), str(src), str(dst), quant.name.upper(), str(threads)]
    else:
        cmd = [sys.executable, "-m", "kobllla.gguf._quantize", str(src), str(dst), str(quant.ftype), str(threads)]
    return cmd, run_logged(cmd, log, what=f"llama.cpp's quantizer ({quant.name})")


def quantizer_name(lc: LlamaCpp) -> str:
    if lc.quantize_binary is not None:
        return f"llama-quantize binary {lc.quantize_binary}"
    return f"llama_cpp.llama_model_quantize (llama-cpp-python {llama_cpp_python_version()})"


def check_output(info: GGUFInfo, quant: Quant, *, chat: bool, eot_id: int) -> None:
    """Refuses a GGUF that is not what was asked for (tensor types, pre-tokenizer, eos).

    Raises:
        ValueError: naming the tensor or field and the fix.
    """
    if quant.ggml_type not in info.matrix_types.values():
        raise ValueError(f"{quant.name}: llama.cpp wrote no {quant.ggml_type} tensor (types: {info.type_counts()})")
    if quant.is_k_quant:
        bad = {n: t for n, t in info.matrix_types.items() if t in _FALLBACK_TYPES}
        if bad:
            name = next(iter(bad))
            types = ", ".join(f"{t} x{n}" for t, n in Counter(bad.values()).most_common())
            raise ValueError(f"{quant.name}: llama.cpp fell back to {types} for {len(bad)} of {len(info.matrix_types)} "
                             f"matrices (e.g. {name}, rows of {info.matrix_rows[name]}): K-quants need row lengths "
                             "that are multiples of 256; use q8_0, q5_0 or q4_0 for this model")
    if info.tokenizer_pre != LLAMA_BPE:
        raise ValueError(f"{info.path.name}: tokenizer.ggml.pre is {info.tokenizer_pre!r}, not {LLAMA_BPE!r}: "
                         "llama.cpp would pre-tokenize differently from the Llama 3 tokenizer")
    if chat and info.eos_token_id != eot_id:
        raise ValueError(f"{info.path.name}: eos is {info.eos_token_id}, not {EOT} ({eot_id}); "
                         "llama.cpp would not stop at the end of a turn")


def with_chat_stop_tokens(model_dir: Path, scratch: Path, *, name: str) -> tuple[Path, dict]:
    """``(dir the converter reads, what was done)``: a chat model gets Meta's stop settings in a scratch copy.

    The scratch directory holds symlinks to every file of ``model_dir`` and copies of the four
    metadata files :func:`write_chat_stop_tokens` changes; the input is never modified. It is named
    ``name`` (the converter records the directory name in ``general.name`` only through --model-name).
    """
    template = chat_template(model_dir)
    if template is None:
        return model_dir, {"chat_template": False, "problems": [], "fixed_in_scratch": []}
    problems = chat_stop_token_problems(model_dir)
    cfg = model_dir / "config.json"
    eot_id = stop_token_ids(model_dir)[0]
    if json.loads(cfg.read_text(encoding="utf-8")).get("eos_token_id") not in (eot_id, [eot_id]):
        problems.append(f"config.json eos_token_id is not {eot_id}")
    if not problems:
        return model_dir, {"chat_template": True, "problems": [], "fixed_in_scratch": []}
    fixed = scratch / name
    fixed.mkdir(parents=True)
    copied = {"tokenizer_config.json", "special_tokens_map.json", "config.json", "generation_config.json"}
    for entry in sorted(Path(model_dir).iterdir()):
        if entry.name in copied and entry.is_file():
            shutil.copyfile(entry, fixed / entry.name)
        elif not entry.name.startswith("."):
            (fixed / entry.name).symlink_to(entry.resolve())
    changed = write_chat_stop_tokens(fixed)
    return fixed, {"chat_template": True, "problems": problems, "fixed_in_scratch": changed}


def _untrained_problems(model_dir: Path) -> list[str]:
    from kobllla.untrained import untrained_token_problems

    return untrained_token_problems(model_dir)


def _convert_source(quants: list[Quant], model_dir: Path) -> tuple[Quant, bool]:
    """``(what the converter writes, whether it is a requested output)``; the quantizer makes the rest."""
    if len(quants) == 1 and quants[0].outtype is not None:
        return quants[0], True
    dtype = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("torch_dtype") or "bfloat16"
    order = _QUANTIZE_SOURCE.get(dtype, _QUANTIZE_SOURCE["bfloat16"])
    names = {q.name for q in quants}
    for outtype in order:
        if outtype in names:
            return QUANTS[outtype], True
    return QUANTS[order[0]], False


def _check_input(model: Path, base: Path | None) -> None:
    """The model dir's own files (config.json, tokenizer) before anything is written."""
    from kobllla.model_dir import check_loadable_files, has_full_weights, resolve_model_dir

    if has_full_weights(model) or not model.is_dir():
        check_loadable_files(model)
    elif base is None:
        resolve_model_dir(model)  # adapter-only without --base, or no weights: its one-line error
    if base is not None:
        check_loadable_files(base, role="base")


def _importable_gguf_py(lc: LlamaCpp) -> None:
    """The header checks read tensor type names from gguf-py: the installed one (the ``gguf`` extra) or,
    where a user has only a llama.cpp clone, the copy the converter runs with (``LLAMA_CPP/gguf-py``)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        if not (lc.gguf_py / "gguf" / "__init__.py").is_file():
            raise FileNotFoundError(f"neither the gguf package nor {lc.gguf_py}/gguf is there: pip install "
                                    "'kobllla[gguf]' (gguf==0.19.0) or pass a full llama.cpp tree") from None
        sys.path.append(str(lc.gguf_py))


def export_gguf(
    *,
    model: Path,
    out: Path,
    quants: str | Sequence[str],
    base: Path | None = None,
    llama_cpp: Path | None = None,
    name: str | None = None,
    overwrite: bool = False,
    allow_untrained: bool = False,
    threads: int | None = None,
    fetch: bool = True,
    command: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Writes ``out/<name>-<quant>.gguf`` for each quant plus ``kobllla_manifest.json``.

    Args:
        model (Path): HF dir, torchtune ``epoch_N/``, chat-vector output, or an adapter-only
            ``epoch_N/`` (then ``base`` is required; the adapter is merged into it first).
        out (Path): output directory (built aside, renamed when whole).
        quants (str | Sequence[str]): ``"f16,q8_0,q5_k_m,q4_k_m"`` or a list; see ``QUANTS``.
        base (Path | None): the model an adapter-only ``epoch_N/`` was trained from.
        llama_cpp (Path | None): a llama.cpp clone (else ``LLAMA_CPP_DIR``, else kobllla's copy).
        name (str | None): file stem (default: the model directory's name).
        overwrite (bool): replace an existing ``out``.
        allow_untrained (bool): export a chat model whose chat-token rows are untrained.
        threads (int | None): quantizer threads (default: all cores).
        fetch (bool): fetch kobllla's llama.cpp copy with pip when missing.
        command (list[str] | None): the command line recorded in the manifest.
        progress (bool): show a tqdm bar over the steps.

    Returns:
        dict: the manifest.

    Raises:
        ValueError: unknown quant, unsupported architecture, a converter/quantizer failure, a
            chat model with untrained chat-token rows, an output that is not what was asked for.
        FileNotFoundError: no config.json / tokenizer / weights, llama.cpp missing.
        FileExistsError: ``out`` exists and ``overwrite`` is False.
    """
    start = time.perf_counter()
    model, out = Path(model), Path(out)
    base = Path(base) if base is not None else None
    todo = parse_quants(quants)
    _check_input(model, base)
    refuse_output_over_inputs(out, [model, base])
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; --out names a directory (OUT/<name>-<quant>.gguf)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pick another --out or pass --overwrite to replace it")
    stem = name or default_name(model)
    if not re.fullmatch(r"[\w.+-]+", stem) or stem.startswith("."):
        raise ValueError(f"file name stem {stem!r} (--name, default: the model directory's name): use letters, "
                         "digits, '.', '_', '+' and '-' only; pass --name")
    lc = find_llama_cpp(llama_cpp, fetch=fetch)
    _importable_gguf_py(lc)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        scratch = tmp / ".scratch"
        scratch.mkdir()
        (tmp / "logs").mkdir()
        from kobllla.model_dir import resolve_model_dir

        src = resolve_model_dir(model, base=base, scratch=scratch)
        merged = src != model
        if chat_template(src) is not None and not allow_untrained:
            problems = _untrained_problems(src)
            if problems:
                raise ValueError(f"{model}: a chat model with untrained chat-token rows ({problems[0]}; "
                                 f"{len(problems)} in all) emits garbage at every turn: export the chat-vector "
                                 f"model, or write a fixed copy with python -m tools.check_model {model} "
                                 "--fix-untrained mean --out NEWDIR, or pass --allow-untrained to export it anyway")
        src, stop_tokens = with_chat_stop_tokens(src, scratch, name=stem)
        outputs = _build(lc, src, tmp, stem, todo, threads=threads or os.cpu_count() or 1,
                         scratch=scratch, progress=progress, chat=stop_tokens["chat_template"])
        for facts in outputs.values():  # record the command with the final paths, not the temporary ones
            facts["command"] = [a.replace(str(tmp), str(out)) for a in facts["command"]]
        shutil.rmtree(scratch)
        manifest = {
            "made_by": "kobllla.gguf.export_gguf",
            "command": command or sys.argv,
            "inputs": {"model": str(model.resolve()), "base": str(base.resolve()) if base else None,
                       "merged_adapter": merged, "files": _input_files(model)},
            "stop_tokens": stop_tokens,
            "llama_cpp": {**lc.describe(), "llama_cpp_python": llama_cpp_python_version(),
                          "quantizer": quantizer_name(lc)},
            "outputs": outputs,
            "seconds": round(time.perf_counter() - start, 2),
        }
        write_json(tmp / MANIFEST, manifest)  # written last: the directory is whole
    return manifest


def _input_files(model: Path) -> dict[str, int]:
    if not model.is_dir():
        return {}
    return {str(p.relative_to(model)): p.stat().st_size for p in sorted(model.rglob("*")) if p.is_file()}


def _build(lc: LlamaCpp, src: Path, tmp: Path, stem: str, todo: list[Quant], *, threads: int, scratch: Path,
           progress: bool, chat: bool) -> dict[str, dict]:
    """Converts once and quantizes the rest into ``tmp``; returns ``{file name: facts}`` for the manifest.

    Each finished file is hashed on a thread of its own while the next step runs (at 8B the f16
    file's sha256 takes ~11 s, the Q4_K_M quantization that reads it ~70 s)."""
    eot_id = stop_token_ids(src)[0]
    source, _ = _convert_source(todo, src)
    steps = [source] + [q for q in todo if q != source]
    outputs, digests = {}, {}
    bar = tqdm(steps, desc="gguf export", unit="file", disable=not progress)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguf-sha256") as hasher:
        for q in bar:
            bar.set_postfix_str(q.name)
            is_output = q in todo
            dst = (tmp if is_output else scratch) / f"{stem}-{q.name}.gguf"
            log = tmp / "logs" / f"{q.name}.log"
            if q == source:
                cmd, seconds = convert(lc, src, dst, q.outtype, name=stem, log=log)
                made_by, source_path = f"{lc.converter.name} --outtype {q.outtype}", dst
            else:
                cmd, seconds = quantize(lc, source_path, dst, q, threads=threads, log=log)
                made_by = f"{quantizer_name(lc)} from {source_path.name}, llama_ftype {q.ftype}"
            info = read_gguf_info(dst)
            check_output(info, q, chat=chat, eot_id=eot_id)
            if is_output:
                digests[dst.name] = hasher.submit(sha256_file, dst)
                outputs[dst.name] = {
                    "quant": q.name, "bytes": dst.stat().st_size, "sha256": None, "made_by": made_by,
                    "command": cmd, "seconds": round(seconds, 2), "tensor_types": info.type_counts(),
                    "tokenizer_pre": info.tokenizer_pre, "eos_token_id": info.eos_token_id,
                    "chat_template": info.chat_template is not None,
                }
        for name, digest in digests.items():
            outputs[name]["sha256"] = digest.result()
    return {n: outputs[n] for n in (f"{stem}-{q.name}.gguf" for q in todo)}
