"""Where Dask work runs: an existing scheduler by address, or an embedded LocalCluster.

The address comes from the argument, else ``SEGFLOW_DASK_ADDRESS``; with neither, a
``LocalCluster`` of one process with one thread per core starts (GDAL, Blosc and numpy
release the GIL, and threads share the per-process caches, so this is the cheapest default).

Every server the embedded cluster starts listens on loopback only, unless told otherwise:

* ``processes=False`` (the default): the scheduler and the worker talk ``inproc://`` (no
  socket at all); the scheduler's dashboard and the worker's HTTP endpoint (``/health``,
  ``/metrics``), which Dask would otherwise bind to every interface (``0.0.0.0`` and ``::``),
  bind to ``host``.
* ``processes=True``: the scheduler, the nannies and the worker processes listen on ``host``
  (TCP), and so do their HTTP endpoints.

``host`` defaults to ``$SEGFLOW_DASK_HOST`` or ``127.0.0.1``; the dashboard address to
``$SEGFLOW_DASK_DASHBOARD`` or ``HOST:0`` (a free port). Set ``SEGFLOW_DASK_HOST=0.0.0.0`` (or
a dashboard address such as ``0.0.0.0:8787``) only to reach the cluster from other machines.

Examples
--------
>>> with dask_client(n_workers=1, threads_per_worker=1) as client:  # doctest: +SKIP
...     client.submit(sum, [1, 2]).result()
3
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from segflow.errors import ConfigError, option
from segflow.runtime import malloc_environment, usable_cores

if TYPE_CHECKING:  # distributed is imported where a cluster is used: 0.2 s on every command
    from distributed import Client

__all__ = [
    "DEFAULT_HOST",
    "ENV_ADDRESS",
    "ENV_DASHBOARD",
    "ENV_HOST",
    "dask_client",
    "gpu_client",
    "gpu_worker_specs",
    "local_cluster_addresses",
]

ENV_ADDRESS = "SEGFLOW_DASK_ADDRESS"
#: Interface the embedded cluster's servers listen on (default :data:`DEFAULT_HOST`).
ENV_HOST = "SEGFLOW_DASK_HOST"
#: ``HOST:PORT`` of the embedded cluster's dashboard (default ``HOST:0``: a free port).
ENV_DASHBOARD = "SEGFLOW_DASK_DASHBOARD"
#: Loopback: nothing the embedded cluster serves is reachable from another machine.
DEFAULT_HOST = "127.0.0.1"

log = logging.getLogger(__name__)


def local_cluster_addresses(
    host: str | None = None, dashboard_address: str | None = None
) -> tuple[str, str]:
    """The interface and dashboard address the embedded cluster binds to.

    Parameters
    ----------
    host
        Interface (IPv4 address or host name); default ``$SEGFLOW_DASK_HOST``, else
        ``127.0.0.1``.
    dashboard_address
        ``HOST:PORT`` of the dashboard; default ``$SEGFLOW_DASK_DASHBOARD``, else
        ``HOST:0``. A bare ``:PORT`` takes ``host`` (Dask itself would read it as every
        interface).

    Returns
    -------
    tuple of str
        ``(host, dashboard_address)``.

    Raises
    ------
    ConfigError
        An IPv6 address (Dask's dashboard cannot parse one) or an address without a port.

    Examples
    --------
    >>> local_cluster_addresses()
    ('127.0.0.1', '127.0.0.1:0')
    >>> local_cluster_addresses("localhost", ":8787")
    ('localhost', 'localhost:8787')
    """
    host = host or os.environ.get(ENV_HOST) or DEFAULT_HOST
    dashboard = dashboard_address or os.environ.get(ENV_DASHBOARD) or f"{host}:0"
    if ":" in host:
        raise ConfigError(
            f"Dask host {host!r} is not an IPv4 address or a host name (Dask's dashboard "
            f"cannot bind IPv6 literals): set {ENV_HOST} to e.g. 127.0.0.1 or localhost"
        )
    name, sep, port = dashboard.rpartition(":")
    if not sep or not port.isdigit() or ":" in name:
        raise ConfigError(
            f"Dask dashboard address {dashboard!r} is not HOST:PORT: set {ENV_DASHBOARD} "
            f"to e.g. {DEFAULT_HOST}:8787 (port 0: any free port)"
        )
    return host, f"{name or host}:{port}"


@contextmanager
def dask_client(
    address: str | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    processes: bool = False,
    memory_limit: str | None = None,
    host: str | None = None,
    dashboard_address: str | None = None,
) -> Iterator[Client]:
    """A ``distributed.Client`` for the duration of the block.

    Parameters
    ----------
    address
        Scheduler address (``tcp://host:8786``); defaults to ``$SEGFLOW_DASK_ADDRESS``.
    n_workers, threads_per_worker, processes, memory_limit
        Shape of the embedded ``LocalCluster`` when no address is given.
    host, dashboard_address
        Where the embedded cluster's servers listen (see :func:`local_cluster_addresses`):
        loopback unless configured otherwise.

    Yields
    ------
    distributed.Client
        Connected to ``address``, or to the embedded cluster (closed on exit).
    """
    _import_distributed()
    from distributed import Client, LocalCluster

    address = address or os.environ.get(ENV_ADDRESS) or None
    if address:
        log.info("connecting to Dask scheduler at %s", address)
        try:
            client = Client(address)
        except ValueError as err:  # "host:notaport" and other malformed addresses
            raise ConfigError(
                f"{address!r} is not a Dask scheduler address ({err}): give one like "
                f"tcp://HOST:8786 with {option('dask_address')} or ${ENV_ADDRESS}"
            ) from None
        except (OSError, TimeoutError) as err:  # refused, unknown host, timed out
            raise ConfigError(
                f"cannot reach the Dask scheduler at {address!r} ({err}): start it, or "
                f"check {option('dask_address')} and ${ENV_ADDRESS}"
            ) from None
        with client:
            yield client
        return
    host, dashboard = local_cluster_addresses(host, dashboard_address)
    cores = usable_cores()
    # the worker's HTTP endpoint: with no address Dask binds an in-process worker's to every
    # interface (its inproc:// address names no interface)
    worker_http = f"{host}:0"
    with _own_environment(), _worker_malloc():  # the workers are spawned here
        cluster = LocalCluster(
            n_workers=n_workers or 1,
            threads_per_worker=threads_per_worker or cores,
            processes=processes,
            memory_limit=memory_limit or "auto",
            # inproc:// cannot take a host; TCP (processes) listens on it
            host=host if processes else None,
            dashboard_address=dashboard,  # None would still serve on :8787, on every interface
            worker_dashboard_address=worker_http,
        )
    with _own_environment(), cluster, Client(cluster) as client:  # a restarted worker too
        log.info("embedded Dask cluster: dashboard on %s", dashboard)
        _no_gc_diagnosis()
        yield client


def _worker_malloc() -> Any:
    """Dask's config while segflow starts worker processes: their environment gets
    :func:`~segflow.runtime.malloc_environment` on top of what
    ``distributed.nanny.pre-spawn-environ`` holds (these four variables replace the config's);
    a nanny keeps it for restarts. A variable already in this process's environment still
    wins, as in Dask."""
    import dask

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", None) or {})
    return dask.config.set({"distributed.nanny.pre-spawn-environ": {**env, **malloc_environment()}})


@contextlib.contextmanager
def _own_environment() -> Iterator[None]:
    """This process's environment as it was, once the block ends: a nanny sets its workers'
    ``OMP_NUM_THREADS=1`` (``distributed.nanny.pre-spawn-environ``) in the spawning
    process's own ``os.environ`` and leaves it there, and torch, initialised later in this
    process (a pipeline's training after its ingest), then runs on one core."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for name in set(os.environ) - set(before):
            del os.environ[name]
        for name, value in before.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


def _import_distributed() -> None:
    """Import distributed where a cluster is first used (0.2 s that a command working in its
    own process never needs), keeping the level its logger had: the import sets it from
    Dask's config, and a command may have quieted it before (as before this import was lazy)."""
    if "distributed" in sys.modules:
        return
    logger = logging.getLogger("distributed")
    level = logger.level
    import distributed  # noqa: F401

    if level != logging.NOTSET:
        logger.setLevel(level)


def _no_gc_diagnosis() -> None:
    """Remove distributed's GC-pause diagnosis from this process (an in-process scheduler and
    worker install it). Its ``gc.callbacks`` hook runs at every collection, and a signal
    handler's exception raised there (Ctrl-C, SIGTERM) is swallowed as "Exception ignored",
    so a terminated command ran on to the end; segflow never shows its warnings anyway."""
    from distributed.gc import disable_gc_diagnosis

    disable_gc_diagnosis(force=True)


def gpu_worker_specs(gpus: int, threads: int, host: str) -> dict[str, dict[str, Any]]:
    """One worker process per GPU for an embedded cluster (without dask-cuda): each sees only
    its own device (``CUDA_VISIBLE_DEVICES``) and declares ``GPU=1``, the resource a CUDA
    segment_region task asks for; ``threads`` feed it.

    Examples
    --------
    >>> specs = gpu_worker_specs(2, 4, "127.0.0.1")
    >>> specs["gpu1"]["options"]["env"], specs["gpu1"]["options"]["resources"]
    ({'CUDA_VISIBLE_DEVICES': '1'}, {'GPU': 1})
    """
    from distributed import Nanny

    return {
        f"gpu{i}": {
            "cls": Nanny,
            "options": {
                "nthreads": threads,
                "env": {"CUDA_VISIBLE_DEVICES": str(i)},
                "resources": {"GPU": 1},
                "host": host,
                "dashboard_address": f"{host}:0",
            },
        }
        for i in range(gpus)
    }


@contextmanager
def gpu_client(gpus: int, *, threads: int, host: str | None = None) -> Iterator[Client]:
    """An embedded cluster of one worker per GPU: dask-cuda's ``LocalCUDACluster`` where it
    is installed, else worker processes from :func:`gpu_worker_specs`; on loopback."""
    _import_distributed()
    from distributed import Client

    host, dashboard = local_cluster_addresses(host, None)
    with _own_environment(), _worker_malloc():  # the workers are spawned here
        cluster = _gpu_cluster(gpus, threads, host, dashboard)
    with _own_environment(), cluster, Client(cluster) as client:  # a restarted worker too
        log.info("embedded GPU cluster: %d workers, dashboard on %s", gpus, dashboard)
        yield client


def _gpu_cluster(gpus: int, threads: int, host: str, dashboard: str) -> Any:
    """The cluster of :func:`gpu_client`, not yet entered."""
    from distributed import Scheduler, SpecCluster

    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        scheduler = {"cls": Scheduler, "options": {"host": host, "dashboard_address": dashboard}}
        return SpecCluster(workers=gpu_worker_specs(gpus, threads, host), scheduler=scheduler)
    return LocalCUDACluster(
        n_workers=gpus,
        threads_per_worker=threads,
        resources={"GPU": 1},
        host=host,
        dashboard_address=dashboard,
    )
