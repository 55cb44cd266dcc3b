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

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from segflow.config import ClassDef
from segflow.errors import CheckpointError, ConfigError
from segflow.geometry import Window
from segflow.infer.engine import (
    InferenceOptions,
    InferenceReport,
    StoreReader,
    open_prediction_store,
    predict_region,
    prediction_unit,
)
from segflow.io.sources import Source, open_source
from segflow.io.store import GeoRef, SceneStore, SlideInfo, SourceRecord
from segflow.region import resolve_region

if TYPE_CHECKING:
    from segflow.train.checkpoint import CheckpointMeta

__all__ = ["SegmentReport", "SegmentRequest", "SourceReader", "check_request", "segment_region"]

log = logging.getLogger(__name__)

LABELS = "prediction/labels"
PROBABILITIES = "prediction/probabilities"


@dataclass(frozen=True, kw_only=True)
class SegmentRequest:
    """One segment_region job: image, model, region, options and outputs."""

    image: str
    model: str
    out: str
    bbox: tuple[float, float, float, float] | None = None
    bbox_crs: str | None = None
    window: tuple[int, int, int, int] | None = None
    level: int = 0
    tile: int = 512
    mode: Literal["crop", "gaussian"] = "crop"
    overlap: float = 0.5
    batch_size: int = 8
    tta_flips: bool = False
    # with tta_flips, the flips to average over; None: those the model was trained with
    tta_set: Literal["flips", "horizontal", "rot180"] | None = None
    device: str | None = None
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    polygons: str | None = None
    parquet: str | None = None
    probabilities: str | None = None
    quicklook: str | None = None
    ome_tiff: str | None = None
    qupath_geojson: str | None = None
    work: str | None = None
    min_area: float = 0.0

    @property
    def work_store(self) -> Path:
        """Where the prediction store of a raster input lives (``OUT.predictions.zarr``)."""
        if self.work:
            return Path(self.work)
        out = Path(self.out)
        return out.with_name(out.stem + ".predictions.zarr")

    def outputs(self) -> list[Path]:
        names = (
            self.out,
            self.polygons,
            self.parquet,
            self.probabilities,
            self.quicklook,
            self.ome_tiff,
            self.qupath_geojson,
        )
        return [Path(p) for p in names if p]


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["region"] = asdict(self.region)
        return d


class SourceReader:
    """A :class:`~segflow.infer.engine.WindowReader` over a :class:`~segflow.io.sources.Source`."""

    def __init__(self, source: Source) -> None:
        self.source = source

    @property
    def height(self) -> int:
        return self.source.info.height

    @property
    def width(self) -> int:
        return self.source.info.width

    @property
    def bands(self) -> int:
        return len(self.source.info.bands)

    def read_with_valid(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        return self.source.read_with_valid(window)


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


def _open_input(path: str, level: int) -> _Input:
    p = Path(path)
    if (p / "zarr.json").is_file():
        store = SceneStore.open(p)
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
    src = open_source(p, level=level)
    i = src.info
    return _Input(SourceReader(src), None, src, i.height, i.width, i.bands, i.georef, i.slide)


def _load_model(path: str) -> tuple[Any, Any]:
    from segflow.train.checkpoint import load_checkpoint

    return load_checkpoint(path)


def check_request(req: SegmentRequest) -> tuple[_Input, Window, Any, Any]:
    """Validate everything before any output is written; returns what the run needs."""
    for out in req.outputs():
        if not out.parent.is_dir():
            raise ConfigError(
                f"output directory does not exist: {str(out.parent)!r} (for {str(out)!r}): "
                "create it or choose another path"
            )
    if not Path(req.model).exists():
        raise CheckpointError(
            f"checkpoint not found: {req.model!r}: pass the directory flows/train.py wrote"
        )
    model, meta = _load_model(req.model)
    inp = _open_input(req.image, req.level)
    want = len(meta.bands)
    if want != len(inp.bands):
        raise ConfigError(
            f"the model expects {want} band(s) {list(meta.bands)} but {req.image!r} has "
            f"{len(inp.bands)} {list(inp.bands)}: use an image with the bands the model was trained on"
        )
    region = resolve_region(
        height=inp.height,
        width=inp.width,
        georef=inp.georef,
        slide=inp.slide,
        bbox=req.bbox,
        bbox_crs=req.bbox_crs,
        window=req.window,
    )
    _inference_options(req, meta)  # its checks, before anything is written
    if req.tile % int(meta.size_multiple):
        raise ConfigError(
            f"--tile {req.tile} is not a multiple of {meta.size_multiple}, the input size the "
            f"model's down-sampling needs: use --tile {req.tile - req.tile % meta.size_multiple or meta.size_multiple}"
        )
    return inp, region, model, meta


def _inference_options(req: SegmentRequest, meta: CheckpointMeta) -> InferenceOptions:
    """The engine's options for ``req`` and the checkpoint (raises on bad values)."""
    return InferenceOptions(
        tile=req.tile,
        halo=int(meta.halo),
        mode=req.mode,
        overlap=req.overlap,
        size_multiple=int(meta.size_multiple),
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
    raise ConfigError(
        "--tta: this checkpoint was trained without flips or quarter turns (augment.flips and "
        "augment.rot90 false), so flipped inputs are new to it: run without --tta, or name the "
        "flips your images and labels allow (--tta horizontal, rot180 or flips)"
    )


class _RegionView:
    """An array-like over ``region`` of a (..., y, x) array (exporters slice it window by window)."""

    def __init__(self, array: Any, region: Window) -> None:
        self.array = array
        self.region = region
        self.shape = (*array.shape[:-2], region.height, region.width)
        self.dtype = array.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        *lead, rs, cs = key
        r = slice(*rs.indices(self.region.height))
        c = slice(*cs.indices(self.region.width))
        r = slice(r.start + self.region.row_off, r.stop + self.region.row_off, r.step)
        c = slice(c.start + self.region.col_off, c.stop + self.region.col_off, c.step)
        return np.asarray(self.array[(*lead, r, c)])


def _decimated_image(inp: _Input, region: Window, step: int) -> np.ndarray:
    """The region's image sampled every ``step`` pixels, read without holding the region."""
    if inp.store is not None:
        return _RegionView(inp.store.array("image"), region)[..., ::step, ::step]
    assert inp.source is not None
    out_h, out_w = -(-region.height // step), -(-region.width // step)
    if inp.source.info.kind == "geotiff":  # GDAL decimates (and uses overviews) itself
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.windows import Window as RWindow

        with rasterio.open(inp.source.info.uri) as ds:
            return np.asarray(
                ds.read(
                    window=RWindow(region.col_off, region.row_off, region.width, region.height),
                    out_shape=(ds.count, out_h, out_w),
                    resampling=Resampling.nearest,
                )
            )
    rows = []
    strip = step * max(1, 512 // step)  # whole multiples of step: the sampling stays regular
    for r0 in range(0, region.height, strip):
        w = Window(
            region.row_off + r0, region.col_off, min(strip, region.height - r0), region.width
        )
        rows.append(inp.source.read(w)[:, ::step, ::step])
    return np.concatenate(rows, axis=1)[:, :out_h, :out_w]


class _ClassCounter:
    """Pixels per class id, from the windows the COG export streams (no second read)."""

    def __init__(self, classes: Sequence[ClassDef]) -> None:
        from segflow.io.export import count_values  # the export stack loads on first use

        self.classes = tuple(classes)
        self.ids = [c.id for c in self.classes]
        self.counts = dict.fromkeys(self.ids, 0)
        self._count = count_values

    def __call__(self, block: np.ndarray, window: Window) -> None:
        for cid, n in zip(self.ids, self._count(block, self.ids), strict=True):
            self.counts[cid] += n

    def by_name(self) -> dict[str, int]:
        return {c.name: self.counts[c.id] for c in self.classes}


def segment_region(
    req: SegmentRequest,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> SegmentReport:
    """Run one segment_region job (see the module docstring)."""
    t0 = time.perf_counter()
    inp, region, model, meta = check_request(req)
    classes: tuple[ClassDef, ...] = tuple(meta.classes)
    options = _inference_options(req, meta)
    mean, std = list(meta.normalization.mean), list(meta.normalization.std)
    if inp.store is not None:
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
        chunk = min(512, req.tile) if req.tile % 512 else 512
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
                uri=str(Path(req.image).resolve()),
                sha256="",
                kind=inp.source.info.kind if inp.source else "store",
            ),
        )
    report: InferenceReport = predict_region(
        inp.reader, model, region, out_store, options=options, mean=mean, std=std, progress=progress
    )
    store = SceneStore.open(report.store_path)
    labels = _RegionView(store.array(LABELS), view_region)
    georef = (
        GeoRef(inp.georef.crs_wkt, inp.georef.epsg, inp.georef.window_geotransform(region))
        if inp.georef
        else None
    )
    counter = _ClassCounter(classes)
    outputs = _export(req, inp, store, labels, view_region, region, georef, classes, counter)
    return SegmentReport(
        region=region,
        outputs={k: str(v) for k, v in outputs.items() if k != "polygon_count"},
        inference=asdict(report),
        class_pixels=counter.by_name(),
        polygons=outputs.get("polygon_count"),
        seconds=time.perf_counter() - t0,
        georef=asdict(georef) if georef else None,
    )


def _export(
    req: SegmentRequest,
    inp: _Input,
    store: SceneStore,
    labels: _RegionView,
    view_region: Window,
    region: Window,
    georef: GeoRef | None,
    classes: tuple[ClassDef, ...],
    counter: _ClassCounter,
) -> dict[str, Any]:
    from segflow.io.export import (
        quicklook_png,
        vectorize,
        write_cog,
        write_ome_tiff_labels,
        write_probability_cog,
    )

    done: dict[str, Any] = {
        # the exports run after inference, alone: let GDAL compress on every core
        "cog": write_cog(
            labels,
            req.out,
            georef=georef,
            classes=classes,
            nodata=255,
            threads="ALL_CPUS",
            observe=counter,
        )
    }
    if req.probabilities:
        probs = _RegionView(store.array(PROBABILITIES), view_region)
        done["probabilities"] = write_probability_cog(
            probs, req.probabilities, georef=georef, classes=classes, threads="ALL_CPUS"
        )
    if req.polygons or req.parquet or req.qupath_geojson:
        slide = inp.slide
        res = vectorize(
            labels,
            classes=classes,
            georef=georef,
            slide=slide,
            nodata=255,
            min_area=req.min_area,
            out_gpkg=req.polygons,
            out_parquet=req.parquet,
            out_geojson_pixels=req.qupath_geojson,
            origin=(float(region.row_off), float(region.col_off)),  # (row, col), like everything
            downsample=slide.downsample if slide else None,
        )
        done["polygon_count"] = int(getattr(res, "polygons", 0) or 0)
        for key, p in (
            ("polygons", req.polygons),
            ("parquet", req.parquet),
            ("qupath_geojson", req.qupath_geojson),
        ):
            if p:
                done[key] = p
    if req.ome_tiff:
        slide = inp.slide
        done["ome_tiff"] = write_ome_tiff_labels(
            labels,
            req.ome_tiff,
            mpp_x=slide.mpp_x if slide else None,
            mpp_y=slide.mpp_y if slide else None,
            classes=classes,
            nodata=255,
        )
    if req.quicklook:
        step = max(1, -(-max(region.height, region.width) // 1024))
        image = _decimated_image(inp, region, step)
        small = labels[::step, ::step]
        done["quicklook"] = quicklook_png(
            image, small, req.quicklook, classes=classes, nodata=255, max_size=1024
        )
    if store.path != Path(req.out) and inp.store is None:
        log.info("prediction store kept at %s (delete it to recompute)", store.path)
    return done
