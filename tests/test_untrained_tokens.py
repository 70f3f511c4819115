"""Untrained chat-token rows are refused before chat training or export, and --fix-untrained mean fixes them.

The model is a real tiny Llama 3 checkpoint whose ``<|start_header_id|>``, ``<|end_header_id|>`` and
``<|eot_id|>`` rows are scaled to ~1e-7 of their norm, the pattern of Llama 3 base (unsloth#658); the fix
must set them to the mean of the other (trained) rows, as axolotl's ``fix_untrained_tokens`` does.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kobllla.tiny_model import make_model
from kobllla.untrained import find_untrained_rows, fix_untrained_mean, untrained_token_problems
from tests.conftest import REPO
from tests.test_generate import edited_copy

CHAT_IDS = [128006, 128007, 128009]
MATRICES = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("untrained")
    good = make_model(root / "good", preset="mini", flavor="instruct", seed=2, dtype="bfloat16")

    def zero(t):
        for name in MATRICES:
            t[name][CHAT_IDS] *= 1e-7

    def same(t):
        for name in MATRICES:
            t[name][CHAT_IDS] = t[name][5].clone()  # three tokens sharing one row: never told apart

    return {"root": root, "good": good, "zero": edited_copy(good, root / "zero", zero),
            "same": edited_copy(good, root / "same", same)}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_trained_rows_pass(models):
    assert untrained_token_problems(models["good"]) == []


def test_near_zero_chat_rows_are_found_in_both_matrices(models):
    rows = find_untrained_rows(models["zero"])
    assert sorted((r.matrix, r.token_id) for r in rows) == sorted((m, i) for m in MATRICES for i in CHAT_IDS)
    assert {r.token for r in rows} == {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
    assert all(r.reason == "near zero" and r.norm < 1e-3 * r.median for r in rows)
    assert untrained_token_problems(models["zero"], token_ids=[128000, 9906]) == []  # BOS, "Hello": trained
    problems = untrained_token_problems(models["zero"], token_ids=[128009])
    assert len(problems) == 2 and problems[0].startswith("model.embed_tokens.weight row 128009 <|eot_id|>: near zero")


def test_identical_chat_rows_are_found(models):
    rows = find_untrained_rows(models["same"])
    assert {(r.matrix, r.token_id) for r in rows} == {(m, i) for m in MATRICES for i in CHAT_IDS}
    assert all(r.reason.startswith("near identical to <|") for r in rows)


def check_model(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.check_model", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=180)


def test_check_model_refuses_in_one_line_then_fix_untrained_mean_sets_the_trained_mean(models):
    src = models["zero"]
    before = sha(src / "model.safetensors")
    bad = check_model(str(src))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    (line,) = bad.stderr.splitlines()
    assert line.startswith(f"error: {src}: untrained rows for <|start_header_id|>, <|end_header_id|>, <|eot_id|> "
                           "(embed_tokens, lm_head: near zero")
    assert "start from the chat-vector model" in line and "--fix-untrained mean --out NEWDIR" in line
    out = models["root"] / "fixed"
    done = check_model(str(src), "--fix-untrained", "mean", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "6 rows set to the trained mean" in done.stdout and f"ok: {out}" in done.stdout
    assert sha(src / "model.safetensors") == before
    assert check_model(str(out)).returncode == 0
    fixed, orig = load_file(str(out / "model.safetensors")), load_file(str(src / "model.safetensors"))
    others = torch.ones(orig[MATRICES[0]].shape[0], dtype=torch.bool)
    others[CHAT_IDS] = False
    for name in MATRICES:
        mean = orig[name][others].double().mean(dim=0)
        for tid in CHAT_IDS:  # equal up to the one bf16 rounding
            torch.testing.assert_close(fixed[name][tid].double(), mean, atol=1e-6, rtol=2**-8, msg=(name, tid))
        assert torch.equal(fixed[name][others], orig[name][others])
        assert fixed[name].dtype == torch.bfloat16
    for name in orig:
        if name not in MATRICES:
            assert torch.equal(fixed[name], orig[name])


def test_fix_refuses_to_write_over_its_input(models):
    with pytest.raises(ValueError, match="would overwrite or replace input"):
        fix_untrained_mean(models["zero"], models["zero"] / "inside")
    bad = check_model(str(models["zero"]), "--fix-untrained", "mean")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --fix-stop-tokens / --fix-untrained write a fixed "
                                                         "copy: pass --out NEWDIR")
