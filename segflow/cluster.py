"""Where Dask work runs: an existing scheduler by address, or an embedded LocalCluster.

The address comes from the argument, else ``SEGFLOW_DASK_ADDRESS``; with neither, a
``LocalCluster`` of one process with one thread per core starts (GDAL, Blosc and numpy
release the GIL, and threads share the per-process caches, so this is the cheapest default).

Examples
--------
>>> with dask_client(n_workers=1, threads_per_worker=1) as client:  # doctest: +SKIP
...     client.submit(sum, [1, 2]).result()
3
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

__all__ = ["ENV_ADDRESS", "dask_client"]

ENV_ADDRESS = "SEGFLOW_DASK_ADDRESS"

log = logging.getLogger(__name__)


@contextmanager
def dask_client(
    address: str | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    processes: bool = False,
    memory_limit: str | None = None,
) -> Iterator[Client]:
    """A ``distributed.Client`` for the duration of the block.

    Parameters
    ----------
    address
        Scheduler address (``tcp://host:8786``); defaults to ``$SEGFLOW_DASK_ADDRESS``.
    n_workers, threads_per_worker, processes, memory_limit
        Shape of the embedded ``LocalCluster`` when no address is given.
    """
    address = address or os.environ.get(ENV_ADDRESS) or None
    if address:
        log.info("connecting to Dask scheduler at %s", address)
        with Client(address) as client:
            yield client
        return
    cores = os.cpu_count() or 1
    with (
        LocalCluster(
            n_workers=n_workers or 1,
            threads_per_worker=threads_per_worker or cores,
            processes=processes,
            memory_limit=memory_limit or "auto",
            dashboard_address=":0",  # None still serves on 8787 and warns when it is taken
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
