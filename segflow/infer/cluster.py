"""Overlap-tile inference on a Dask cluster: groups of write units as tasks.

The coordinating process does what :func:`~segflow.infer.engine.predict_region` does around
the model (opens the prediction store, resumes or resets its run, makes the arrays, records
the result); :func:`cluster_runner` replaces only the step that computes the pending units.
It cuts them into groups (:func:`unit_groups`: blocks of whole units inside one column strip,
so a task reads one compact piece of the image with its halo) and submits one task per group.

A task (:func:`run_units`, on a worker) loads the checkpoint once per worker process from its
path (:func:`~segflow.train.checkpoint.load_checkpoint_cached`; no model travels over the
wire), keeps it on the worker's device, opens the image and the prediction store itself,
skips the units already recorded, and streams the rest through the same engine code as a
local run: windows read with their halo straight from the source, units written by one writer
and recorded. Every unit has one owner (its own chunk or shard), so a task killed with its
worker is simply run again elsewhere by Dask: the units it had recorded are skipped, the others
rewritten whole.

CPU workers run torch with as many threads as the worker has; a CUDA run asks the scheduler
for a ``GPU`` resource when its workers declare one (``dask worker --resources GPU=1``, one
worker per GPU).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segflow.errors import ConfigError, SegflowError
from segflow.geometry import BlockIndex
from segflow.infer.engine import build_layout, write_units
from segflow.infer.forward import _flips, _Forward, resolve_device
from segflow.infer.options import InferenceOptions
from segflow.infer.readers import _Normalizer, open_reader
from segflow.infer.store import prediction_arrays
from segflow.io.store import SceneStore
from segflow.normalization import Normalization
from segflow.runtime import usable_cores

__all__ = ["UnitJob", "WorkerError", "cluster_runner", "run_units", "unit_groups"]


class WorkerError(SegflowError, RuntimeError):
    """A task failed on a worker for a reason the user can act on (unreadable input, no GPU)."""


@dataclass(frozen=True)
class UnitJob:
    """One task: which units of which prediction store, and everything a worker needs to
    compute them from paths (small and picklable: no arrays, no model)."""

    image: str
    level: int
    model: str
    store: str
    options: InferenceOptions
    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: tuple[int, int]
    units: tuple[BlockIndex, ...]
    num_classes: int
    label_dtype: str
    standalone: bool
    assets: tuple[str, ...] = ()  # of a STAC Item as the image


def unit_groups(
    units: Sequence[BlockIndex], *, strip_units: int, target: int
) -> list[tuple[BlockIndex, ...]]:
    """``units`` in groups of about ``target`` units: whole units of one column strip
    (``strip_units`` units wide), in blocks of rows, so that a task's tiles are compact.

    Examples
    --------
    >>> units = [BlockIndex(r, c) for r in range(4) for c in range(4)]
    >>> [len(g) for g in unit_groups(units, strip_units=2, target=4)]
    [4, 4, 4, 4]
    """
    by_strip: dict[int, list[BlockIndex]] = {}
    for u in units:
        by_strip.setdefault(u.col // strip_units, []).append(u)
    groups: list[tuple[BlockIndex, ...]] = []
    for strip in sorted(by_strip):
        members = sorted(by_strip[strip])
        width = len({u.col for u in members})
        rows_per_group = max(1, round(target / width))
        by_row: dict[int, list[BlockIndex]] = {}
        for u in members:
            by_row.setdefault(u.row, []).append(u)
        rows = sorted(by_row)
        for k in range(0, len(rows), rows_per_group):
            groups.append(tuple(u for r in rows[k : k + rows_per_group] for u in by_row[r]))
    return groups


def _worker_threads() -> int:
    """The Dask worker's thread count (torch uses as many), or the process's CPU count."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError):
        return usable_cores()


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def run_units(job: UnitJob) -> dict[str, Any]:
    """Compute and record ``job.units`` (on a worker); what it did, for the summary: ``sizes``
    holds the pixels of each of the job's units, those an earlier attempt recorded too."""
    from segflow.train.checkpoint import load_checkpoint_cached

    t0 = time.perf_counter()
    name = _worker_name()
    try:
        device, amp_dtype, _ = resolve_device(job.options)
        if device.type == "cpu":
            torch.set_num_threads(_worker_threads())
        model, _meta = load_checkpoint_cached(job.model)
        reader = open_reader(job.image, job.level, job.assets)
        store = SceneStore.open(job.store, mode="r+", unfinished=True)
    except (SegflowError, OSError) as err:
        raise WorkerError(f"worker {name}: {err}") from None
    marker = store.progress(prediction_arrays(job.options)[0])
    done = marker.done()
    pending = [u for u in job.units if u not in done]  # a re-run task skips what is recorded
    # the job's units recorded already were written in this run, by this task on a worker that
    # died (the run sends only units pending at its start): they count as this run's
    sizes = [store.grid.window(u.row, u.col).size for u in job.units if u in done]
    model.eval()
    model.to(device)
    forward = _Forward(
        model, device, amp_dtype, _flips(job.options), labels_only=job.options.labels_only
    )
    normalize = _Normalizer(reader, Normalization(mean=job.mean, std=job.std))
    # readers beyond the worker's threads only take the forward's core (results do not depend
    # on how many read)
    opts = dataclasses.replace(
        job.options, read_workers=min(job.options.read_workers, _worker_threads())
    )
    layout = build_layout(opts, reader.height, reader.width, job.origin)
    tiles = empty = 0
    if pending:
        tiles, empty = write_units(
            store,
            layout,
            job.origin,
            pending,
            opts,
            forward,
            normalize,
            marker=marker,
            standalone=job.standalone,
            num_classes=job.num_classes,
            label_dtype=np.dtype(job.label_dtype),
            report_done=sizes.extend,
        )
    return {
        "worker": name,
        "sizes": sizes,
        "tiles": tiles,
        "empty": empty,
        "seconds": time.perf_counter() - t0,
        "seconds_in_model": forward.seconds,
        "peak_rss_bytes": _peak_rss(),
    }


def _peak_rss() -> int:
    """This worker process's peak resident memory so far (bytes; Linux reports KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def cluster_runner(
    client: Any,
    *,
    image: str,
    level: int,
    model: str,
    assets: tuple[str, ...] = (),
    device: str | None = None,
    tasks_per_worker: int = 4,
    on_task: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[..., None]:
    """A :data:`~segflow.infer.engine.UnitRunner` that computes the pending units as tasks
    on ``client``'s cluster: about ``tasks_per_worker`` groups per worker (a lost worker's
    share is small), each worker's units, tiles, pixels and seconds summed into the counts.
    ``image`` and ``model`` are paths every worker can read; ``device`` the workers' (the
    coordinating process runs its one probe forward on the CPU)."""
    from distributed import as_completed

    def run(
        target: Any,
        run_: Any,
        options: InferenceOptions,
        forward: Any,
        normalize: Any,
        counts: Any,
        label_dtype: np.dtype[Any],
    ) -> None:
        workers = client.scheduler_info().get("workers", {})
        if not workers:
            raise ConfigError(
                f"the Dask cluster at {client.scheduler.address} has no workers: "
                "start some, or run without a cluster"
            )
        unit = target.store.grid.block
        groups = unit_groups(
            run_.pending,
            strip_units=max(1, options.strip_width // unit),
            target=math.ceil(len(run_.pending) / (tasks_per_worker * len(workers))),
        )
        gpu = any("GPU" in (w.get("resources") or {}) for w in workers.values())
        wants_cuda = device is None or str(device).startswith("cuda")
        jobs = [
            UnitJob(
                image=image,
                level=level,
                assets=assets,
                model=model,
                store=str(target.store.path),
                options=dataclasses.replace(options, device=device),
                mean=tuple(normalize.normalization.mean),
                std=tuple(normalize.normalization.std),
                origin=target.origin,
                units=g,
                num_classes=run_.num_classes,
                label_dtype=label_dtype.str,
                standalone=target.standalone,
            )
            for g in groups
        ]
        futures = [
            client.submit(
                run_units, job, pure=False, resources={"GPU": 1} if gpu and wants_cuda else None
            )
            for job in jobs
        ]
        try:
            for fut in as_completed(futures):
                r = fut.result()
                _add(counts, r)
                if on_task is not None:
                    on_task(r)
        finally:
            for fut in futures:
                fut.cancel()

    return run


def _add(counts: Any, r: dict[str, Any]) -> None:
    """One task's result into the run's counts and its worker's line."""
    counts.tiles += r["tiles"]
    counts.empty += r["empty"]
    counts.seconds_in_model += r["seconds_in_model"]
    counts(r["sizes"])  # units, pixels and progress
    w = counts.workers.setdefault(
        r["worker"], {"units": 0, "tiles": 0, "pixels": 0, "seconds": 0.0}
    )
    w["units"] += len(r["sizes"])
    w["pixels"] += sum(r["sizes"])
    w["tiles"] += r["tiles"]
    w["seconds"] += r["seconds"]
    w["peak_rss_bytes"] = max(w.get("peak_rss_bytes", 0), r["peak_rss_bytes"])
