"""``kobllla.cli.exit_fast``: the exit status, atexit handlers and buffered output survive; a running
thread is waited for; and eval.run, which ends through it, still writes its record."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

PROBE = """
import atexit, sys, threading, time
from kobllla.cli import exit_fast
atexit.register(lambda: print("atexit ran", flush=True))
sys.stdout.write("buffered, no newline")  # a pipe: block-buffered until the flush
if sys.argv[1] == "thread":
    def late():
        time.sleep(0.3)
        print(" thread finished", end="")
    threading.Thread(target=late).start()
exit_fast(int(sys.argv[2]))
"""


def _probe(mode: str, code: int, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, mode, str(code)], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env}, timeout=60)


def test_exit_status_buffered_output_and_atexit_handlers_survive():
    for code in (0, 2, 130):
        out = _probe("plain", code)
        assert out.returncode == code, out.stderr
        assert out.stdout == "buffered, no newlineatexit ran\n"


def test_a_running_thread_is_waited_for_and_the_usual_exit_is_kept_on_request():
    out = _probe("thread", 3)
    assert out.returncode == 3 and out.stdout == "buffered, no newline thread finishedatexit ran\n", out
    out = _probe("plain", 4, KOBLLLA_FAST_EXIT="0")
    assert out.returncode == 4 and out.stdout == "buffered, no newlineatexit ran\n", out


def test_eval_run_as_a_command_writes_its_record_and_reports_a_user_error_with_status_2(tmp_path):
    from kobllla.tiny_model import make_model

    model = make_model(tmp_path / "m", preset="mini", dtype="float32", seed=0)
    data = REPO / "tests" / "assets" / "eval" / "data"
    cmd = [sys.executable, "-m", "eval.run", "--model", f"mini={model}", "--task", "truthfulqa_mc2", "--data-dir",
           str(data), "--device", "cpu", "--limit", "3", "--results-dir", str(tmp_path / "res")]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                              "HF_DATASETS_OFFLINE": "1", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "truthfulqa_mc2" in out.stdout and out.stdout.strip().splitlines()[0].startswith("mini: wrote ")
    (record,) = (tmp_path / "res" / "runs").glob("*.json")
    assert json.loads(record.read_text())["tasks"]["truthfulqa_mc2"]["n_samples"]["effective"] == 3
    bad = subprocess.run(cmd[:4] + [str(tmp_path / "nowhere")] + cmd[5:], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)})
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
