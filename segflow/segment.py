"""segment_region: a model over a region of a large image, to a georeferenced mask and polygons.

Composes the pieces: resolve the region (:mod:`segflow.region`), load the checkpoint
(:mod:`segflow.train.checkpoint`), stream overlap-tile inference into a chunked prediction
store (:mod:`segflow.infer.engine`), then export from that store window by window
(:mod:`segflow.io.export`). Every check runs before anything is written; every output is
written under a temporary name and moved into place; the prediction store records finished
units, so a killed run resumes without recomputing them.

Examples
--------
>>> req = SegmentRequest(image="scene.tif", model="ckpt/", out="mask.tif")  # doctest: +SKIP
>>> report = segment_region(req)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from segflow.budget import ENV_MEMORY_BUDGET, format_bytes, memory_budget
from segflow.cluster import ENV_ADDRESS, dask_client, gpu_client
from segflow.config import ClassDef
from segflow.config.segment import FLAGS, SegmentRequest
from segflow.errors import CheckpointError, ConfigError, SegflowError, option
from segflow.geometry import Window
from segflow.infer.engine import (
    InferenceOptions,
    InferenceReport,
    SourceReader,
    StoreReader,
    UnitRunner,
    open_prediction_store,
    predict_region,
    prediction_unit,
    resolve_device,
)
from segflow.infer.exports import (
    ClassCounter,
    ExportJob,
    RegionView,
    export_outputs,
    instance_classes,
    write_prediction_item,
)
from segflow.io import remote
from segflow.io.sources import RasterioSource, Source, asset_hrefs, is_stac_item, open_source
from segflow.io.staging import plan_urls, staged_outputs, url_stamp
from segflow.io.store import GeoRef, SceneStore, SlideInfo, SourceRecord, store_exists
from segflow.outputs import (
    OutputRecord,
    check_output_directory,
    check_unlocked,
    file_stamp,
    output_lock,
    plan_outputs,
)
from segflow.region import resolve_region
from segflow.runtime import usable_cores
from segflow.tiling import round_up

if TYPE_CHECKING:
    from segflow.train.checkpoint import CheckpointMeta

__all__ = [
    "SegmentReport",
    "SegmentRequest",
    "SourceReader",
    "check_request",
    "segment_region",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentReport:
    """What a segment_region run did and wrote."""

    region: Window
    outputs: dict[str, str]
    inference: dict[str, Any]
    class_pixels: dict[str, int]
    polygons: int | None
    seconds: float
    georef: dict[str, Any] | None = field(default=None)
    instances: int | None = None
    #: the slide's metadata at the level read (``mpp_x``/``mpp_y``: microns per pixel)
    slide: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["region"] = asdict(self.region)
        return d


@dataclass(frozen=True)
class _Input:
    """The opened image: a scene store or a source, with its grid metadata."""

    reader: Any
    store: SceneStore | None
    source: Source | None
    height: int
    width: int
    bands: tuple[str, ...]
    georef: GeoRef | None
    slide: SlideInfo | None


def _open_input(path: str, level: int, assets: tuple[str, ...] = ()) -> _Input:
    if _is_scene_store(path):
        store = SceneStore.open(path)
        return _Input(
            StoreReader(store),
            store,
            None,
            store.height,
            store.width,
            tuple(store.meta["bands"]),
            store.georef,
            store.slide,
        )
    src = open_source(path if remote.is_url(path) else Path(path), level=level, assets=assets)
    i = src.info
    return _Input(SourceReader(src), None, src, i.height, i.width, i.bands, i.georef, i.slide)


def _load_model(path: str) -> tuple[Any, Any]:
    from segflow.train.checkpoint import load_checkpoint_cached

    return load_checkpoint_cached(path)


def _is_scene_store(path: str | Path) -> bool:
    return store_exists(remote.check_location(path, what="image"))


def _absolute(path: str) -> str:
    """``path`` made absolute (Dask workers may run elsewhere in the tree); URLs as given."""
    return path if remote.is_url(path) else str(Path(path).resolve())


#: Request fields of the outputs whose name in plans and messages differs.
_FIELDS = {"qupath": "qupath_geojson"}
#: Plan names of the exports' results whose key differs.
_PLAN_NAMES = {"cog": "out", "qupath_geojson": "qupath"}


def _prediction_store_path(req: SegmentRequest) -> Path | str:
    """The store the run writes predictions and progress into."""
    if req.into_store:
        return req.image if remote.is_url(req.image) else Path(req.image)
    return req.work_store


def _earlier_outputs(store: Path | str) -> OutputRecord:
    """The outputs the last finished run recorded in its prediction store (none if absent)."""
    if not _is_scene_store(store):
        return OutputRecord({})
    try:
        return OutputRecord(dict(SceneStore.open(store).meta.get("outputs") or {}))
    except SegflowError:
        return OutputRecord({})


def plan_request(req: SegmentRequest) -> dict[str, Path | str]:
    """Check every output path of ``req`` before anything is read or written.

    Outputs are never inputs (the image, the checkpoint) nor inside them, never two at one
    path, each in an existing writable directory; an existing file is replaced only when the
    last run of this command recorded it in its prediction store, or with ``overwrite``. A
    scene store given as ``image`` is written only with ``into_store``. Outputs on object
    storage are checked by :func:`~segflow.io.staging.plan_urls`. Returns ``{option name:
    absolute path or URL}`` (``work``: the prediction store, unless ``into_store``).
    """
    if req.into_store and not _is_scene_store(req.image):
        raise ConfigError(
            f"into_store needs a scene store as the image, got {req.image!r}: "
            f"drop {option('into_store')}, or pass a store written by flows/ingest.py"
        )
    if req.into_store and not remote.is_url(req.image):
        check_output_directory("into_store", req.image)  # a read-only store fails now
    work = None if req.into_store else req.work_store
    named = {**req.outputs(), "work": None if work is None else str(work)}
    for name, value in named.items():  # URLs that cannot be written fail before any request
        if value and remote.is_url(value):
            remote.check_location(value, what=name, write=True)
    record = _earlier_outputs(_prediction_store_path(req))
    inputs = [req.image, req.model]
    if is_stac_item(req.image):
        inputs += asset_hrefs(req.image, req.assets)
    plan: dict[str, Path | str] = {}
    plan.update(plan_urls(req.outputs(), inputs=inputs, overwrite=req.overwrite, record=record,
                          trees=("ome_zarr",)))  # fmt: skip
    if work is not None:
        _check_work(work)
    plan.update(plan_outputs(
        {k: None if v and remote.is_url(v) else v for k, v in named.items()},
        inputs=[p for p in inputs if not remote.is_url(p)], overwrite=req.overwrite,
        record=record, directories=("work",), trees=("ome_zarr",),
    ))  # fmt: skip
    if isinstance(work, str):
        plan["work"] = work
    return plan


def _check_work(work: Path | str) -> None:
    """The prediction store's location holds nothing but a prediction store."""
    if isinstance(work, str):
        url = remote.check_location(work, what="work", write=True)
        taken = remote.check_prefix(url, what="work") and not _is_scene_store(url)
    else:
        taken = work.exists() and not _is_scene_store(work)
    if taken:
        raise ConfigError(
            f"work: {str(work)!r} exists and is not a segflow prediction store: "
            f"remove it, or choose another {option('work')} or {option('out')}"
        )


def check_request(req: SegmentRequest) -> tuple[_Input, Window, Any, Any, InferenceOptions]:
    """Validate everything before any output is written; returns what the run needs: the
    input, the region, the model and its metadata, and the engine's options.

    Also refuses at once (:class:`~segflow.outputs.LockedError`) while another run is
    writing the same ``out``.
    """
    plan_request(req)
    check_unlocked(req.out)
    return _check_inputs(req, local=not uses_cluster(req))


def _check_inputs(
    req: SegmentRequest, *, local: bool = True
) -> tuple[_Input, Window, Any, Any, InferenceOptions]:
    if not remote.is_url(req.model) and not Path(req.model).exists():
        raise CheckpointError(
            f"checkpoint not found: {req.model!r}: pass the directory flows/train.py wrote"
        )
    # the image before the model: its imports take seconds
    inp = _open_input(req.image, req.level, req.assets)
    region = resolve_region(
        height=inp.height,
        width=inp.width,
        georef=inp.georef,
        slide=inp.slide,
        bbox=req.bbox,
        bbox_crs=req.bbox_crs,
        window=req.window,
    )
    model, meta = _load_model(req.model)
    want = len(meta.bands)
    if want != len(inp.bands):
        raise ConfigError(
            f"the model expects {want} band(s) {list(meta.bands)} but {req.image!r} has "
            f"{len(inp.bands)} {list(inp.bands)}: use an image with the bands the model was trained on"
        )
    if req.tile % int(meta.size_multiple):
        fit = req.tile - req.tile % meta.size_multiple or meta.size_multiple
        raise ConfigError(
            f"{option('tile', req.tile)} is not a multiple of {meta.size_multiple}, the input "
            f"size the model's down-sampling needs: use {option('tile', fit)}"
        )
    if req.instances:
        instance_classes(req, meta.classes)
    options = _inference_options(req, meta, region)  # its checks, before anything is written
    if local:  # on a cluster, the workers' devices count (each task checks its own)
        resolve_device(options)  # an unknown or absent device fails now, not after the set-up
    check_memory(options, bands=want, classes=len(meta.classes), region=region)
    return inp, region, model, meta, options


# live float32 values per input pixel and tile of the batch: input, softmax, and a U-Net's
# full-resolution feature maps (a 32-feature first level keeps about 2 x 32 alive in the
# decoder); a deliberately rough upper bound, only to refuse sizes that cannot fit
ACTIVATIONS_PER_PIXEL = 64


def check_memory(options: InferenceOptions, *, bands: int, classes: int, region: Window) -> int:
    """Refuse a tile and batch whose forward pass cannot fit the memory budget.

    The estimate is ``batch x side^2 x 4 bytes x (bands + 2 classes + 64)``, ``side`` the
    model input (tile + 2 halo, rounded up); the batch counts at most the region's tiles.
    Returns the estimate in bytes.
    """
    side = round_up(options.tile + 2 * options.halo, options.size_multiple)
    tiles = -(-region.height // options.tile) * -(-region.width // options.tile)
    batch = min(options.batch_size, tiles)
    need = batch * side * side * 4 * (bands + 2 * classes + ACTIVATIONS_PER_PIXEL)
    budget = memory_budget()
    if need > budget:
        raise ConfigError(
            f"tile {options.tile} with batch {options.batch_size} needs about "
            f"{format_bytes(need)} for the model's input and activations, over the memory "
            f"budget {format_bytes(budget)}: lower the tile or batch size, or raise "
            f"{ENV_MEMORY_BUDGET}"
        )
    return need


def effective_tile(tile: int, region: Window, *, halo: int, size_multiple: int) -> int:
    """``tile``, clamped to the region: a tile larger than the region computes nothing more.

    The clamp is the region's longer side rounded up to ``size_multiple`` (at least twice the
    halo, which ``crop`` needs); ``crop`` results do not depend on the tile, so they are
    unchanged.
    """
    side = max(
        round_up(max(region.height, region.width), size_multiple),
        round_up(2 * halo, size_multiple),
    )
    return min(tile, side)


def _inference_options(
    req: SegmentRequest, meta: CheckpointMeta, region: Window | None = None
) -> InferenceOptions:
    """The engine's options for ``req`` and the checkpoint (raises on bad values); the tile
    clamped to ``region`` when given (:func:`effective_tile`)."""
    m = int(meta.size_multiple)
    tile = req.tile
    if region is not None:
        tile = effective_tile(tile, region, halo=int(meta.halo), size_multiple=m)
    return InferenceOptions(
        tile=tile,
        halo=int(meta.halo),
        mode=req.mode,
        overlap=req.overlap,
        size_multiple=m,
        batch_size=req.batch_size,
        device=req.device,
        amp=req.amp,
        tta_flips=req.tta_flips,
        tta_set=(req.tta_set or tta_set_for(meta)) if req.tta_flips else "flips",
        label_nodata=255,
        output="both" if req.probabilities else "labels",
    )


def tta_set_for(meta: CheckpointMeta) -> Literal["flips", "horizontal", "rot180"]:
    """The flips test-time augmentation may use: those the model was trained with.

    A model trained with left-right flips and quarter turns has seen every flip; with flips
    only, the left-right mirror; with quarter turns only, the half turn (both axes). A
    checkpoint that does not record its augmentation (not from ``flows/train.py``) gets all
    four. One trained without either never saw a flipped image (perhaps on purpose: labels
    offset from the image by a fraction of a pixel, as in ISBI 2012, flip with the image), so
    flip TTA is refused.
    """
    config = meta.training.get("config")
    augment = config.get("augment") if isinstance(config, dict) else None
    if not isinstance(augment, dict):
        return "flips"
    flips, rot90 = bool(augment.get("flips")), bool(augment.get("rot90"))
    if flips and rot90:
        return "flips"
    if flips:
        return "horizontal"
    if rot90:
        return "rot180"
    tta = option("tta_flips", flag=FLAGS["tta_flips"])
    named = option("tta_set", "horizontal", flag=FLAGS["tta_set"])
    raise ConfigError(
        f"{tta}: this checkpoint was trained without flips or quarter turns (augment.flips and "
        f"augment.rot90 false), so flipped inputs are new to it: run without {tta}, or name the "
        f"flips your images and labels allow ({named}, rot180 or flips)"
    )


def _decimated_image(inp: _Input, region: Window, step: int) -> np.ndarray:
    """The region's image sampled every ``step`` pixels, read without holding the region."""
    if inp.store is not None:
        return RegionView(inp.store.array("image"), region)[..., ::step, ::step]
    assert inp.source is not None
    out_h, out_w = -(-region.height // step), -(-region.width // step)
    if isinstance(inp.source, RasterioSource):  # GDAL decimates (and uses overviews) itself
        return inp.source.read_decimated(region, (out_h, out_w))
    rows = []
    strip = step * max(1, 512 // step)  # whole multiples of step: the sampling stays regular
    for r0 in range(0, region.height, strip):
        w = Window(
            region.row_off + r0, region.col_off, min(strip, region.height - r0), region.width
        )
        rows.append(inp.source.read(w)[:, ::step, ::step])
    return np.concatenate(rows, axis=1)[:, :out_h, :out_w]


def segment_region(
    req: SegmentRequest,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> SegmentReport:
    """Run one segment_region job (see the module docstring).

    Every output is planned before anything is read (:func:`plan_request`), and the run
    holds the lock of ``out`` until it ends, so a second run on the same output is refused.
    """
    t0 = time.perf_counter()
    plan = plan_request(req)
    urls = {k: v for k, v in plan.items() if k in req.outputs() and isinstance(v, str)}
    with output_lock(plan["out"]), _cluster(req) as client:  # reached before anything is written
        inp, region, model, meta, options = _check_inputs(req, local=client is None)
        runner = None if client is None else _cluster_runner(req, client)
        report, store, view_region = _infer(
            req, inp, region, model, meta, options, progress, runner
        )
        georef = inp.georef[region] if inp.georef else None
        classes: tuple[ClassDef, ...] = tuple(meta.classes)
        counter = ClassCounter(classes)
        # outputs on object storage are written here and uploaded once all are complete
        with staged_outputs(urls, trees=("ome_zarr",)) as local:
            fields = {_FIELDS.get(k, k): v for k, v in local.items() if k != "stac"}
            job = ExportJob(
                req.model_copy(update=fields), store, view_region, region, georef, inp.slide,
                classes, preview=functools.partial(_decimated_image, inp, region),
            )  # fmt: skip
            written = export_outputs(job, counter)
            finals = {k: str(plan[_PLAN_NAMES.get(k, k)]) for k in written
                      if _PLAN_NAMES.get(k, k) in plan}  # fmt: skip
            finals["stac"] = str(plan["stac"])
            written["stac"] = write_prediction_item(job, written, finals,
                                                    str(local.get("stac", plan["stac"])),
                                                    class_pixels=counter.by_name())  # fmt: skip
        outputs = {k: urls.get(_PLAN_NAMES.get(k, k), v) for k, v in written.items()}
        # what this run wrote, so that the same command may replace it next time
        store.update_meta(outputs=_stamps(plan, req.outputs()))
    return SegmentReport(
        region=region,
        outputs={k: str(v) for k, v in outputs.items() if not k.endswith("_count")},
        inference=asdict(report),
        class_pixels=counter.by_name(),
        polygons=outputs.get("polygon_count"),
        instances=outputs.get("instance_count"),
        seconds=time.perf_counter() - t0,
        georef=asdict(georef) if georef else None,
        slide=asdict(inp.slide) if inp.slide else None,
    )


def _stamps(plan: dict[str, Path | str], names: Iterable[str]) -> dict[str, str]:
    """``{path or URL: stamp}`` of the outputs ``names`` that the run wrote."""
    stamps: dict[str, str] = {}
    for name in (n for n in names if n in plan):
        where = plan[name]
        got = (url_stamp(where, tree=name == "ome_zarr") if isinstance(where, str)
               else file_stamp(where))  # fmt: skip
        if got:
            stamps[str(where)] = got
    return stamps


def cluster_address(req: SegmentRequest) -> str | None:
    """The Dask scheduler ``req`` runs on: ``dask_address``, else ``$SEGFLOW_DASK_ADDRESS``
    unless ``workers`` asks for an embedded cluster."""
    if req.dask_address:
        return req.dask_address
    return None if req.workers else os.environ.get(ENV_ADDRESS) or None


def uses_cluster(req: SegmentRequest) -> bool:
    """Whether ``req`` infers on Dask workers (a scheduler, or ``workers``) or here."""
    return cluster_address(req) is not None or bool(req.workers)


@contextlib.contextmanager
def _cluster(req: SegmentRequest) -> Iterator[Any]:
    """A Dask client when ``req`` asks for a cluster (None: infer in this process)."""
    if not uses_cluster(req):
        yield None
        return
    address = cluster_address(req)
    cores = usable_cores()
    gpus = _local_gpus(req) if address is None else 0
    if gpus:  # one worker per GPU (at most --workers), the cores shared among them
        with gpu_client(gpus, threads=max(1, cores // gpus)) as client:
            yield client
        return
    threads = max(1, cores // (req.workers or 1))
    with dask_client(address, n_workers=req.workers, threads_per_worker=threads,
                     processes=True) as client:  # fmt: skip
        yield client


def _local_gpus(req: SegmentRequest) -> int:
    """The GPUs an embedded cluster for ``req`` uses (0: CPU workers)."""
    import torch

    cuda = req.device is None or str(req.device).startswith("cuda")
    if not (cuda and torch.cuda.is_available()):
        return 0
    return min(req.workers or 1, torch.cuda.device_count())


def _cluster_runner(req: SegmentRequest, client: Any) -> UnitRunner:
    from segflow.infer.cluster import cluster_runner

    # workers may run elsewhere in the file system tree: absolute paths
    return cluster_runner(client, image=_absolute(req.image), level=req.level,
                          assets=req.assets, model=_absolute(req.model),
                          device=req.device)  # fmt: skip


def _infer(
    req: SegmentRequest,
    inp: _Input,
    region: Window,
    model: Any,
    meta: CheckpointMeta,
    options: InferenceOptions,
    progress: Callable[[int, int], None] | None,
    runner: UnitRunner | None = None,
) -> tuple[InferenceReport, SceneStore, Window]:
    """Predict ``region`` into the prediction store; returns it and the region's view of it."""
    classes: tuple[ClassDef, ...] = tuple(meta.classes)
    mean, std = list(meta.normalization.mean), list(meta.normalization.std)
    if req.into_store:
        assert inp.store is not None  # plan_request checked it
        out_store = SceneStore.open(inp.store.path, mode="r+")
        pred_region, view_region = region, region
    else:
        # Tiles start at the prediction store's origin; putting that origin on the model's
        # down-sampling grid of the *image* makes a region's pixels equal to the same pixels
        # of a whole-image run (a network with pooling is only shift-equivariant by that step).
        m = int(meta.size_multiple)
        pred_region = Window.from_bounds(
            region.row_off - region.row_off % m,
            region.col_off - region.col_off % m,
            region.row_stop,
            region.col_stop,
        )
        view_region = region.relative_to(pred_region)
        chunk = min(512, options.tile) if options.tile % 512 else 512
        unit = prediction_unit(options, chunk=chunk, num_classes=len(classes))
        out_store = open_prediction_store(
            req.work_store,
            pred_region,
            chunk=chunk,
            shard=unit if unit > chunk else None,
            georef=inp.georef,
            slide=inp.slide,
            classes=classes,
            source=SourceRecord(
                uri=_absolute(req.image),
                sha256="",
                kind=inp.source.info.kind if inp.source else "store",
            ),
        )
    if runner is not None:  # the workers use options.device; this process only probes
        options = dataclasses.replace(options, device="cpu")
    report: InferenceReport = predict_region(
        inp.reader, model, region, out_store, options=options, mean=mean, std=std,
        progress=progress, runner=runner,
    )  # fmt: skip
    return report, SceneStore.open(report.store_path, mode="r+"), view_region
