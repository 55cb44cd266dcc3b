"""What ``flows/train.py`` does before it trains: the training config of a pipeline (its
classes and the command line's overrides), and the stores it lists, built when missing.

A store of ``train.stores`` that has a ``source`` is ingested with the pipeline's ``ingest``
section as a template (the source, labels and, for the template's own image only, its
instance raster) and prepared with the ``prepare`` section; a store that is current is left
alone. Stores without a source must exist already.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segflow.config import IngestConfig, PipelineConfig
from segflow.config.train import StoreRef, TrainConfig, make_train_config
from segflow.errors import ConfigError
from segflow.runtime import usable_cores

__all__ = [
    "build_store",
    "build_training_stores",
    "check_training_request",
    "store_ingest_config",
    "training_config",
]


def training_config(
    cfg: PipelineConfig,
    *,
    steps: int | None = None,
    time_limit_s: float | None = None,
    source: str = "train",
) -> TrainConfig:
    """``cfg.train`` with the pipeline's classes when it names none, and the overrides.

    ``steps`` replaces ``train.steps`` (and clears ``epochs``); ``time_limit_s`` replaces
    ``train.time_limit_s``. Raises :class:`ConfigError` (naming ``source``) when there is no
    ``train`` section or the result does not validate.
    """
    if cfg.train is None:
        raise ConfigError(
            f"{source}: no 'train' section: add one (see pipelines/isbi2012_membranes.yaml)"
        )
    update: dict[str, Any] = {}
    if cfg.train.classes is None:
        update["classes"] = cfg.classes
    if steps is not None:
        update.update(steps=steps, epochs=None)
    if time_limit_s is not None:
        update["time_limit_s"] = time_limit_s
    if not update:
        return cfg.train
    return make_train_config({**cfg.train.model_dump(), **update}, source=f"{source}: train")


def check_training_request(
    tcfg: TrainConfig, out: Path | str, *, device: str | None, prepare_only: bool
) -> None:
    """Refuse, in a second and before anything starts: an output directory that is an input
    or not writable (on object storage: a bucket we cannot list, or a URL under a torchrun
    launch, whose ranks would each mirror it), a listed store that is missing and has no
    ``source`` to build it from, an unknown or absent device (unless only the stores are
    built)."""
    from segflow.io import remote
    from segflow.io.store import SceneStore
    from segflow.outputs import check_output_directory

    refs = (*tcfg.stores.train, *tcfg.stores.val)
    if remote.is_url(out):
        url = remote.check_location(out, what="out", write=True)
        remote.check_prefix(url, what="out")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                f"out {url!r} is on object storage, which a torchrun launch cannot share: "
                "train into a local directory and upload it"
            )
    else:
        check_output_directory("out", out, inputs=[r.store for r in refs])
    for ref in refs:
        if ref.source is None:
            SceneStore.open(ref.store)  # a missing store without a source fails here
    if not prepare_only:
        from segflow.train.distributed import resolve_device

        resolve_device(device)


def store_ingest_config(cfg: PipelineConfig, ref: StoreRef) -> IngestConfig:
    """The ingest section that builds the listed store ``ref`` (which has a ``source``).

    The pipeline's ``ingest`` section with the store's source, labels and instance raster;
    the template's instance raster belongs to its own image, so other sources without one
    get none (prepare derives their objects).
    """
    if ref.source is None:
        raise ValueError(f"store {ref.store!r} has no source to ingest")
    own = ref.source == cfg.ingest.source
    return cfg.ingest.model_copy(
        update={
            "source": ref.source,
            "labels": ref.labels,
            "instances": ref.instances or (cfg.ingest.instances if own else None),
        }
    )


def build_training_stores(
    cfg: PipelineConfig,
    tcfg: TrainConfig,
    *,
    on_store: Callable[[dict[str, str]], None] | None = None,
    workers: int | None = None,
) -> list[dict[str, str]]:
    """Ingest and prepare every store ``tcfg`` lists that has a source, unless current.

    Two or more stores to build are built in parallel, one Dask task each, on an embedded
    cluster of ``workers`` processes (default: one per core; ``$SEGFLOW_DASK_ADDRESS``: that
    scheduler's workers). Returns one ``{"store", "action"}`` per store (``current``,
    ``ingested``, ``prepared``, ``ingested+prepared``; a built one also names the ``pid`` of
    the process that built it), also passed to ``on_store`` as each is done.
    """
    refs = {r.store: r for r in (*tcfg.stores.train, *tcfg.stores.val)}
    pending = [ref for ref in refs.values() if _needs_building(cfg, ref)]
    results: dict[str, dict[str, str]] = {}

    def record(entry: dict[str, str]) -> None:
        results[entry["store"]] = entry
        if on_store is not None:
            on_store(entry)

    if len(pending) >= 2:
        from distributed import as_completed

        from segflow.cluster import dask_client

        n = workers or min(len(pending), usable_cores())
        with dask_client(None, n_workers=n, threads_per_worker=1, processes=True) as client:
            futures = [client.submit(build_store, cfg, ref, key=f"store-{i}", pure=False)
                       for i, ref in enumerate(pending)]  # fmt: skip
            for future in as_completed(futures):
                record(future.result())
    else:
        for ref in pending:
            record(build_store(cfg, ref))
    for path in refs:
        if path not in results:
            record({"store": path, "action": "current"})
    return [results[path] for path in refs]


def _needs_building(cfg: PipelineConfig, ref: StoreRef) -> bool:
    from segflow.io.store import SceneStore
    from segflow.prepare import is_current

    if ref.source is None:
        return False
    p = Path(ref.store)
    return not (p / "zarr.json").is_file() or not is_current(SceneStore.open(p), cfg.prepare)


def build_store(cfg: PipelineConfig, ref: StoreRef) -> dict[str, str]:
    """Ingest ``ref``'s source into its store unless there, and prepare it unless current
    (one store: a task of :func:`build_training_stores`)."""
    from segflow.ingest import IngestSpec, ingest
    from segflow.io.store import SceneStore
    from segflow.prepare import is_current, prepare_store

    p = Path(ref.store)
    action = "current"
    if not (p / "zarr.json").is_file():
        p.parent.mkdir(parents=True, exist_ok=True)
        spec = IngestSpec.from_config(store_ingest_config(cfg, ref), out=str(p),
                                      classes=cfg.classes, ignore_index=cfg.ignore_index)  # fmt: skip
        ingest(spec)
        action = "ingested"
    if not is_current(SceneStore.open(p), cfg.prepare):
        prepare_store(p, cfg.prepare)
        action = "prepared" if action == "current" else "ingested+prepared"
    return {"store": ref.store, "action": action, "pid": str(os.getpid())}
