"""Claims about the chat vector's numpy arithmetic: its output bits equal torch's
``dtype(fp32(t) + ratio * (fp32(i) - fp32(b)))`` for every input and output dtype, edge values
included (ties, subnormals, values that round to the dtype's max), and a merge of safetensors
inputs runs without importing torch at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kobllla.chat_vector import ChatVectorOptions, apply_chat_vector, extract_chat_vector, merge_chat_vector

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4, "intermediate_size": 6,
          "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 8,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32, "f64": torch.float64}
EDGE = "model.embed_tokens.weight"  # edge values: in the target (vector 0) and in the vector (target 0)
RANDOM = "model.layers.0.mlp.up_proj.weight"  # N(0, 1) x 2^k, k in [-30, 10]: ties, subnormals, cancellation

_TIES = [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-23, 1 + 2**-11, 1 + 3 * 2**-11, 2**-133, 3 * 2**-133, 2**-25]
_EDGES = [0.0, 1e-45, 2**-149, 2**-126 - 2**-149, 2**-126, 9.2e-41, 2**-24, 2**-25 + 2**-40, 6.1e-5, 65504.0,
          65519.99, 65520.0, 3.3895313892515355e38, 3.3961e38, 3.3961775292304077e38, 3.4028234663852886e38,
          1e300, 1e-300, *_TIES]


def _values(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """float64 base / instruct / target values; see EDGE and RANDOM."""
    g = np.random.default_rng(seed)
    edges = np.array(_EDGES + [-e for e in _EDGES])
    zero = np.zeros_like(edges)
    scale = 2.0 ** g.integers(-30, 11, 4096)
    b = g.standard_normal(4096) * scale
    i = b + g.standard_normal(4096) * scale * 0.1
    t = g.standard_normal(4096) * scale
    base = {EDGE: np.concatenate([zero, zero]), RANDOM: b, "lm_head.weight": g.standard_normal(32)}
    inst = {EDGE: np.concatenate([zero, edges]), RANDOM: i, "lm_head.weight": g.standard_normal(32)}
    targ = {EDGE: np.concatenate([edges, zero]), RANDOM: t, "lm_head.weight": g.standard_normal(32)}
    return base, inst, targ


def _save(path: Path, values: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {n: torch.from_numpy(v).to(dtype).reshape(-1, 4).contiguous() for n, v in values.items()}
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(CONFIG))
    return tensors


def _finite_only(roles: dict[str, dict[str, torch.Tensor]], out: dict[str, torch.Tensor]) -> None:
    """Zeroes every element where an input or the reference result is not finite (a merge
    refuses those), in every role, so the merge runs."""
    for name in out:
        bad = ~torch.isfinite(out[name].float())
        for tensors in roles.values():
            bad |= ~torch.isfinite(tensors[name].float())
        for tensors in roles.values():
            tensors[name][bad] = 0


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _reference(b: dict, i: dict, t: dict, ratio: float, out: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: (t[k].float() + ratio * (i[k].float() - b[k].float())).to(out or t[k].dtype) for k in t}


def _trio(tmp_path: Path, dtypes: tuple[str, str, str], ratio: float, out: torch.dtype | None):
    """Three checkpoints in the given dtypes, holding only values a merge accepts, and the
    torch reference of the merge."""
    roles = dict(zip(("base", "instruct", "target"), _values(0), strict=True))
    tensors = {r: {n: torch.from_numpy(v).to(DTYPES[d]) for n, v in roles[r].items()}
               for r, d in zip(roles, dtypes, strict=True)}
    _finite_only(tensors, _reference(tensors["base"], tensors["instruct"], tensors["target"], ratio, out))
    paths = {}
    for role, d in zip(roles, dtypes, strict=True):
        paths[role] = tmp_path / role
        _save(paths[role], {n: v.double().numpy() for n, v in tensors[role].items()}, DTYPES[d])
    saved = {r: load_file(paths[r] / "model.safetensors") for r in roles}
    return paths, _reference(saved["base"], saved["instruct"], saved["target"], ratio, out)


def _assert_same_bits(out_dir: Path, want: dict[str, torch.Tensor]) -> None:
    got = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        got.update(load_file(f))
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype and got[name].shape == w.shape, name
        differ = (_bits(got[name]) != _bits(w)).nonzero()
        assert differ.numel() == 0, f"{name}: first differing byte {int(differ[0])}"


@pytest.mark.parametrize("dtypes", [("bf16", "bf16", "bf16"), ("f16", "f16", "f16"), ("f32", "f32", "f32"),
                                    ("f64", "f64", "f64"), ("bf16", "f32", "f16"), ("f64", "bf16", "f32")])
@pytest.mark.parametrize("out", ["auto", "bfloat16", "float16", "float32"])
@pytest.mark.parametrize("ratio", [1.0, 0.37])
def test_merge_bits_equal_torchs_formula_for_every_dtype_with_edge_values(
        tmp_path: Path, dtypes: tuple[str, str, str], out: str, ratio: float) -> None:
    paths, want = _trio(tmp_path, dtypes, ratio, None if out == "auto" else getattr(torch, out))
    merge_chat_vector(**paths, out=tmp_path / "o", options=ChatVectorOptions(
        ratio=ratio, dtype=out, chunk_elements=1001, workers=3, hash_files=False))
    _assert_same_bits(tmp_path / "o", want)


def test_the_edge_values_survive_and_the_bit_test_would_catch_fma_or_a_float64_ratio(tmp_path: Path) -> None:
    """The inputs keep ties, subnormals and values just above bfloat16's max (which round down
    to it), and torch's float32 result differs somewhere from a fused multiply-add and from a
    ratio kept in float64: the float32-output cases above can tell those apart."""
    paths, want = _trio(tmp_path, ("f32", "f32", "f32"), 0.37, torch.bfloat16)
    b, i, t = (load_file(paths[r] / "model.safetensors") for r in ("base", "instruct", "target"))
    kept = set(t[EDGE].view(-1).double().tolist())
    assert {3.3895313892515355e38, float(np.float32(3.3961e38)), 1 + 2**-8, 2**-133, 2**-149} <= kept
    d = i[RANDOM].float() - b[RANDOM].float()
    torch_way = t[RANDOM].float() + 0.37 * d
    fused = (t[RANDOM].double() + float(np.float32(0.37)) * d.double()).float()  # one rounding
    wide_ratio = (t[RANDOM].double() + 0.37 * d.double()).float()
    assert (torch_way != fused).any() and (torch_way != wide_ratio).any()
    assert torch.equal(want[RANDOM], torch_way.to(torch.bfloat16))


@pytest.mark.parametrize("vector_dtype", ["float32", "bfloat16"])
def test_extract_then_apply_bits_equal_torchs_formula(tmp_path: Path, vector_dtype: str) -> None:
    paths, _ = _trio(tmp_path, ("bf16", "f32", "bf16"), 1.0, torch.bfloat16)  # keeps v finite in bfloat16
    extract_chat_vector(base=paths["base"], instruct=paths["instruct"], out=tmp_path / "v",
                        options=ChatVectorOptions(vector_dtype=vector_dtype, chunk_elements=999, hash_files=False))
    b, i, t = (load_file(paths[r] / "model.safetensors") for r in ("base", "instruct", "target"))
    v = {k: (i[k].float() - b[k].float()).to(getattr(torch, vector_dtype)) for k in b}
    _assert_same_bits(tmp_path / "v", v)
    apply_chat_vector(vector=tmp_path / "v", target=paths["target"], out=tmp_path / "o",
                      options=ChatVectorOptions(ratio=-0.5, chunk_elements=999, hash_files=False))
    _assert_same_bits(tmp_path / "o", {k: (t[k].float() + -0.5 * v[k].float()).to(t[k].dtype) for k in t})


def test_tied_embeddings_merge_bits_equal_torchs_formula(tmp_path: Path) -> None:
    roles = dict(zip(("base", "instruct", "target"), _values(1), strict=True))
    tensors = {}
    for role, values in roles.items():
        values.pop("lm_head.weight")
        tensors[role] = _save(tmp_path / role, {RANDOM: values[RANDOM]}, torch.bfloat16)
        cfg = {**CONFIG, "tie_word_embeddings": True}
        (tmp_path / role / "config.json").write_text(json.dumps(cfg))
    merge_chat_vector(base=tmp_path / "base", instruct=tmp_path / "instruct", target=tmp_path / "target",
                      out=tmp_path / "o", options=ChatVectorOptions(ratio=0.37, hash_files=False))
    _assert_same_bits(tmp_path / "o", _reference(tensors["base"], tensors["instruct"], tensors["target"], 0.37, None))


_NO_TORCH = """import sys
from tools.chat_vector import main
rc = main(sys.argv[1:])
loaded = [m for m in ("torch", "safetensors.torch") if m in sys.modules]
print("torch modules loaded:", loaded)
sys.exit(rc or (3 if loaded else 0))
"""


def test_cli_merges_safetensors_inputs_without_importing_torch(tmp_path: Path) -> None:
    paths, want = _trio(tmp_path, ("bf16", "bf16", "bf16"), 0.37, None)
    argv = [f"--{r}={p}" for r, p in paths.items()] + [f"--out={tmp_path / 'o'}", "--ratio=0.37", "--quiet"]
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, *argv], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torch modules loaded: []" in done.stdout
    _assert_same_bits(tmp_path / "o", want)
    manifest = json.loads((tmp_path / "o" / "kobllla_manifest.json").read_text())
    assert all(len(f["sha256"]) == 64 for f in manifest["outputs"])  # hashed as usual
