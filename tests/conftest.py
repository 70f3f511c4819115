"""Shared fixtures: the real Llama 3 tokenizer, fixture paths, tiny HF checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

ASSETS = Path(__file__).parent / "assets"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS


def make_llama3_tokenizer(max_seq_len: int | None = None):
    from torchtune.models.llama3 import llama3_tokenizer

    from kobllla.assets import llama3_tokenizer_model_path

    return llama3_tokenizer(str(llama3_tokenizer_model_path()), max_seq_len=max_seq_len)


@pytest.fixture(scope="session")
def llama3_tok():
    """torchtune's Llama3Tokenizer on Meta's tokenizer.model, no length limit."""
    return make_llama3_tokenizer()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A random-init tiny Llama 3 base checkpoint in HF format (seed 0, bf16)."""
    from kobllla.tiny_model import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny-base", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_instruct(tmp_path_factory) -> Path:
    """Its instruct sibling (seed 1, eos <|eot_id|>)."""
    from kobllla.tiny_model import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny-instruct", preset="tiny", flavor="instruct", seed=1)


# The whole suite peaks at ~6.3 GB under pytest's temporary directory (measured with `df` every 2 s, 2026-12-07);
# a full disk shows up as ENOSPC errors in whichever tests come last. Refuse to start instead.
_FULL_RUN_TESTS = 100
_FULL_RUN_FREE_GB = 10


def pytest_collection_finish(session: pytest.Session) -> None:
    if len(session.items) < _FULL_RUN_TESTS or session.config.option.collectonly:
        return
    import shutil

    factory = getattr(session.config, "_tmp_path_factory", None)  # pytest's own (tmpdir plugin); gone if disabled
    if factory is None:
        return
    base = factory.getbasetemp()
    free_gb = shutil.disk_usage(base).free / 1e9
    if free_gb < _FULL_RUN_FREE_GB:
        pytest.exit(
            f"{base}: {free_gb:.1f} GB free, and {len(session.items)} tests need ~{_FULL_RUN_FREE_GB} GB there; "
            "free space (old /tmp/pytest-of-*/pytest-N runs) or pass --basetemp DIR on a larger disk",
            returncode=4,
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests are deselected by default (addopts); a `-m` of one's own brings them back, so skip them
    without CUDA rather than fail (the README's `-m "not integration"` did)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run it through the device tool)")
    for item in gpu:
        item.add_marker(skip)
