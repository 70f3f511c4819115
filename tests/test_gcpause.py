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
