"""The input prefetch that the chat-vector CLI starts before torch is imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kobllla import prefetch
from kobllla.prefetch import checkpoint_files, prefetch_files

REPO = Path(__file__).resolve().parent.parent


def _ckpt(root: Path, name: str, shards: int, size: int) -> Path:
    d = root / name
    d.mkdir()
    for i in range(shards):
        (d / f"model-{i + 1:05d}-of-{shards:05d}.safetensors").write_bytes(bytes([i]) * size)
    (d / "config.json").write_text("{}")
    return d


def test_files_are_grouped_shard_by_shard_across_the_inputs(tmp_path):
    a, b = _ckpt(tmp_path, "a", 2, 10), _ckpt(tmp_path, "b", 3, 10)
    groups = checkpoint_files([a, None, tmp_path / "missing", b])
    assert [[p.relative_to(tmp_path).as_posix() for p in g] for g in groups] == [
        ["a/model-00001-of-00002.safetensors", "b/model-00001-of-00003.safetensors"],
        ["a/model-00002-of-00002.safetensors", "b/model-00002-of-00003.safetensors"],
        ["b/model-00003-of-00003.safetensors"]]


def test_prefetch_reads_every_byte_once_and_stops_at_its_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(prefetch, "CHUNK", 1000)
    groups = checkpoint_files([_ckpt(tmp_path, "a", 2, 4500), _ckpt(tmp_path, "b", 1, 2500)])
    groups[0].append(tmp_path / "vanished.safetensors")  # unreadable: skipped, no exception
    done = prefetch_files(groups)
    done._thread.join()
    assert done.bytes_read == 2 * 4500 + 2500
    limited = prefetch_files(groups, limit=2500)
    limited._thread.join()
    assert 2500 <= limited.bytes_read < 2500 + 1000
    assert limited.stop() == limited.bytes_read


def test_prefetch_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("KOBLLLA_PREFETCH", "0")
    p = prefetch_files(checkpoint_files([_ckpt(tmp_path, "a", 1, 100)]))
    assert p.stop() == 0 and not p._thread.is_alive()


def test_chat_vector_cli_starts_before_torch_is_imported():
    code = "import sys, tools.chat_vector; assert 'torch' not in sys.modules, 'torch imported before the prefetch'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("argv", [["--base"], ["--bogus", "x", "--target", "/nonexistent"]])
def test_a_malformed_command_line_is_left_to_the_real_parser(argv, capsys):
    from tools.chat_vector import _start_prefetch

    assert _start_prefetch(argv).stop() == 0
    assert capsys.readouterr().err == ""  # the real parser prints the one usage error
