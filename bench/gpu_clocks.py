"""The GPU's clock, power and clock-event reasons while a benchmark runs (``nvidia-smi``, once a second).

A GPU at its power limit lowers its clock: on the H200 stage-1 runs (docs/benchmarks.md, "Stage 1
speed, sixth session") every busy second was power-capped, at 1,553 MHz mean against the 1,980 MHz
the dense peak assumes. Two runs compare only when their clocks do, so each run records them::

    with ClockSampler() as clocks:
        ...  # the run
    clocks.summary()  # None without nvidia-smi (a CPU run)

``summary()`` counts the samples taken while the GPU was busy (utilization >= ``busy_pct``): their
SM clock (mean, min, max), power and the share with the software power cap (reason bit 0x4) or
any other clock-lowering reason active.
"""

from __future__ import annotations

import shutil
import subprocess
import threading

# nvidia-smi >= 535 names the reasons "clocks_event_reasons"; older drivers "clocks_throttle_reasons"
_FIELDS = "timestamp,clocks.sm,power.draw,utilization.gpu,{reasons}.active"
_REASON_NAMES = ("clocks_event_reasons", "clocks_throttle_reasons")
SW_POWER_CAP = 0x4
GPU_IDLE = 0x1  # the one reason that does not lower a busy GPU's clock


def _number(text: str) -> float | None:
    try:
        return float(text.strip().split()[0])
    except (ValueError, IndexError):  # "[N/A]", "[Not Supported]", empty
        return None


def clock_summary(lines: list[str], *, busy_pct: float = 90.0) -> dict:
    """Figures from ``nvidia-smi --query-gpu=<_FIELDS> --format=csv,noheader,nounits`` lines."""
    busy = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            continue
        sm, watts, util = _number(parts[1]), _number(parts[2]), _number(parts[3])
        try:
            reasons = int(parts[4], 16)
        except ValueError:
            reasons = None
        if sm is None or util is None or util < busy_pct:
            continue
        busy.append((sm, watts, reasons))
    out: dict = {"samples": sum(1 for line in lines if line.count(",") == 4), "busy_samples": len(busy)}
    if not busy:
        return out
    clocks = [b[0] for b in busy]
    watts = [b[1] for b in busy if b[1] is not None]
    known = [b[2] for b in busy if b[2] is not None]
    out.update(sm_mhz_mean=round(sum(clocks) / len(clocks), 1), sm_mhz_min=min(clocks), sm_mhz_max=max(clocks))
    if watts:
        out["power_w_mean"] = round(sum(watts) / len(watts), 1)
    if known:
        out["power_capped_share"] = round(sum(1 for r in known if r & SW_POWER_CAP) / len(known), 3)
        out["clock_lowered_share"] = round(sum(1 for r in known if r & ~GPU_IDLE) / len(known), 3)
    return out


class ClockSampler:
    """Samples ``nvidia-smi`` in the background between ``__enter__`` and ``__exit__``; a no-op without it."""

    def __init__(self, *, interval_ms: int = 1000, busy_pct: float = 90.0, exe: str = "nvidia-smi") -> None:
        self.interval_ms, self.busy_pct, self.exe = interval_ms, busy_pct, exe
        self.lines: list[str] = []
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def _start(self) -> None:
        path = shutil.which(self.exe)
        if path is None:
            return
        for reasons in _REASON_NAMES:  # the first field name this driver knows
            query = _FIELDS.format(reasons=reasons)
            try:
                probe = subprocess.run([path, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                                       capture_output=True, text=True, timeout=30, check=False)
            except (OSError, subprocess.TimeoutExpired):  # not runnable or hung: no clocks, the run goes on
                return
            if probe.returncode == 0:
                break
        else:
            return
        self._proc = subprocess.Popen([path, f"--query-gpu={query}", "--format=csv,noheader,nounits",
                                       "-lms", str(self.interval_ms)], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def __enter__(self) -> ClockSampler:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)

    def summary(self) -> dict | None:
        """``clock_summary`` of what was sampled; None when ``nvidia-smi`` was not there to sample."""
        if self._proc is None:
            return None
        return clock_summary(list(self.lines), busy_pct=self.busy_pct)
