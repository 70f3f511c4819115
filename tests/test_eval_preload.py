"""The shared-prefix scorer's model built from weights preloaded in a thread equals the plain load.

Reference: the same ``SharedPrefixHFLM`` loaded the usual way (lm_eval's ``from_pretrained``) on the
same tiny checkpoint: every parameter and buffer equal, and the same log-likelihoods.
"""

from __future__ import annotations

import torch
from lm_eval.api.instance import Instance
from safetensors.torch import save_file

from kobllla.evaluation._preload import model_weight_files, preloaded_state, start_preload
from kobllla.evaluation._shared_prefix import SharedPrefixHFLM

PAIRS = [("Q: What is the capital of Korea?\nA:", " Seoul"), ("Q: What is the capital of Korea?\nA:", " Busan"),
         ("Q: 대한민국의 수도는?\nA:", " 서울입니다.")]


def _lm(path, preloaded=None):
    return SharedPrefixHFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=1, preloaded=preloaded)


def _scores(lm):
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(PAIRS)]
    return lm.loglikelihood(reqs, disable_tqdm=True)


def test_model_built_from_preloaded_weights_equals_the_plain_load(tiny_base):
    future = start_preload(tiny_base, "cpu")
    state = future.result()
    assert set(state) and all(t.device.type == "cpu" for t in state.values())
    plain, pre = _lm(tiny_base), _lm(tiny_base, preloaded=future)
    assert pre._preloaded is None  # consumed by _create_model
    a, b = plain.model.state_dict(), pre.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name, buf in plain.model.named_buffers():  # non-persistent buffers (rotary inv_freq) too
        assert torch.equal(buf, dict(pre.model.named_buffers())[name]), name
    assert pre.model.dtype == plain.model.dtype == torch.float32
    assert _scores(pre) == _scores(plain)


def test_a_failed_preload_falls_back_to_the_usual_load(tiny_base, tmp_path, caplog):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    future = start_preload(broken, "cpu")
    assert preloaded_state(future) is None
    assert "loading them the usual way" in caplog.text
    lm = _lm(tiny_base, preloaded=start_preload(broken, "cpu"))
    assert _scores(lm) == _scores(_lm(tiny_base))


def test_preload_reads_what_transformers_loads_and_not_the_adapter_beside_it(tiny_base, tmp_path):
    """A torchtune epoch dir: sharded weights + index, and adapter_model.safetensors next to them."""
    from kobllla.tiny_model import make_model

    epoch = make_model(tmp_path / "epoch_0", preset="tiny", seed=0, max_shard_bytes=40 * 10**6)
    shards = sorted(epoch.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 4)}, epoch / "adapter_model.safetensors")
    assert model_weight_files(epoch) == shards
    state = start_preload(epoch, "cpu").result()
    assert not any(k.startswith("base_model.") for k in state)
    assert set(state) == set(_lm(epoch).model.state_dict())


def test_nothing_to_preload_without_safetensors_weights_or_when_turned_off(tiny_base, tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    assert start_preload(tmp_path, "cpu") is None
    assert preloaded_state(None) is None
    monkeypatch.setenv("KOBLLLA_PRELOAD", "0")
    assert start_preload(tiny_base, "cpu") is None
