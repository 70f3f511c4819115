"""bench/gpu_clocks.py: what a stage-1 benchmark run records of the GPU's clock and power (on CPU).

The lines are nvidia-smi's own, from the 2026-12-02 H200 run (docs/benchmarks.md), plus the forms
a driver prints for a field it cannot read. The sampler's process path runs against a stand-in
``nvidia-smi`` script that answers the one field name this test's "driver" knows.
"""

from __future__ import annotations

import importlib.util
import stat
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu_clocks", REPO / "bench" / "gpu_clocks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


clocks = _load()

H200 = [
    "2026/12/02 00:54:39.850, 345, 82.74, 0, 0x0000000000000001",          # idle
    "2026/12/02 00:56:19.881, 1680, 692.48, 100, 0x0000000000000004",      # busy, power-capped
    "2026/12/02 00:56:20.881, 1590, 695.86, 100, 0x0000000000000004",
    "2026/12/02 00:56:21.881, 1980, 450.00, 95, 0x0000000000000000",       # busy, full clock
    "2026/12/02 00:56:22.881, 1515, 691.16, 100, 0x0000000000000044",      # power cap + HW slowdown bits
    "2026/12/02 00:56:23.881, 1500, [N/A], 100, [N/A]",                    # unreadable power and reasons
    "2026/12/02 00:56:24.881, 1980, 128.21, 40, 0x0000000000000000",       # between runs: not busy
]


def test_the_summary_counts_only_busy_seconds_and_reads_the_power_cap_bit():
    got = clocks.clock_summary(H200)
    assert got["samples"] == 7 and got["busy_samples"] == 5
    assert got["sm_mhz_mean"] == round((1680 + 1590 + 1980 + 1515 + 1500) / 5, 1)
    assert (got["sm_mhz_min"], got["sm_mhz_max"]) == (1500, 1980)
    assert got["power_w_mean"] == round((692.48 + 695.86 + 450.00 + 691.16) / 4, 1)
    assert got["power_capped_share"] == 0.75 and got["clock_lowered_share"] == 0.75  # 3 of the 4 known


def test_an_idle_or_empty_log_has_no_clock_figures():
    assert clocks.clock_summary(H200[:1]) == {"samples": 1, "busy_samples": 0}
    assert clocks.clock_summary(["garbage", ""]) == {"samples": 0, "busy_samples": 0}


def test_without_nvidia_smi_the_sampler_records_nothing(tmp_path):
    with clocks.ClockSampler(exe=str(tmp_path / "no-such-nvidia-smi")) as sampler:
        pass
    assert sampler.summary() is None


def test_the_sampler_falls_back_to_the_older_field_name_and_stops_with_the_run(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        "case \"$1\" in *clocks_event_reasons*) echo 'unknown field' >&2; exit 2;; esac\n"  # an older driver
        "echo \"$@\" >> \"$(dirname \"$0\")/calls\"\n"
        "if [ \"$3\" != -lms ]; then echo '2026/12/02 00:00:00.000, 1500, 690, 100, 0x4'; exit 0; fi\n"
        "while true; do echo '2026/12/02 00:00:00.000, 1500, 690.0, 100, 0x0000000000000004'; sleep 0.05; done\n",
        encoding="utf-8")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with clocks.ClockSampler(exe=str(fake), interval_ms=50) as sampler:
        deadline = time.time() + 20
        while len(sampler.lines) < 3 and time.time() < deadline:
            time.sleep(0.05)
    got = sampler.summary()
    assert got["busy_samples"] >= 3 and got["sm_mhz_mean"] == 1500 and got["power_capped_share"] == 1.0
    calls = (tmp_path / "calls").read_text(encoding="utf-8").splitlines()
    assert all("clocks_throttle_reasons.active" in c for c in calls) and calls[-1].endswith("-lms 50")
    assert sampler._proc.poll() is not None  # the sampling process ended with the block


def test_an_nvidia_smi_that_cannot_run_records_nothing_and_does_not_stop_the_run(tmp_path):
    broken = tmp_path / "nvidia-smi"
    broken.write_text("not a program\n", encoding="utf-8")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)  # executable but no interpreter line: exec fails
    with clocks.ClockSampler(exe=str(broken)) as sampler:
        pass
    assert sampler.summary() is None
