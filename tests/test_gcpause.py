"""``kobllla.gcpause``: the collector's state comes back; freezing happens only where a command opted in, once."""

from __future__ import annotations

import gc

import pytest

from kobllla import gcpause


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(gcpause, "FREEZE_IMPORTS", False)
    monkeypatch.setattr(gcpause, "_frozen", False)
    was = gc.isenabled()
    yield
    gc.unfreeze()
    gc.enable() if was else gc.disable()


def test_paused_gc_turns_the_collector_off_inside_and_back_to_what_it_was(fresh):
    for start in (True, False):
        gc.enable() if start else gc.disable()
        with gcpause.paused_gc():
            assert not gc.isenabled()
        assert gc.isenabled() is start
    with pytest.raises(RuntimeError), gcpause.paused_gc():  # also when the block raises
        raise RuntimeError
    assert gc.isenabled() is False


def test_freeze_moves_what_exists_to_the_permanent_generation_only_when_asked(fresh):
    gc.enable()
    base = gc.get_freeze_count()
    with gcpause.paused_gc():
        keep = [[] for _ in range(1000)]
    assert gc.get_freeze_count() == base
    with gcpause.paused_gc(freeze=True):
        keep += [[] for _ in range(1000)]
    assert gc.get_freeze_count() >= base + 2000 and gc.isenabled()


def test_heavy_imports_freeze_once_and_only_for_a_command(fresh):
    gc.enable()
    with gcpause.heavy_imports():  # a library caller: the pause, no freeze
        assert not gc.isenabled()
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    gcpause.FREEZE_IMPORTS = True  # a command: the first block freezes
    with gcpause.heavy_imports():
        pass
    frozen = gc.get_freeze_count()
    assert frozen > 0
    gc.unfreeze()
    garbage = [[] for _ in range(100)]  # later blocks (the next model of a plan) freeze nothing
    with gcpause.heavy_imports():
        pass
    assert gc.get_freeze_count() == 0 and garbage


class _Cycle:  # weak-referenceable, and kept alive only by the cycle it is part of
    def __init__(self) -> None:
        self.me = self


def test_freeze_gc_freezes_at_the_doubling_forward_calls_after_collecting_and_leaves_the_collector_on(fresh):
    import weakref

    import torch

    from kobllla.models import lora_llama3

    gc.enable()
    model = lora_llama3(["q_proj"], vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=16,
                        max_seq_len=32, lora_rank=2, lora_alpha=4, freeze_gc=True)
    hook = next(iter(model._forward_pre_hooks.values()))
    state = hook.__wrapped__ if hasattr(hook, "__wrapped__") else hook
    tokens = torch.randint(0, 64, (1, 8))
    garbage = weakref.ref(_Cycle())  # cyclic garbage made before the first freeze: collected, not frozen
    model(tokens)
    assert garbage() is None and gc.get_freeze_count() > 0 and gc.isenabled()
    freezes = []
    for _ in range(8):  # calls 2..9: freezes at 2, 4 and 8 only
        keep = [[] for _ in range(10)]  # something alive at the next freeze
        model(tokens)
        freezes.append(state.freezes)
        assert gc.get_freeze_count() >= len(keep)
    assert freezes == [2, 2, 3, 3, 3, 3, 4, 4] and state.calls == 9
    later = weakref.ref(_Cycle())  # the collector still collects what comes after
    gc.collect()
    assert later() is None
    with pytest.raises(ValueError, match="last must be a positive int, got 0"):
        gcpause.FreezeWhileWarming(0)


def test_freeze_gc_stops_after_last():
    hook = gcpause.FreezeWhileWarming(last=2)
    try:
        for _ in range(5):
            hook(None, ())
        assert hook.freezes == 2 and hook.calls == 5
    finally:
        gc.unfreeze()


@pytest.mark.integration  # two real `tune run`s of the shipped stage-1 config at the tiny shape (~30 CPU-s)
def test_the_shipped_config_s_freeze_gc_reaches_the_recipe_and_changes_no_loss(tmp_path, tiny_base):
    import json
    import sys

    from tests._tiny_recipe import ROOT, tiny_stage1_losses

    got = {}
    for freeze in (True, False):
        run = tmp_path / str(freeze)
        probe = [sys.executable, str(ROOT / "bench" / "gc_probe.py"), str(run / "gc.json"), "torchtune._cli.tune"]
        shipped, losses = tiny_stage1_losses(run, tiny_base, model={"freeze_gc": freeze}, launcher=probe)
        assert shipped["model"]["freeze_gc"] is True  # the shipped config's
        got[freeze] = (losses, json.loads((run / "gc.json").read_text(encoding="utf-8"))["frozen_at_exit"])
    (losses, frozen), (plain_losses, plain_frozen) = got[True], got[False]
    assert len(losses) >= 2 and losses == plain_losses
    assert frozen > 100_000 and plain_frozen < frozen  # the imports' own freezes aside, ours froze the recipe's heap
