"""Ingest: a source image (and its labels) into a scene store, window by window.

The work is split into *tasks* that each own whole write units of the store (so no two tasks
write one chunk or shard) and read the source in windows aligned to its own blocks: one unit
per task for tiled sources, a full row of units for striped ones (a strip is decoded once, not
once per chunk). Tasks run on any ``concurrent.futures.Executor``: a thread pool, or Dask
through ``distributed.Client.get_executor()``.

The store is built at ``OUT.partial`` and moved to ``OUT`` only when complete, so a crash never
leaves a half-written store where a finished one is expected. Each finished unit is recorded;
running the same ingest again resumes, and re-running a finished one does nothing.

Examples
--------
>>> spec = IngestSpec(source="data/samples/landsat/RGB.byte.tif", out="/tmp/l.zarr")  # doctest: +SKIP
>>> report = ingest(spec)  # doctest: +SKIP
>>> report.units_written, report.units_skipped  # doctest: +SKIP
(4, 0)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segflow import __version__
from segflow.config import DEFAULT_CLASSES, ClassDef, IngestConfig, PipelineConfig
from segflow.errors import ConfigError, LabelError, SegflowError, StoreError, option
from segflow.geometry import BlockIndex
from segflow.io import locations, remote
from segflow.io.labels import (
    LabelReader,
    PixelGrid,
    label_dtype,
    prepare_instance_raster,
    prepare_raster_labels,
    prepare_vector_labels,
)
from segflow.io.remote import check_location, is_url
from segflow.io.sources import Source, SourceInfo, open_source, source_sha256
from segflow.io.store import (
    SceneStore,
    SourceRecord,
    publish_store,
    remove_store,
    staging_location,
    store_complete,
    store_exists,
)
from segflow.outputs import check_unlocked, output_lock, plan_outputs
from segflow.runtime import in_background, usable_cores
from segflow.tiling import IngestTask, plan_tasks, task_units

__all__ = ["IngestReport", "IngestSpec", "check_inputs", "ingest", "plan_tasks", "task_units"]

log = logging.getLogger(__name__)

VECTOR_SUFFIXES = {".geojson", ".json", ".gpkg", ".shp", ".parquet", ".geoparquet", ".fgb"}


# the options' defaults are the ingest section's (declared once, in segflow.config)
_OPTION = IngestConfig.model_fields


@dataclass(frozen=True, slots=True)
class IngestSpec:
    """Everything that determines a scene store (its content depends on nothing else)."""

    source: str
    out: str
    assets: tuple[str, ...] = ()
    labels: str | None = None
    instances: str | None = None
    class_field: str | None = None
    class_value: int = _OPTION["class_value"].default
    class_map: Mapping[int, int] | None = None
    chunk: int = _OPTION["chunk"].default
    shard: int | None = None
    level: int = _OPTION["level"].default
    compression_level: int = _OPTION["compression_level"].default
    classes: tuple[ClassDef, ...] = DEFAULT_CLASSES
    ignore_index: int = 255
    #: pixel budget of the source (None: ``$SEGFLOW_MAX_PIXELS`` or the default, see
    #: :func:`segflow.io.sources.open_source`); it limits what is read, not what is written,
    #: so it is not part of the store's key
    max_pixels: int | None = None

    @classmethod
    def from_config(
        cls,
        cfg: IngestConfig,
        *,
        out: str,
        classes: Sequence[ClassDef] = DEFAULT_CLASSES,
        ignore_index: int = 255,
    ) -> IngestSpec:
        """Build a spec from the validated ``ingest`` section of a pipeline config."""
        return cls(
            source=cfg.source,
            assets=cfg.assets,
            out=out,
            labels=cfg.labels,
            instances=cfg.instances,
            class_field=cfg.class_field,
            class_value=cfg.class_value,
            class_map=cfg.class_map,
            chunk=cfg.chunk,
            shard=cfg.shard,
            level=cfg.level,
            compression_level=cfg.compression_level,
            classes=tuple(classes),
            ignore_index=ignore_index,
        )

    @classmethod
    def from_command_line(
        cls,
        *,
        out: str,
        options: Mapping[str, Any],
        classes_json: str | None = None,
        class_map_json: str | None = None,
        pipeline: PipelineConfig | None = None,
    ) -> IngestSpec:
        """A validated spec from a command line's options (the ingest section's fields) and
        its JSON forms of the class table and class map; the class table and ignore index
        default to ``pipeline``'s when one is given."""
        classes: tuple[ClassDef, ...] = pipeline.classes if pipeline else DEFAULT_CLASSES
        raw = _parse_json(classes_json, "classes")
        if raw is not None:
            try:
                classes = tuple(ClassDef.model_validate(c) for c in raw)
            except Exception as err:
                raise ConfigError(
                    f"{option('classes')} must be a JSON list of {{id, name, color}}: {err}"
                ) from err
        class_map = _parse_json(class_map_json, "class_map")
        if class_map is not None:
            try:
                class_map = {int(k): int(v) for k, v in class_map.items()}
            except (AttributeError, ValueError) as err:
                raise ConfigError(
                    f"{option('class_map')} must map raw values to class ids, e.g. "
                    f'{{"0": 1, "255": 0}}: got {class_map_json!r}'
                ) from err
        given = {k: v for k, v in options.items() if v is not None}
        return cls(
            out=out, class_map=class_map, classes=classes,
            ignore_index=pipeline.ignore_index if pipeline else 255, **given,
        ).validated()  # fmt: skip

    def validated(self) -> IngestSpec:
        """Check the parameters with the config schema (one clear error line)."""
        from pydantic import ValidationError

        from segflow.config import format_validation_error

        try:
            IngestConfig(
                source=self.source,
                assets=self.assets,
                labels=self.labels,
                instances=self.instances,
                class_field=self.class_field,
                class_value=self.class_value,
                class_map=dict(self.class_map) if self.class_map else None,
                chunk=self.chunk,
                shard=self.shard,
                level=self.level,
                compression_level=self.compression_level,
            )
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, source="ingest")) from err
        return self


def _parse_json(text: str | None, name: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{option(name)} is not valid JSON ({err.msg}): got {text!r}") from err


@dataclass(frozen=True, slots=True)
class IngestReport:
    """What an ingest did."""

    store: str
    height: int
    width: int
    bands: int
    units_total: int
    units_written: int
    units_skipped: int
    valid_fraction: float | None
    seconds: float
    already_complete: bool = False
    arrays: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _source_options(spec: IngestSpec) -> dict[str, Any]:
    """How :func:`~segflow.io.sources.open_source` opens ``spec``'s source."""
    return {"level": spec.level, "max_pixels": spec.max_pixels, "assets": spec.assets}


def _run_key(spec: IngestSpec, source_hash: str, label_hashes: Mapping[str, str]) -> str:
    """A digest of everything the store's content depends on."""
    doc = {
        "source": source_hash,
        "labels": dict(label_hashes),
        "params": {
            k: v
            for k, v in asdict(spec).items()
            # the assets are in the source's hash (a STAC Item's: the assets, in order)
            if k not in ("source", "assets", "out", "labels", "instances", "max_pixels")
        },
        "schema": 1,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _worker_store(path: str, ingest_key: str) -> SceneStore:
    """The staging store, opened once per worker process (keyed by its content key too)."""
    return SceneStore.open(path, mode="r+", unfinished=True)


def _ingest_task(
    task: IngestTask,
    *,
    source: Source,
    labels: LabelReader | None,
    instances: LabelReader | None,
    store_path: str,
    ingest_key: str,
) -> tuple[BlockIndex, ...]:
    """Read one task window and write its units; returns the units written.

    Sources and label readers are thread-safe. Progress is recorded by the caller, after the
    data is written, so a unit is never marked done before its pixels are on disk.
    """
    store = _worker_store(store_path, ingest_key)
    image, valid = source.read_with_valid(task.window)
    # one read per distinct reader: vector labels give classes and instances in one pass
    blocks = {id(r): r.read(task.window) for r in (labels, instances) if r is not None}
    arrays: dict[str, np.ndarray | None] = {
        "image": image,
        "valid": valid,
        "labels": blocks[id(labels)].labels if labels is not None else None,
        "instances": blocks[id(instances)].instances if instances is not None else None,
    }
    # all units of the window to do: one write, so Zarr encodes its chunks concurrently;
    # otherwise unit by unit, never touching the units finished before a resume
    whole = sum(w.size for _, w in task.units) == task.window.size
    pieces = [task.window] if whole else [w for _, w in task.units]
    for piece in pieces:
        rel = piece.relative_to(task.window).slices
        for name, data in arrays.items():
            if data is not None:
                store.write_window(name, piece, data[(..., *rel)])
    return tuple(index for index, _ in task.units)


def _is_vector(path: str) -> bool:
    return Path(path).suffix.lower() in VECTOR_SUFFIXES


def _input_hashes(spec: IngestSpec) -> dict[str, str]:
    """Content hashes of the label inputs (a missing file is a clear error)."""
    hashes: dict[str, str] = {}
    for name in ("labels", "instances"):
        path = getattr(spec, name)
        if path is None:
            continue
        if is_url(path):
            check_location(path, what=option(name))  # an unsupported scheme: one clear line
        elif not Path(path).is_file():
            raise LabelError(f"{name} file not found: {str(path)!r}: check the path")
        hashes[name] = source_sha256(path)  # an object's: its identity, not a download
    return hashes


def _local(path: str) -> str:
    """A label file to read: the path, or for a URL its copy in the cache (downloaded once
    per version; :func:`segflow.io.locations.cached_copy`)."""
    return str(locations.cached_copy(path)) if is_url(path) else path


def _open_labels(
    spec: IngestSpec, info: SourceInfo, workdir: Path
) -> tuple[LabelReader | None, LabelReader | None]:
    """Validate and open the label inputs (vector labels are normalized into ``workdir``)."""
    grid = PixelGrid(height=info.height, width=info.width, georef=info.georef)
    labels: LabelReader | None = None
    instances: LabelReader | None = None
    if spec.labels:
        if _is_vector(spec.labels):
            workdir.mkdir(parents=True, exist_ok=True)
            labels = prepare_vector_labels(
                _local(spec.labels),
                grid,
                classes=spec.classes,
                class_field=spec.class_field,
                class_value=spec.class_value,
                ignore_index=spec.ignore_index,
                workdir=workdir,
            )
            if spec.instances is None:
                instances = labels  # one feature = one instance
        else:
            labels = prepare_raster_labels(
                _local(spec.labels),
                grid,
                classes=spec.classes,
                class_map=spec.class_map,
                ignore_index=spec.ignore_index,
            )
    if spec.instances:
        instances = prepare_instance_raster(_local(spec.instances), grid)
    return labels, instances


def _store_key(path: Path | str) -> str | None:
    """The ingest key recorded in the store at ``path`` (None if there is no readable one)."""
    try:
        return SceneStore.open(path, unfinished=True).meta.get("ingest_key")
    except SegflowError:
        return None


def _out_location(out: str) -> Path | str:
    """The store's location: a local path, or a URL (``s3://...``) checked for its scheme."""
    text = check_location(out, what="--out", write=True)
    return text if is_url(text) else Path(text)


def _check_out_dir(spec: IngestSpec) -> Path | str:
    """The store path, once it is known not to be an input and its directory writable."""
    out = _out_location(spec.out)
    if isinstance(out, str):  # object storage: the bucket answers, the prefix holds no other data
        if remote.check_prefix(out, what="--out") and not store_exists(out):
            raise StoreError(
                f"{out!r} holds objects and is not a scene store: remove them or choose another --out"
            )
        return out
    if not out.parent.is_dir():
        raise StoreError(
            f"output directory does not exist: {str(out.parent)!r}: create it or choose another --out"
        )
    inputs = [p for p in (spec.source, spec.labels, spec.instances) if p]
    plan_outputs({"out": out}, inputs=inputs, directories=("out",))
    if out.exists() and not store_exists(out):
        raise StoreError(
            f"{str(out)!r} exists and is not a scene store: remove it or choose another --out"
        )
    return out


def check_inputs(spec: IngestSpec) -> SourceInfo:
    """Validate a spec, its source and its labels without writing anything at ``spec.out``.

    Command lines call this before starting a flow, so bad input fails in a second with one
    clear line. :func:`ingest` repeats the same checks. The source's size is checked against
    the pixel budget (``spec.max_pixels``, else ``$SEGFLOW_MAX_PIXELS``) from its header,
    before any pixel is read.
    """
    import tempfile

    spec.validated()
    _check_out_dir(spec)
    check_unlocked(spec.out)
    with open_source(spec.source, **_source_options(spec)) as source:
        info = source.info
    _input_hashes(spec)
    with tempfile.TemporaryDirectory(prefix="segflow-check-") as tmp:
        _open_labels(spec, info, Path(tmp))
    return info


def ingest(
    spec: IngestSpec,
    *,
    executor: Executor | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Build the scene store ``spec.out`` from ``spec.source`` (resuming if interrupted).

    Parameters
    ----------
    spec
        What to ingest and how.
    executor
        Where tasks run; default: a thread pool of one thread per core. Pass
        ``distributed.Client.get_executor()`` to run on Dask.
    progress
        Called with the number of write units finished, as they finish.
    on_start
        Called once with (units to write, units already done) before work starts.

    Raises
    ------
    SourceError, LabelError, ConfigError, StoreError
        Bad input, reported before anything is written at ``spec.out``: among others a
        source whose header declares more pixels than the budget (``spec.max_pixels``, else
        ``$SEGFLOW_MAX_PIXELS``).
    """
    spec.validated()
    with output_lock(_check_out_dir(spec)):
        return _ingest(spec, executor=executor, progress=progress, on_start=on_start)


def _ingest(
    spec: IngestSpec,
    *,
    executor: Executor | None,
    progress: Callable[[int], None] | None,
    on_start: Callable[[int, int], None] | None,
) -> IngestReport:
    """:func:`ingest` under the store's lock."""
    t0 = time.perf_counter()
    out = _out_location(spec.out)
    # the source's hash (its whole file) is only needed first when there is a store to compare
    # with; for a new store it runs beside the writes
    hashing = in_background(source_sha256, spec.source, assets=spec.assets)
    source = open_source(spec.source, **_source_options(spec))
    info = source.info
    label_hashes = _input_hashes(spec)
    staging = staging_location(out)
    staged_key = _store_key(staging)  # of an unfinished store there (looked up once)
    staged = staged_key is not None or _something_at(staging)
    fresh = not staged and not store_exists(out)
    run_key = None if fresh else _run_key(spec, hashing.result(), label_hashes)
    if run_key is not None and store_complete(out):
        return _already_complete(out, run_key, t0)

    resume = run_key is not None and staged_key == run_key
    labels, instances = _open_staging_labels(spec, info, staging, staged=staged, resume=resume)
    store, created = _open_or_create_staging(spec, info, staging, labels, instances, resume=resume)
    # a new store learns its key once the hash is done, before its first marks (the tasks
    # run meanwhile): a run killed before that has marked nothing and starts again
    key = _KeyRecorder(store, spec, hashing, label_hashes) if created else None

    done = store.progress("ingest").done()
    tasks = plan_tasks(store.grid, info.block, done=done)
    n_todo = sum(len(t.units) for t in tasks)
    if on_start:
        on_start(n_todo, len(done))
    log.info(
        "ingest %s -> %s: %d units to write, %d already done", spec.source, out, n_todo, len(done)
    )
    task_kwargs = {
        "source": source,
        "labels": labels,
        "instances": instances,
        "store_path": str(store.path),  # absolute: workers may run elsewhere
        # the workers' cache key of the opened store: a store made now is a new one
        "ingest_key": f"new {uuid.uuid4().hex}" if created else run_key,
    }
    _run_tasks(
        tasks,
        task_kwargs,
        store,
        staging,
        executor=executor,
        progress=progress,
        settle=key.record if key else None,
    )
    _finalize(store, spec)
    publish_store(staging, out)
    return _report(SceneStore.open(out), units_written=n_todo, units_skipped=len(done), t0=t0)


def _already_complete(out: Path | str, run_key: str, t0: float) -> IngestReport:
    """The report on the finished store ``out``, if these inputs made it (else an error)."""
    if _store_key(out) != run_key:
        raise StoreError(
            f"a different store already exists at {str(out)!r}: remove it or choose another --out"
        )
    log.info("%s is complete for these inputs: nothing to do", out)
    done_store = SceneStore.open(out)
    return _report(
        done_store,
        units_written=0,
        units_skipped=len(done_store.grid),
        t0=t0,
        already_complete=True,
    )


def _open_staging_labels(
    spec: IngestSpec, info: SourceInfo, staging: Path | str, *, staged: bool, resume: bool
) -> tuple[LabelReader | None, LabelReader | None]:
    """Open the label inputs into ``staging``, first discarding what is ``staged`` there unless
    this run ``resume``s it (same inputs). Bad labels remove a store this call started."""
    if staged and not resume:
        log.warning("discarding unfinished store %s made from other inputs", staging)
        remove_store(staging)
    try:
        return _open_labels(spec, info, _labels_workdir(staging))
    except SegflowError:
        if not resume:
            remove_store(staging)
        raise


def _exists_locally(location: Path | str) -> bool:
    return isinstance(location, Path) and location.exists()


def _labels_workdir(staging: Path | str) -> Path:
    """Where vector labels are rasterized for this store: inside a local one; for a store on
    object storage, a local cache directory named after it (GDAL rasterizes to a file)."""
    if isinstance(staging, Path):
        return staging / "_segflow" / "labels"
    digest = hashlib.sha256(staging.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "segflow-labels" / digest


def _run_tasks(
    tasks: Sequence[IngestTask],
    task_kwargs: Mapping[str, Any],
    store: SceneStore,
    staging: Path | str,
    *,
    executor: Executor | None,
    progress: Callable[[int], None] | None,
    settle: Callable[[], None] | None = None,
) -> None:
    """Run ``tasks`` on ``executor`` (default: one thread per core), recording finished units.

    ``settle()`` is called before any unit is marked (and at the end): a new store's key is
    recorded before its first marks, so a resumed run never discards marked units. An error
    it raises removes the store like a task's.
    """
    own_pool = executor is None
    pool: Executor = executor or ThreadPoolExecutor(max_workers=usable_cores())
    futures = [pool.submit(_ingest_task, t, **task_kwargs) for t in tasks]
    marks = store.progress("ingest")
    try:
        for fut in as_completed(futures):
            units = fut.result()
            if settle:
                settle()
            marks.mark_many(units)
            if progress:
                progress(len(units))
        if settle:
            settle()
    except SegflowError:
        # e.g. label values outside the class table, found only when read: this store
        # can never be finished, so it is removed rather than left to resume
        for f in futures:
            f.cancel()
        if own_pool:
            pool.shutdown(wait=True, cancel_futures=True)
        remove_store(staging)
        raise
    if own_pool:
        pool.shutdown(wait=True)


def _open_or_create_staging(
    spec: IngestSpec,
    info: SourceInfo,
    staging: Path | str,
    labels: LabelReader | None,
    instances: LabelReader | None,
    *,
    resume: bool,
) -> tuple[SceneStore, bool]:
    """Open the unfinished store of this run (``resume``), or create it without a key (the
    caller's :class:`_KeyRecorder` records it); whether it was created."""
    if resume:
        return SceneStore.open(staging, mode="r+", unfinished=True), False
    store = SceneStore.create(
        staging,
        bands=info.bands,
        height=info.height,
        width=info.width,
        dtype=info.dtype,
        chunk=spec.chunk,
        shard=spec.shard,
        compression_level=spec.compression_level,
        nodata=info.nodata,
        georef=info.georef,
        slide=info.slide,
        source=SourceRecord(
            uri=spec.source if is_url(spec.source) else str(Path(spec.source).resolve()),
            sha256="",  # with the key (below, or by _KeyRecorder)
            kind=info.kind,
            level=spec.level,
        ),
        classes=spec.classes,
        ignore_index=spec.ignore_index,
        valid_fill=True,  # every unit is written: only chunks with nodata pixels are stored
    )
    if labels is not None:
        store.create_array(
            "labels",
            dtype=label_dtype(spec.classes, spec.ignore_index),
            fill_value=spec.ignore_index,
        )
    if instances is not None:
        store.create_array("instances", dtype="uint32", fill_value=0)
    # one marker file per task (the coordinator marks a task's units together), not per unit
    store.progress("ingest", group=task_units(store.grid, info.block))
    return store, True


@dataclass
class _KeyRecorder:
    """Records a new store's run key and source hash once the hash (in the background) is done."""

    store: SceneStore
    spec: IngestSpec
    hashing: Future[str]
    label_hashes: Mapping[str, str]
    recorded: bool = False

    def record(self) -> None:
        """Record them (once), waiting for the hash; raises the hash's error."""
        if self.recorded:
            return
        source_hash = self.hashing.result()
        source = {**self.store.meta["source"], "sha256": source_hash}
        key = _run_key(self.spec, source_hash, self.label_hashes)
        self.store.update_meta(source=source, ingest_key=key)
        self.recorded = True


def _something_at(location: Path | str) -> bool:
    """Whether a store or local folder (perhaps a half-made store) is at ``location``."""
    return _exists_locally(location) or store_exists(location)


def _finalize(store: SceneStore, spec: IngestSpec) -> None:
    params = {
        "source": spec.source,
        "level": spec.level,
        "chunk": spec.chunk,
        "shard": spec.shard,
        "compression_level": spec.compression_level,
        "code_version": __version__,
    }
    store.record_array("image", **params)
    store.record_array("valid", **params)
    if "labels" in store.group:
        store.record_array(
            "labels",
            labels=spec.labels,
            class_field=spec.class_field,
            class_value=spec.class_value,
            class_map={str(k): v for k, v in (spec.class_map or {}).items()},
        )
    if "instances" in store.group:
        store.record_array("instances", instances=spec.instances or spec.labels)
    store.consolidate()


def _report(
    store: SceneStore,
    *,
    units_written: int,
    units_skipped: int,
    t0: float,
    already_complete: bool = False,
) -> IngestReport:
    return IngestReport(
        store=str(store.path),
        height=store.height,
        width=store.width,
        bands=len(store.meta["bands"]),
        units_total=len(store.grid),
        units_written=units_written,
        units_skipped=units_skipped,
        valid_fraction=None,
        seconds=time.perf_counter() - t0,
        already_complete=already_complete,
        arrays=tuple(sorted(store.meta["arrays"])),
    )
