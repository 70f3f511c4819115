"""``persistent_norms``: inductor compiles row reductions up to the model's width in one pass."""

from __future__ import annotations

import types

import pytest
import sympy
import torch
from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.sizevars import SizeVarAllocator
from torch._inductor.virtualized import V

from kobllla.models import lora_llama3
from kobllla.models._persistent import PersistentRowChoices, use_persistent_rows


def _features(numel: int, hint: ReductionHint):  # the two things the heuristic reads of SIMDKernelFeatures
    return types.SimpleNamespace(reduction_numel=sympy.Integer(numel), get_reduction_hint=lambda: hint,
                                 numel=sympy.Integer(8192))


@pytest.fixture
def graph():
    with V.set_graph_handler(types.SimpleNamespace(sizevars=SizeVarAllocator())):
        yield


@pytest.fixture
def clean_choices():
    from torch._inductor import virtualized

    before, default = inductor_config.inductor_choices_class, virtualized._choices._default
    yield
    inductor_config.inductor_choices_class = before
    virtualized._choices._default = default
    V.set_choices_handler(InductorChoices())


def test_rows_up_to_the_width_are_persistent_where_inductor_would_loop(graph):
    ours, stock = PersistentRowChoices(4096), InductorChoices()
    for numel, want_ours, want_stock in ((1024, True, True), (4096, True, False), (8192, False, False)):
        f = _features(numel, ReductionHint.INNER)
        assert ours.should_use_persistent_reduction(f, False) is want_ours, numel
        assert stock.should_use_persistent_reduction(f, False) is want_stock, numel


def test_other_reductions_keep_inductor_s_choice(graph):
    ours, stock = PersistentRowChoices(4096), InductorChoices()
    f = _features(4096, ReductionHint.OUTER)  # a column sum: inductor's rules, not ours
    assert ours.should_use_persistent_reduction(f, False) is stock.should_use_persistent_reduction(f, False) is False
    assert ours.should_use_persistent_reduction(_features(4096, ReductionHint.INNER), True) is False
    with inductor_config.patch({"triton.persistent_reductions": False}):  # the user's switch still wins
        assert ours.should_use_persistent_reduction(_features(512, ReductionHint.INNER), False) is False


def test_the_builder_option_installs_the_choices_for_the_model_s_width(clean_choices):
    inductor_config.inductor_choices_class = None
    lora_llama3(["q_proj", "v_proj"], vocab_size=64, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=96,
                max_seq_len=32, lora_rank=4, lora_alpha=8, persistent_norms=True)
    made = inductor_config.inductor_choices_class()
    assert isinstance(made, PersistentRowChoices) and made.max_row == 96
    assert isinstance(V.choices, PersistentRowChoices) and V.choices.max_row == 96
    assert made.uuid() == "kobllla.models._persistent.PersistentRowChoices(max_row=96)"
    assert isinstance(inductor_config.save_config_portable(), dict)  # the compile caches can key on it


def test_someone_else_s_choices_class_is_left_in_place(clean_choices, caplog):
    class Theirs(InductorChoices):
        pass

    inductor_config.inductor_choices_class = Theirs
    assert use_persistent_rows(4096) is False
    assert inductor_config.inductor_choices_class is Theirs and "leaving it" in caplog.text
    with pytest.raises(ValueError, match="max_row must be a positive int, got 0"):
        use_persistent_rows(0)


def test_a_thread_started_later_gets_the_choices_too(clean_choices):
    import threading

    inductor_config.inductor_choices_class = None
    use_persistent_rows(4096)
    seen = []
    t = threading.Thread(target=lambda: seen.append(V.choices))  # as the autograd thread that compiles a backward
    t.start()
    t.join()
    assert isinstance(seen[0], PersistentRowChoices) and seen[0].max_row == 4096


@pytest.mark.gpu
def test_the_rmsnorm_forward_and_backward_compile_persistent_on_cuda(tmp_path):
    """A norm feeding a frozen projection, as in a layer (bench/persistent_probe_gpu.py, each side compiled in a
    fresh process with the caches off): every 4,096-wide kernel is looped without the option, persistent with
    it, in the forward graph and in the backward's, and the input gradients agree."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "persistent_probe_gpu.py"
    spec = importlib.util.spec_from_file_location("persistent_probe_gpu", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    rows = probe.probe(["stock", "ours"], ["linear"], grads=str(tmp_path))
    assert not any("error" in r for r in rows), rows
    kernels = [r for r in rows if "kind" in r]  # the probe's other rows are inductor's persistence decisions
    kinds = {w: sorted({(r["graph"], r["kind"]) for r in kernels if r["which"] == w}) for w in ("stock", "ours")}
    for which, want in (("stock", "reduction"), ("ours", "persistent_reduction")):  # forward and backward graphs
        assert {k for _, k in kinds[which]} == {want} and len({g for g, _ in kinds[which]}) >= 2, rows
    torch.testing.assert_close(torch.load(tmp_path / "ours-linear.pt"), torch.load(tmp_path / "stock-linear.pt"),
                               rtol=2e-2, atol=1e-2)
