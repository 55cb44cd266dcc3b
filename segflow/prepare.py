"""The prepare stage over a scene store: instances, class weights, weight map, fingerprint.

Composes :mod:`segflow.weights` and :mod:`segflow.stats` over the arrays of a
:class:`~segflow.io.store.SceneStore` (DESIGN.md sections 3-4). Each stage is a plain function
that a Prefect task (``flows/prepare.py``) or a script can call; all Dask work runs on the
given ``client`` (``distributed.Client``) or, without one, on the current Dask scheduler.

Stages
------
1. :func:`ensure_instances`: use the store's ``instances``; without them, derive them from the
   ``labels`` by connected components (:func:`segflow.weights.instances_from_labels`: the
   4-connected components of valid pixels whose class is neither 0 (background) nor
   ``ignore_index``, all foreground classes together) and write them as ``instances``,
   recorded with ``derived_from="labels"``.
2. :func:`compute_class_counts` and :func:`segflow.stats.class_weights`.
3. :func:`write_weights`: ``weights = w_c + border term`` (0 on unlabelled and invalid
   pixels), one task per write unit: it reads the unit's instances grown by the halo from
   the store, computes and writes the unit whole; per-unit progress makes a killed run
   resume, and the array is recorded with its parameters.
4. :func:`compute_fingerprint` and :func:`write_fingerprint`: store attribute ``fingerprint``
   and a JSON file beside the store, ``scene.zarr`` -> ``scene.fingerprint.json`` (or a given
   path).

A re-run with the same parameters and inputs finds everything recorded and does nothing
(:func:`is_current`).

Examples
--------
>>> from segflow.config import PrepareConfig
>>> result = prepare_store("scene.zarr", PrepareConfig(sigma=5, class_weights="median"))  # doctest: +SKIP
>>> result.fingerprint.mean  # doctest: +SKIP
(112.3, 87.1, 60.2)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError

from segflow.config import PrepareConfig, TrainRegion, format_validation_error
from segflow.errors import ConfigError, StoreError, option
from segflow.fingerprint import (
    Fingerprint,
    band_histograms,
    band_moments,
    fingerprint_from_moments,
    pixel_size,
)
from segflow.fingerprint import _int_hist_spec as int_hist_spec
from segflow.geometry import BlockIndex, Window
from segflow.io import locations, remote
from segflow.io.store import SceneStore
from segflow.outputs import check_output_directory
from segflow.stats import check_train_region, class_counts, class_weights, counts_to_dict
from segflow.weights import (
    TILE,
    apply_class_weights,
    border_halo,
    border_radius,
    border_term,
    class_weight_lut,
    instances_from_labels,
)

__all__ = [
    "FINGERPRINT_SUFFIX",
    "PrepareResult",
    "check_inputs",
    "config_with",
    "compute_class_counts",
    "compute_fingerprint",
    "default_fingerprint_path",
    "ensure_instances",
    "is_current",
    "make_config",
    "open_store",
    "parse_explicit_weights",
    "prepare_store",
    "request_of",
    "write_fingerprint",
    "write_weights",
]

log = logging.getLogger(__name__)

#: Suffix of the default fingerprint file, beside the store: ``scene.zarr`` ->
#: ``scene.fingerprint.json`` (a file *inside* the Zarr hierarchy makes zarr warn on every listing).
FINGERPRINT_SUFFIX = ".fingerprint.json"
_INPUTS = ("image", "valid", "labels", "instances")
_PENDING = "segflow_pending"
#: Largest side of the chunks class counts and the fingerprint are computed in (memory per task).
MAX_COMPUTE_CHUNK = 1024

Progress = Callable[[Any], Any]


@dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare_store` did."""

    store: Path | str
    skipped: bool
    instances: str
    class_counts: dict[int, int]
    class_weights: dict[int, float]
    fingerprint: Fingerprint
    fingerprint_path: Path | str


T = TypeVar("T")
#: Runs one named step of :func:`prepare_store`: ``step(name, work) -> work()``.
Step = Callable[[str, Callable[[], Any]], Any]


# --------------------------------------------------------------------------- validation
def make_config(**options: Any) -> PrepareConfig:
    """A :class:`PrepareConfig` from keyword options; bad values raise :class:`ConfigError`.

    >>> make_config(sigma=0)
    Traceback (most recent call last):
    ...
    segflow.errors.ConfigError: prepare options: 'sigma' = 0 is invalid: Input should be greater than 0
    """
    try:
        return PrepareConfig.model_validate(options)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source="prepare options")) from None


def parse_explicit_weights(text: str) -> dict[int, float]:
    """``"0=1,1=5"`` -> ``{0: 1.0, 1: 5.0}`` (the command line's form of explicit weights).

    >>> parse_explicit_weights("0=1, 1=5")
    {0: 1.0, 1: 5.0}
    """
    try:
        pairs = [p.split("=") for p in text.split(",") if p.strip()]
        return {int(k): float(v) for k, v in pairs}
    except ValueError:
        raise ConfigError(
            f"{option('explicit_weights')} must be id=weight pairs separated by commas, e.g. "
            f"0=1,1=5: got {text!r}"
        ) from None


def config_with(
    base: Mapping[str, Any],
    *,
    overrides: Mapping[str, Any],
    explicit_weights: str | None = None,
    train_bbox: Sequence[int] | None = None,
    train_blocks: Sequence[int] | None = None,
) -> PrepareConfig:
    """``base`` options (e.g. a pipeline's ``prepare`` section) with ``overrides`` and the
    command line's forms of the nested options: explicit weights switch the mode to
    ``explicit`` unless a mode is given; ``train_bbox`` (R0 C0 R1 C1) or ``train_blocks``
    (BLOCK EVERY) set the training region."""
    options = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    if explicit_weights is not None:
        options["explicit_class_weights"] = parse_explicit_weights(explicit_weights)
        if overrides.get("class_weights") is None:
            options["class_weights"] = "explicit"
    if train_bbox and train_blocks:
        raise ConfigError(
            f"give either {option('train_bbox')} or {option('train_blocks')}, not both"
        )
    if train_bbox:
        options["train_region"] = {"bbox": tuple(train_bbox)}
    elif train_blocks:
        options["train_region"] = {"block": train_blocks[0], "holdout_every": train_blocks[1]}
    return make_config(**options)


def open_store(path: str | Path) -> SceneStore:
    """Open a store for prepare (``r+``); :class:`StoreError` if it is missing."""
    return SceneStore.open(path, mode="r+")


def check_inputs(store: SceneStore, config: PrepareConfig) -> None:
    """Validate before any work: arrays present, region overlaps, weights mode possible."""
    if not store.has("image"):
        raise StoreError(f"store {str(store.path)!r} has no complete image: re-run flows/ingest.py")
    if not (store.has("labels") or store.has("instances")):
        raise StoreError(
            f"store {str(store.path)!r} has neither labels nor instances: border weights need "
            "objects; ingest with --labels or --instances"
        )
    if config.class_weights != "none" and not store.has("labels"):
        raise ConfigError(
            f"class weights {config.class_weights!r} need labels, and store {str(store.path)!r} "
            "has only instances: use --class-weights none or ingest labels"
        )
    if config.class_weights == "explicit" and not config.explicit_class_weights:
        raise ConfigError(
            "class weights 'explicit' need explicit_class_weights: give id=weight pairs"
        )
    if store.has("labels"):
        dt = np.dtype(store.array("labels").dtype)
        if dt.kind != "u" or dt.itemsize > 2:
            raise StoreError(
                f"labels of {str(store.path)!r} are {dt}, expected uint8 or uint16: re-run ingest"
            )
    if "instances" in store.group and not store.has("instances") and not store.has("labels"):
        raise StoreError(
            f"the instances of {str(store.path)!r} are incomplete: re-run flows/ingest.py"
        )
    check_train_region(config.train_region, store.height, store.width)
    # prepare writes its arrays into the store: a read-only one fails now, not mid-run
    check_output_directory("store", store.path)


def request_of(store: SceneStore, config: PrepareConfig) -> dict[str, Any]:
    """What the results depend on: the options and the records of the input arrays."""
    arrays = store.meta["arrays"]
    return {
        "config": config.model_dump(mode="json"),
        "inputs": {name: arrays[name] for name in _INPUTS if name in arrays},
    }


def _same(a: Any, b: Any) -> bool:
    """Equality after a JSON round trip (attributes turn tuples into lists, int keys into str)."""
    import json

    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def is_current(store: SceneStore, config: PrepareConfig) -> bool:
    """Whether weights and fingerprint are recorded complete for these options and inputs."""
    done = store.meta.get("prepare")
    return bool(
        store.has("weights")
        and done
        and store.meta.get("fingerprint")
        and _same(done.get("request"), request_of(store, config))
        and _same((store.array_params("weights") or {}).get("request"), request_of(store, config))
    )


# --------------------------------------------------------------------------- dask helpers
def _compute(obj: Any, client: Any | None, progress: Progress | None) -> Any:
    """Compute ``obj`` (a Dask collection, or a tuple or list of them) as ``dask.compute`` would.

    Parameters
    ----------
    obj
        One collection, or a tuple or list of collections (and plain values), computed
        together in one graph so that shared work (e.g. the connected components behind the
        instance ids and their count) runs once.
    client
        A ``distributed.Client``; ``None`` computes on the current Dask scheduler.
    progress
        Called with the future (one collection) or the list of futures (a sequence).

    Returns
    -------
    Any
        The computed value; for a tuple or list, a tuple or list of the computed values in
        the same order (``client.compute`` alone would return a list of futures).
    """
    if client is None:
        import dask

        return dask.compute(obj)[0]
    if isinstance(obj, tuple | list):
        futures = client.compute(list(obj))
        if progress is not None:
            progress(futures)
        values = client.gather(futures)
        return tuple(values) if isinstance(obj, tuple) else list(values)
    future = client.compute(obj)
    if progress is not None:
        progress(future)
    return future.result()


def compute_chunk(store: SceneStore, limit: int = MAX_COMPUTE_CHUNK) -> int:
    """The chunk side class counts and the fingerprint are computed in: the largest multiple
    of the store's chunk that divides the write unit and is at most ``limit`` (at least one)."""
    c, u = store.chunk, store.write_unit
    best = c
    for k in range(c, min(u, limit) + 1, c):
        if u % k == 0:
            best = k
    return best


def _from_store(store: SceneStore, name: str, side: int) -> Any:
    import dask.array as da

    arr = store.array(name)
    chunks = (*arr.shape[:-2], side, side)
    return da.from_zarr(arr, chunks=chunks)


def _has_valid(store: SceneStore) -> bool:
    """Whether the store has a complete ``valid`` array (a warning when it has not)."""
    if store.has("valid"):
        return True
    log.warning("store %s has no complete 'valid' array: every pixel counts as valid", store.path)
    return False


def _valid(store: SceneStore, side: int) -> Any | None:
    return _from_store(store, "valid", side) if _has_valid(store) else None


def _write_block(
    block: np.ndarray,
    *,
    path: str,
    array: str,
    unit: int,
    height: int,
    width: int,
    skip: frozenset[tuple[int, int]],
    block_info: dict[Any, Any] | None = None,
) -> np.ndarray:
    assert block_info is not None
    i, j = block_info[0]["chunk-location"]
    if (i, j) in skip:
        return np.zeros((1, 1), np.int64)
    r0, c0 = i * unit, j * unit
    window = Window.from_bounds(r0, c0, min(r0 + unit, height), min(c0 + unit, width))
    store = SceneStore.open(path, mode="r+")
    store.write_window(array, window, block)
    store.progress(array).mark(BlockIndex(i, j))
    return np.ones((1, 1), np.int64)


def _store_units(
    x: Any, store: SceneStore, name: str, *, skip: frozenset[tuple[int, int]] = frozenset()
) -> Any:
    """Lazy: write ``x`` (y, x) into array ``name``, one task per write unit; sums to units written."""
    u = store.write_unit
    x = x.rechunk((u, u))
    rows, cols = store.grid.shape_in_blocks
    store.progress(name)  # created here, by the coordinator, before any task marks it
    return x.map_blocks(
        _write_block,
        chunks=((1,) * rows, (1,) * cols),
        dtype=np.int64,
        meta=np.empty((0, 0), np.int64),
        path=str(store.path),
        array=name,
        unit=u,
        height=store.height,
        width=store.width,
        skip=skip,
    ).sum()


def _start_array(
    store: SceneStore, name: str, request: Any, *, dtype: str, restart: bool = False
) -> set[BlockIndex]:
    """Create (or resume) array ``name`` for ``request``; the write units already done."""
    store.forget_array(name)
    pending = None
    if name in store.group:
        pending = store.array(name).attrs.get(_PENDING)
    progress = store.progress(name)
    if not restart and pending is not None and _same(pending, request):
        done = progress.done()
        log.info("resuming %s: %d of %d units already written", name, len(done), len(store.grid))
        return done
    store.create_array(name, dtype=dtype, fill_value=0, overwrite=True, attrs={_PENDING: request})
    progress.reset()
    return set()


# --------------------------------------------------------------------------- stages
def ensure_instances(
    store: SceneStore, *, client: Any | None = None, progress: Progress | None = None
) -> str:
    """Make sure the store has complete ``instances``; derive them from ``labels`` if needed.

    Returns ``"instances"`` (given by ingest) or ``"labels"`` (derived, now or earlier).
    """
    labels_rec = store.meta["arrays"].get("labels")
    if store.has("instances"):
        params = store.array_params("instances") or {}
        if params.get("derived_from") != "labels":
            return "instances"
        if _same(params.get("labels_record"), labels_rec):
            return "labels"
        log.info("labels changed since instances were derived: deriving them again")
    if not store.has("labels"):
        raise StoreError(
            f"store {str(store.path)!r} has neither labels nor instances: ingest with --labels"
        )
    request = {"derived_from": "labels", "labels_record": labels_rec}
    _start_array(store, "instances", request, dtype="uint32")
    side = store.write_unit
    labels = _from_store(store, "labels", side)
    valid = _valid(store, side)
    ids, count = instances_from_labels(labels, valid, ignore_index=store.ignore_index)
    written, n = _compute((_store_units(ids, store, "instances"), count), client, progress)
    store.record_array(
        "instances",
        derived_from="labels",
        labels_record=labels_rec,
        method="dask_image.ndmeasure.label",
        connectivity=4,
        objects=f"valid pixels of classes other than 0 and ignore_index {store.ignore_index}",
        count=int(n),
    )
    log.info("derived %d objects from labels (%d units)", int(n), int(written))
    return "labels"


def compute_class_counts(
    store: SceneStore,
    config: PrepareConfig,
    *,
    client: Any | None = None,
    progress: Progress | None = None,
) -> dict[int, int]:
    """Pixels per class over valid, labelled pixels of the training region (``{}`` without labels)."""
    if not store.has("labels"):
        return {}
    side = compute_chunk(store)
    graph = class_counts(
        _from_store(store, "labels", side),
        _valid(store, side),
        ignore_index=store.ignore_index,
        region=config.train_region,
    )
    counts = _compute(graph, client, progress)
    return counts_to_dict(
        counts, class_ids=[c.id for c in store.classes], ignore_index=store.ignore_index
    )


def compute_class_weights(counts: Mapping[int, int], config: PrepareConfig) -> dict[int, float]:
    """Class weights for ``config.class_weights`` (``{}`` = 1 everywhere, without labels)."""
    if not counts and config.class_weights == "none":
        return {}
    return class_weights(counts, config.class_weights, explicit=config.explicit_class_weights)


@lru_cache(maxsize=8)
def _lut(items: tuple[tuple[int, float], ...], dtype: str, ignore_index: int) -> np.ndarray:
    return class_weight_lut(dict(items), dtype=dtype, ignore_index=ignore_index)


@dataclass(frozen=True)
class _WeightsJob:
    """What one write unit of the weight map needs: the store, the term's and the class weights."""

    path: str
    w0: float
    sigma: float
    eps: float
    items: tuple[tuple[int, float], ...]
    labels: bool
    valid: bool
    tile: int


def _weights_unit(job: _WeightsJob, index: BlockIndex) -> int:
    """Compute and write the weights of one write unit (a task); returns 1.

    The unit's instances are read from the store grown by the halo, not handed over by Dask
    (``map_overlap``): neighbouring blocks then never travel between worker processes, and
    the unit is computed and written whole, so no block of weights moves either.
    """
    store = SceneStore.open(job.path, mode="r+")
    window = store.grid.window(index.row, index.col)
    halo = border_halo(job.w0, job.sigma, job.eps)
    outer = window.pad(halo).intersection(Window(0, 0, store.height, store.width))
    instances = np.asarray(store.array("instances")[outer.slices])
    term = border_term(instances, w0=job.w0, sigma=job.sigma, eps=job.eps, tile=job.tile)
    term = term[window.relative_to(outer).slices]
    labels = np.asarray(store.array("labels")[window.slices]) if job.labels else None
    valid = np.asarray(store.array("valid")[window.slices]) if job.valid else None
    lut = _lut(job.items, str(labels.dtype), store.ignore_index) if labels is not None else None
    store.write_window("weights", window, apply_class_weights(term, labels, valid, lut))
    store.progress("weights").mark(index)
    return 1


def write_weights(
    store: SceneStore,
    config: PrepareConfig,
    weights_by_class: Mapping[int, float],
    *,
    client: Any | None = None,
    progress: Progress | None = None,
    chunk: int | None = None,
    force: bool = False,
) -> bool:
    """Compute ``weights = w_c + border term`` over the store and write it; False if current.

    One task per write unit (:func:`_weights_unit`). ``chunk`` overrides the side of the tiles
    the border term is computed in inside a unit (default :data:`segflow.weights.TILE`); the
    result does not depend on it. ``force`` recomputes everything.
    """
    import dask

    request = request_of(store, config)
    current = _same((store.array_params("weights") or {}).get("request"), request)
    if not force and store.has("weights") and current:
        log.info("weights of %s are current", store.path)
        return False
    done = _start_array(store, "weights", request, dtype="float32", restart=force)
    items = tuple(sorted((int(k), float(v)) for k, v in weights_by_class.items()))
    job = _WeightsJob(
        path=str(store.path),
        w0=config.w0,
        sigma=config.sigma,
        eps=config.eps,
        items=items,
        labels=store.has("labels"),
        valid=_has_valid(store),
        tile=chunk or TILE,
    )
    unit = dask.delayed(_weights_unit, pure=False)
    written = _compute(
        [unit(job, index) for index, _ in store.grid if index not in done], client, progress
    )
    halo = border_halo(config.w0, config.sigma, config.eps)
    store.record_array(
        "weights",
        w0=config.w0,
        sigma=config.sigma,
        eps=config.eps,
        radius=border_radius(config.w0, config.sigma, config.eps),
        halo=halo,
        class_weight_mode=config.class_weights,
        class_weights={str(k): v for k, v in items},
        train_region=config.train_region.model_dump(mode="json") if config.train_region else None,
        request=request,
    )
    log.info("wrote weights of %s (%d units, %d resumed)", store.path, sum(written), len(done))
    return True


def compute_fingerprint(
    store: SceneStore,
    config: PrepareConfig,
    counts: Mapping[int, int],
    weights_by_class: Mapping[int, float],
    *,
    client: Any | None = None,
    progress: Progress | None = None,
) -> Fingerprint:
    """Per-band statistics over valid pixels of the training region, with the class data."""
    side = compute_chunk(store)
    image = _from_store(store, "image", side)
    valid = _valid(store, side)
    region: TrainRegion | None = config.train_region
    moments = _compute(band_moments(image, valid, region=region), client, progress)
    float_hist = None
    if int_hist_spec(image.dtype) is None and moments.n.size and moments.n.min() > 0:
        float_hist = _compute(
            band_histograms(image, valid, region=region, lo=moments.min, hi=moments.max),
            client,
            progress,
        )
    size, unit = pixel_size(store.georef, store.slide)
    return fingerprint_from_moments(
        moments,
        bands=tuple(store.meta["bands"]),
        dtype=image.dtype,
        float_hist=float_hist,
        class_counts=dict(counts),
        class_weights=dict(weights_by_class),
        class_weight_mode=config.class_weights,
        ignore_index=store.ignore_index,
        pixel_size=size,
        pixel_unit=unit,
        train_region=region.model_dump(mode="json") if region else None,
    )


def default_fingerprint_path(store_path: str | Path) -> Path | str:
    """Where the fingerprint JSON goes by default: ``scene.zarr`` -> ``scene.fingerprint.json``
    (beside a store on object storage: a URL)."""
    if remote.is_url(store_path):
        parent, _, name = str(store_path).rstrip("/").rpartition("/")
        return f"{parent}/{Path(name).stem}{FINGERPRINT_SUFFIX}"
    p = Path(store_path).resolve()
    return p.with_name(p.stem + FINGERPRINT_SUFFIX)


def _fingerprint_location(path: str | Path) -> Path | str:
    return str(path) if remote.is_url(path) else Path(path).resolve()


def _write_fingerprint_json(fingerprint: Fingerprint, out: Path | str) -> None:
    """The fingerprint's JSON, written whole (atomically on disk, one PUT on object storage)."""
    doc = json.dumps(fingerprint.to_dict(), indent=2, sort_keys=True, default=str)
    locations.write_text(out, doc + "\n")


def write_fingerprint(
    store: SceneStore,
    fingerprint: Fingerprint,
    config: PrepareConfig,
    path: str | Path | None = None,
) -> Path | str:
    """Store the fingerprint in the store's attributes and as JSON; record prepare complete.

    The JSON goes to ``path``, by default :func:`default_fingerprint_path`; the path written
    is recorded in the store attribute ``prepare.fingerprint_path`` (absolute).
    """
    out = _fingerprint_location(path) if path is not None else default_fingerprint_path(store.path)
    _write_fingerprint_json(fingerprint, out)
    store.update_meta(
        fingerprint=fingerprint.to_dict(),
        prepare={"request": request_of(store, config), "fingerprint_path": str(out)},
    )
    return out


def prepare_store(
    path: str | Path,
    config: PrepareConfig | None = None,
    *,
    client: Any | None = None,
    progress: Progress | None = None,
    fingerprint_path: str | Path | None = None,
    force: bool = False,
    step: Step | None = None,
) -> PrepareResult:
    """Run the whole prepare stage on the store at ``path`` (see the module docstring).

    ``step(name, work)`` runs each of the four steps (``instances``, ``class-weights``,
    ``weight-map``, ``fingerprint``; ``work`` takes no argument); the default calls it, a
    Prefect flow makes each a task.

    Returns
    -------
    PrepareResult
        ``skipped`` is True when everything was already current.
    """
    config = config or PrepareConfig()
    store = open_store(path)
    check_inputs(store, config)
    if not force and is_current(store, config):
        meta = store.meta
        fp = Fingerprint.from_dict(meta["fingerprint"])
        out = _fingerprint_location(fingerprint_path or meta["prepare"]["fingerprint_path"])
        if not locations.exists(out):
            _write_fingerprint_json(fp, out)
        log.info("prepare of %s is current: nothing to do", store.path)
        source = (store.array_params("instances") or {}).get("derived_from", "instances")
        return PrepareResult(store.path, True, source, fp.class_counts, fp.class_weights, fp, out)
    run = step or _call
    kw: dict[str, Any] = {"client": client, "progress": progress}
    source = run("instances", lambda: ensure_instances(store, **kw))
    counts = run("class-weights", lambda: compute_class_counts(store, config, **kw))
    weights = compute_class_weights(counts, config)
    run("weight-map", lambda: write_weights(store, config, weights, force=force, **kw))

    def fingerprint() -> tuple[Fingerprint, Path | str]:
        fp = compute_fingerprint(store, config, counts, weights, **kw)
        return fp, write_fingerprint(store, fp, config, fingerprint_path)

    fp, out = run("fingerprint", fingerprint)
    return PrepareResult(store.path, False, source, counts, weights, fp, out)


def _call(name: str, work: Callable[[], T]) -> T:
    return work()
