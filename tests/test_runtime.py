"""segflow.runtime: the malloc settings the flows apply."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest


def _has_mallinfo2() -> bool:
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    return name is not None and hasattr(ctypes.CDLL(name), "mallinfo2")


#: glibc >= 2.33 on Linux: mallopt, the MALLOC_ variables and mallinfo2's account
needs_glibc = pytest.mark.skipif(not _has_mallinfo2(), reason="glibc >= 2.33 (mallinfo2) only")
#: the test process's environment without glibc's malloc variables (a tuned image sets them)
UNTUNED = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

# glibc's own account (mallinfo2, glibc >= 2.33): hblkhd is the bytes held in mmap'ed blocks
SCRIPT = """
import ctypes, sys, threading
import numpy as np
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    from segflow.runtime import tune_malloc
    assert tune_malloc() and tune_malloc()  # applied, and idempotent
def allocate():
    a = np.ones(256 * 2**20 // 8)  # a 256 MiB activation, say
    print(libc.mallinfo2().hblkhd)
if sys.argv[2] == "thread":  # as in a Prefect task or a Dask worker's thread
    t = threading.Thread(target=allocate)
    t.start()
    t.join()
else:
    allocate()
"""


@needs_glibc
@pytest.mark.parametrize("where", ["main", "thread"])
def test_tuned_malloc_serves_large_blocks_from_the_heap(where: str) -> None:
    """Untuned, glibc mmaps a 256 MiB block (and unmaps it when freed: the next one is faulted
    in again); tuned, it comes from the heap, where a freed block is reused. In a thread too,
    whose own arena could not hold the block at any threshold."""

    def mmapped(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode, where], check=True,
                             capture_output=True, text=True, env=UNTUNED)  # fmt: skip
        return int(out.stdout.strip())

    assert mmapped("plain") >= 256 * 2**20
    assert mmapped("tuned") < 256 * 2**20


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_usable_cores_honours_the_cpu_affinity() -> None:
    """A process pinned to one core (``taskset -c 0``, Slurm's binding) counts one core,
    where ``os.cpu_count()`` still counts the host's."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from segflow.runtime import usable_cores; print(usable_cores(), os.cpu_count())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    assert out == ["1", str(os.cpu_count())]


@needs_glibc
def test_workers_segflow_starts_keep_large_blocks_in_their_heap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 and glibc's defaults, and
    a task runs in a thread: a large block was mmap'ed (faulted in anew for every task's
    arrays). segflow's embedded workers get tune_malloc's settings, and this process's own
    environment is left as it was."""
    from segflow.cluster import dask_client

    for name in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(name)  # one set here would win over segflow's, as in Dask

    def task_thread_malloc() -> tuple[str | None, int]:
        # nested: pickled by value, the worker cannot import this test module
        import ctypes
        import os

        import numpy as np

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                        "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        a = np.ones(256 * 2**20 // 8)  # held by the task's thread while glibc is asked
        held = int(libc.mallinfo2().hblkhd)
        del a
        return os.environ.get("MALLOC_ARENA_MAX"), held

    before = dict(os.environ)
    with dask_client(n_workers=1, threads_per_worker=1, processes=True) as client:
        arena, mmapped = client.submit(task_thread_malloc, pure=False).result()
    assert arena == "1"
    assert mmapped < 256 * 2**20
    assert dict(os.environ) == before
