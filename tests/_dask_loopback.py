"""Real Dask engines on loopback for the tests: a ``dask scheduler`` and ``dask worker``
processes, each in its own process group, started and stopped by the test."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from distributed import Client

from segflow.cluster import ENV_ADDRESS


@dataclass(frozen=True)
class WorkerStats:
    """What one worker process has executed so far (read from inside it by ``client.run``)."""

    executed: int
    #: seconds spent executing, per task prefix (e.g. ``ingest_task``); ever increasing
    executing: dict[str, float]


class LoopbackCluster:
    """A scheduler and workers as separate processes on 127.0.0.1, each its own process group."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.scheduler_file = folder / "sched.json"
        self.env = {k: v for k, v in os.environ.items() if k != ENV_ADDRESS}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pgids: set[int] = set()
        self._n = 0
        self._client: Client | None = None

    def _spawn(self, name: str, *args: str) -> None:
        log = (self.folder / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            cwd=self.folder,  # not the flows' directory: relative paths must not leak to workers
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        self.pgids.add(proc.pid)  # a session leader's pgid is its pid

    def start(self, n_workers: int = 2) -> None:
        self._spawn(
            "scheduler",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--scheduler-file",
            str(self.scheduler_file),
            "--no-dashboard",
            "--idle-timeout",
            "900",  # a safety net should the test process die without its teardown
        )
        for _ in range(n_workers):
            self.add_worker()
        deadline = time.monotonic() + 60
        while not self._scheduler_file_ready():
            if time.monotonic() > deadline or self.procs["scheduler"].poll() is not None:
                raise RuntimeError(f"scheduler did not start: {self.log('scheduler')}")
            time.sleep(0.1)
        self._client = Client(
            scheduler_file=str(self.scheduler_file), set_as_default=False, timeout="60s"
        )
        self.client.wait_for_workers(n_workers, timeout=60)

    def _scheduler_file_ready(self) -> bool:
        try:
            return bool(json.loads(self.scheduler_file.read_text()).get("address"))
        except (OSError, ValueError):
            return False

    def add_worker(self) -> str:
        name = f"w{self._n}"
        self._n += 1
        (self.folder / name).mkdir()
        self._spawn(
            name,
            "worker",
            "--scheduler-file",
            str(self.scheduler_file),
            "--nthreads",
            "1",
            "--no-nanny",
            "--no-dashboard",
            "--name",
            name,
            "--local-directory",
            str(self.folder / name),
            "--memory-limit",
            "2GiB",
            "--death-timeout",
            "60",
        )
        return name

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")[-3000:]

    @property
    def client(self) -> Client:
        assert self._client is not None
        return self._client

    @property
    def address(self) -> str:
        return str(json.loads(self.scheduler_file.read_text())["address"])

    def workers(self) -> dict[str, str]:
        """Worker name -> address, as the scheduler sees them now."""
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return {str(w["name"]): addr for addr, w in info.items()}

    def ensure_workers(self, n: int) -> None:
        """Start workers until ``n`` are alive (a previous test may have killed one)."""
        alive = [w for w, p in self.procs.items() if w != "scheduler" and p.poll() is None]
        for _ in range(n - len(alive)):
            self.add_worker()
        self.client.wait_for_workers(n, timeout=60)

    def stats(self) -> dict[str, WorkerStats]:
        """Per worker name: tasks executed and executing time per task prefix."""

        # a nested function is pickled by value: the workers cannot import this test module
        def read(dask_worker: Any) -> tuple[str, int, dict[str, float]]:
            state = dask_worker.state
            elapsed = state.task_counter.cumulative_elapsed().items()
            executing = {key[0]: t for key, t in elapsed if key[1] == "executing"}
            return str(dask_worker.name), int(state.executed_count), executing

        raw = self.client.run(read)
        return {name: WorkerStats(n, ex) for name, n, ex in raw.values()}

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker's whole process group, no goodbye to the scheduler."""
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        # workers first (their scheduler still answers), then the scheduler
        order = [n for n in self.procs if n != "scheduler"] + ["scheduler"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        for pgid in self.pgids:  # anything else left in the groups (children of children)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)

    def leftovers(self) -> list[str]:
        """Processes still alive in any of our process groups."""
        left = []
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if os.getpgid(p.pid) in self.pgids and p.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])}")
            except (ProcessLookupError, psutil.Error):
                continue
        return left


@contextlib.contextmanager
def running_cluster(folder: Path, n_workers: int = 2) -> Iterator[LoopbackCluster]:
    """A started :class:`LoopbackCluster`; on exit every process it started is gone (asserted)."""
    c = LoopbackCluster(folder)
    try:
        c.start(n_workers=n_workers)
        yield c
    finally:
        c.close()
        deadline = time.monotonic() + 10
        while c.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = c.leftovers()
        assert not left, f"Dask processes left running: {left}"
        assert all(p.poll() is not None for p in c.procs.values())
