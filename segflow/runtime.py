"""Process-wide runtime settings the flows apply at start-up.

:func:`tune_malloc`: PyTorch's CPU tensors come from the C allocator. glibc serves every
allocation above 32 MiB with a fresh ``mmap`` and returns it with ``munmap`` when freed, so
each forward pass of a segmentation network on large windows faults in (and the kernel
zeroes) its activations again: on this project's 2-core machines a small U-Net on a
(4, 1, 1040, 1040) batch spent 7 of its 18 CPU seconds per 12 batches in the kernel, 520 ms a
batch; with large blocks kept in the heap and the heap not trimmed, 200 ms (2.6x). PyTorch's
own advice for CPU inference is to preload jemalloc or tcmalloc; this does the same job with
the allocator already loaded, through ``mallopt`` (glibc only; elsewhere a no-op). The cost:
freed memory stays with the process, so its resident size stays at its peak.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NoReturn, TypeVar

__all__ = [
    "exit_now",
    "exit_on_sigterm",
    "in_background",
    "malloc_environment",
    "parent_death_signal",
    "tune_malloc",
    "usable_cores",
]

T = TypeVar("T")

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)

_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap and are reused
_TRIM_THRESHOLD = (1 << 31) - 1  # never give the top of the heap back
_TOP_PAD = 1 << 28  # grow the heap 256 MiB at a time
_ARENA_MAX = 1  # threads allocate from the main heap too (see tune_malloc)
_WORKER_TRIM_THRESHOLD = 1 << 30  # workers give the heap's top back past 1 GiB free


def in_background(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
    """``fn(*args, **kwargs)`` in a daemon thread; its result (or error) in the future.

    A daemon thread, not a ``ThreadPoolExecutor``: the executor's threads are joined when the
    interpreter exits, so a command failing with one ``error:`` line would first wait for
    work nobody needs any more (e.g. hashing a gigapixel source).
    """
    future: Future[T] = Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as err:  # handed to whoever asks for the result
                future.set_exception(err)

    threading.Thread(target=run, name=f"segflow-{getattr(fn, '__name__', 'work')}",
                     daemon=True).start()  # fmt: skip
    return future


def usable_cores() -> int:
    """The cores this process may use: Dask's count, which honours CPU affinity (``taskset``,
    Slurm's binding, Kubernetes' CPU manager) and a cgroup's CPU quota; ``os.cpu_count()``
    counts the whole host's, and threads sized by it oversubscribe a pinned job."""
    from dask.system import CPU_COUNT

    return max(1, int(CPU_COUNT))


def tune_malloc() -> bool:
    """Keep large freed blocks in glibc's heap for reuse; True when applied.

    A block over glibc's mmap threshold is mapped for each allocation and unmapped when
    freed, so every batch of activations is page-faulted and zeroed by the kernel anew; the
    heap keeps freed blocks for the next batch instead. Threads share the main heap (one
    arena): a thread's own arena is made of 64 MiB heaps and cannot hold a larger block at
    all, whatever the threshold, and much of the work runs in threads (segment_region's
    readers, a library call from a thread pool or a Prefect task runner's thread).
    segment_region at 8192^2 called in a thread: 5.0-5.5 s with 2.2-2.7 s of system time;
    3.8 s with 0.15 s on the main heap. The one heap's lock has a cost where threads allocate
    many mid-sized blocks at once: ingest's decode and encode threads took 2.33-2.35 s for
    16384^2 with one arena, 2.24-2.28 s with eight (2 cores; more threads wait longer).
    Threads started before the call keep their arenas, and so may later ones (a finished
    thread's arena is reused): call it before any other thread starts, or start the process
    with :func:`malloc_environment` in its environment.

    Idempotent and process-wide; does nothing (returns False) off Linux/glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
            (_M_TOP_PAD, _TOP_PAD),
            (_M_ARENA_MAX, _ARENA_MAX),
        )
    )
    log.debug("malloc tuned for large tensors: %s", ok)
    return ok


def malloc_environment() -> dict[str, str]:
    """:func:`tune_malloc`'s settings as glibc's environment variables, for worker processes
    (a Dask worker's task threads allocate before any code of ours runs in them).

    One difference: the top of the heap is given back to the system past 1 GiB free, not
    never, so that a worker's resident memory falls again after a peak and Dask's memory
    monitor (spill at 70 %, pause at 80 % of the worker's limit) does not count a retained
    peak as the worker's own for good.

    Dask's nannies start workers with ``MALLOC_TRIM_THRESHOLD_=65536``, and a task's arrays were
    then page-faulted anew for every unit: with these settings instead, the border weights of a
    32768^2 DSB raster took 52-54 s rather than 65-76 s on 2 workers, at a peak of 0.53-0.59 GiB
    per worker instead of 0.44-0.50 (the same at 16384^2). Empty off Linux.

    Examples
    --------
    >>> env = malloc_environment()
    >>> not env or env["MALLOC_ARENA_MAX"] == "1"
    True
    """
    if not sys.platform.startswith("linux"):
        return {}
    return {
        "MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD),
        "MALLOC_TRIM_THRESHOLD_": str(_WORKER_TRIM_THRESHOLD),
        "MALLOC_TOP_PAD_": str(_TOP_PAD),
        "MALLOC_ARENA_MAX": str(_ARENA_MAX),
    }


def exit_now(status: int) -> NoReturn:
    """End a command: run its exit hooks (logging, Prefect's API server and log workers),
    flush the standard streams, and leave without the interpreter's teardown of every
    imported module, which takes 1-2 s after torch, MONAI and Prefect (measured: 2.0 s after
    a segment_region command's last exit hook).

    Only for a command's last line: open files must be closed and threads done by then.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe takes nothing more
            stream.flush()
    os._exit(status)


def exit_on_sigterm() -> None:
    """Make SIGTERM exit through the exit hooks (``SystemExit(143)``) where its default action
    would end the process without them; a handler already installed stays. Only from the
    main thread (elsewhere: nothing)."""
    with contextlib.suppress(ValueError):  # not the main thread
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when this
    process dies, even by SIGKILL or the OOM killer (Linux's ``PR_SET_PDEATHSIG``, kept across
    ``exec``). None off Linux, or while this process runs other threads (code between fork
    and exec is then unsafe)."""
    if not sys.platform.startswith("linux") or threading.active_count() > 1:
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, sig)
