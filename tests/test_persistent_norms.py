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
    before = inductor_config.inductor_choices_class
    yield
    inductor_config.inductor_choices_class = before
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


@pytest.mark.gpu
def test_the_rmsnorm_backward_compiles_persistent_on_cuda(clean_choices):
    from torch._inductor.utils import run_and_get_code
    from torchtune.modules import RMSNorm

    norm = RMSNorm(4096).cuda().bfloat16().requires_grad_(False)
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def fwd_bwd(x):
        y = norm(x)
        (y.float() * torch.arange(4096, device="cuda")).sum().backward()
        return x.grad

    def codes(persistent: bool) -> str:
        inductor_config.inductor_choices_class = None
        V.set_choices_handler(InductorChoices())
        if persistent:
            use_persistent_rows(4096)
        torch._dynamo.reset()
        x.grad = None
        grad, code = run_and_get_code(torch.compile(fwd_bwd), x)
        return grad, "\n".join(code)

    (g0, stock), (g1, ours) = codes(False), codes(True)
    assert "@triton_heuristics.reduction" in stock and "@triton_heuristics.persistent_reduction" in ours
    assert "@triton_heuristics.reduction" not in ours
    torch.testing.assert_close(g0, g1, rtol=2e-2, atol=1e-2)
