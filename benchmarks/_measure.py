"""Run a command and measure wall time and peak memory of its whole process tree."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Measurement:
    seconds: float
    peak_rss_bytes: int  # largest sum of RSS over the process and all its children
    returncode: int
    output: str
    cpu_seconds: float = 0.0  # user + system CPU time of the tree (each process's last sample)

    @property
    def peak_gib(self) -> float:
        return self.peak_rss_bytes / 2**30


def measure(
    cmd: list[str], *, interval: float = 0.05, env: dict[str, str] | None = None
) -> Measurement:
    """Run ``cmd``; sample the RSS of its process tree every ``interval`` seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    peak = 0
    cpu: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                        t = p.cpu_times()
                        cpu[p.pid] = t.user + t.system
                peak = max(peak, total)
            except psutil.Error:
                pass
            time.sleep(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    return Measurement(time.perf_counter() - t0, peak, proc.returncode, out, sum(cpu.values()))


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def ensure_mosaic(work: Path, size: int) -> Path:
    """The ``size`` x ``size`` mosaic GeoTIFF of make_big_geotiff.py in ``work`` (built once)."""
    big = work / f"mosaic_{size}.tif"
    if not big.exists():
        script = Path(__file__).resolve().parent / "make_big_geotiff.py"
        subprocess.run(python(str(script), str(big), "--size", str(size)), check=True)
    return big
