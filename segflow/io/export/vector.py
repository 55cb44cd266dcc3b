"""Polygons from a chunked class-id array, vectorized window by window.

Each window is polygonized with ``rasterio.features.shapes`` (GDAL, 4-connectivity) in pixel
coordinates. A polygon that does not touch an *internal* window edge is final and is written at
once. Pieces that touch an internal edge are merged with ``shapely.union_all`` per class
(``coverage_union_all`` cannot be used: pieces of different objects may share edges). Windows
are processed a row of windows at a time; after each row, merged components that do not reach
the next row's seam are final and written, the rest are carried to the next row. The result
equals whole-raster vectorization: same polygons, same areas.

Memory bound: one window of pixels, plus the seam pieces of one row of windows, plus the
components carried across the next horizontal seam (their whole geometry, so a single object
spanning the scene is held entirely: an output polygon is as large as it is), plus one output
batch. It does not grow with the number of finished polygons.

Coordinates: with a ``georef``, outputs are in its CRS; otherwise in pixel coordinates
(x = column, y = row, y down), scaled by ``downsample`` and shifted by ``origin`` to a slide's
level-0 pixels. Areas are computed exactly in pixel space and scaled: CRS units^2 for projected
CRSs, m^2 on the ellipsoid (``pyproj.Geod``) for geographic ones, um^2 for slides with a pixel
size, level-0 px^2 otherwise; the unit is in :attr:`VectorizeResult.area_unit` and in the files'
metadata.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from segflow.config import ClassDef
from segflow.errors import ConfigError
from segflow.geometry import Window
from segflow.io.export._common import (
    ClassTable,
    IdChecker,
    atomic_output,
    iter_windows,
    read_window,
)
from segflow.io.export._inputs import ClassRaster, check_class_raster
from segflow.io.export._sinks import (
    CLASS_COLUMNS,
    GPKG_VERSION,
    INSTANCE_COLUMNS,
    LAYER,
    GpkgSink,
    ParquetSink,
    QuPathSink,
)
from segflow.io.store import GeoRef, SlideInfo

__all__ = ["GPKG_VERSION", "LAYER", "VectorizeResult", "vectorize"]

log = logging.getLogger(__name__)

_VECTOR_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32")


@dataclass
class VectorizeResult:
    """What :func:`vectorize` wrote: counts, areas and paths (never the polygons)."""

    n_features: int = 0
    count_by_class: dict[int, int] = field(default_factory=dict)
    area_by_class: dict[int, float] = field(default_factory=dict)
    area_unit: str = "px^2"
    crs_wkt: str | None = None
    outputs: dict[str, Path] = field(default_factory=dict)
    windows: int = 0
    max_pending_pieces: int = 0
    """Largest number of seam pieces held at once (the memory bound, measured)."""

    @property
    def total_area(self) -> float:
        return float(sum(self.area_by_class.values()))


# ------------------------------------------------------------------------ geometry
class _Frame:
    """Pixel -> output coordinates and pixel area -> output area."""

    def __init__(
        self,
        georef: GeoRef | None,
        slide: SlideInfo | None,
        origin: tuple[float, float],
        downsample: float,
    ) -> None:
        self.georef = georef
        self.origin = origin  # used by the pixel-coordinate outputs
        self.downsample = downsample
        self.geod: Any = None
        self.crs: Any = None
        if georef is not None:
            from pyproj import CRS

            self.crs = CRS.from_epsg(georef.epsg) if georef.epsg else CRS.from_wkt(georef.crs_wkt)
            a = georef.affine()
            self.coef = (a.a, a.b, a.c, a.d, a.e, a.f)
            det = abs(a.a * a.e - a.b * a.d)
            if self.crs.is_geographic:
                self.geod = self.crs.get_geod()
                self.area_scale = 1.0
                self.area_unit = "m^2"
            else:
                self.area_scale = det
                unit = self.crs.axis_info[0].unit_name if self.crs.axis_info else "unit"
                self.area_unit = {"metre": "m^2", "meter": "m^2"}.get(unit, f"{unit}^2")
        else:
            d = float(downsample)
            row0, col0 = origin
            self.coef = (d, 0.0, float(col0), 0.0, d, float(row0))
            if slide is not None and slide.mpp_x and slide.mpp_y:
                self.area_scale = d * d * float(slide.mpp_x) * float(slide.mpp_y)
                self.area_unit = "um^2"
            else:
                self.area_scale = d * d
                self.area_unit = "px^2"

    def to_output(self, geoms: np.ndarray) -> np.ndarray:
        a, b, c, d, e, f = self.coef

        def fn(xy: np.ndarray) -> np.ndarray:
            x, y = xy[:, 0], xy[:, 1]
            return np.column_stack((a * x + b * y + c, d * x + e * y + f))

        return shapely.transform(geoms, fn)

    def areas(self, pixel_geoms: np.ndarray, out_geoms: np.ndarray) -> np.ndarray:
        if self.geod is not None:
            return np.array(
                [abs(self.geod.geometry_area_perimeter(g)[0]) for g in out_geoms], dtype="float64"
            )
        return shapely.area(pixel_geoms) * self.area_scale


# ------------------------------------------------------------------------- emitter
class _Emitter:
    """Buffers final pixel-space polygons and flushes them to every sink in batches."""

    def __init__(
        self,
        table: ClassTable,
        frame: _Frame,
        min_area: float,
        batch: int,
        sinks: list[Any],
        qupath: QuPathSink | None,
        result: VectorizeResult,
        instance_class: np.ndarray | None = None,
    ) -> None:
        self.table = table
        self.frame = frame
        self.min_area = float(min_area)
        self.batch = batch
        self.sinks = sinks
        self.qupath = qupath
        self.result = result
        self.instance_class = instance_class
        self.geoms: list[Any] = []
        self.values: list[int] = []

    def add(self, geom: Any, value: int) -> None:
        """Queue a final polygon of ``value``: a class id, or an instance id."""
        self.geoms.append(geom)
        self.values.append(value)
        if len(self.geoms) >= self.batch:
            self.flush()

    def add_many(self, geoms: np.ndarray, values: np.ndarray) -> None:
        """Queue final polygons in order (:meth:`add` for each, without its per-call cost)."""
        self.geoms.extend(geoms.tolist())
        self.values.extend(values.tolist())
        if len(self.geoms) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.geoms:
            return
        pix = np.array(self.geoms, dtype=object)
        values = np.array(self.values, dtype="int64")
        self.geoms, self.values = [], []
        out = self.frame.to_output(pix)
        areas = self.frame.areas(pix, out)
        keep = areas >= self.min_area
        if not keep.all():
            pix, values, out, areas = pix[keep], values[keep], out[keep], areas[keep]
        if not len(values):
            return
        columns = self._columns(values, out, areas)
        for sink in self.sinks:
            sink.write(out, columns)
        if self.qupath is not None:
            self.qupath.write_pixels(pix, columns)
        self._count(columns["class_id"], areas)

    def _columns(self, values: np.ndarray, out: np.ndarray, areas: np.ndarray) -> dict[str, Any]:
        """The attributes of polygons of ``values`` (class ids, or instance ids)."""
        ids = values if self.instance_class is None else self.instance_class[values]
        columns: dict[str, Any] = {
            "class_id": ids,
            "class_name": [self.table.name(int(i)) for i in ids],
            "area": areas,
        }
        if self.instance_class is not None:
            centroids = shapely.centroid(out)
            columns["instance_id"] = values
            columns["centroid_x"] = shapely.get_x(centroids)
            columns["centroid_y"] = shapely.get_y(centroids)
        return columns

    def _count(self, ids: np.ndarray, areas: np.ndarray) -> None:
        r = self.result
        r.n_features += len(ids)
        for cid in np.unique(ids):
            sel = ids == cid
            r.count_by_class[int(cid)] = r.count_by_class.get(int(cid), 0) + int(sel.sum())
            r.area_by_class[int(cid)] = r.area_by_class.get(int(cid), 0.0) + float(areas[sel].sum())


def _shapes(data: np.ndarray, mask: np.ndarray, win: Window) -> tuple[np.ndarray, np.ndarray]:
    """The polygons of ``data`` where ``mask`` (GDAL's, 4-connected) in raster pixels, and
    their values, in GDAL's order."""
    from affine import Affine
    from rasterio.features import shapes

    if data.dtype == np.uint32:
        data = data.astype("int32") if int(data.max()) <= np.iinfo("int32").max else data
    transform = Affine.translation(win.col_off, win.row_off)
    # GDAL yields GeoJSON-like polygons: their rings are gathered into one coordinate array
    # and built in one shapely call (per-polygon construction took 3x as long: 109,607
    # polygons of a speckled mask, 1.5 s of a 3.9 s vectorize)
    coords: list[Any] = []
    ring_ends: list[int] = []
    polygon_ends: list[int] = []
    values: list[int] = []
    for geom, value in shapes(data, mask=mask, connectivity=4, transform=transform):
        for ring in geom["coordinates"]:
            coords.extend(ring)
            ring_ends.append(len(coords))
        polygon_ends.append(len(ring_ends))
        values.append(int(value))
    if not values:
        return np.empty(0, dtype=object), np.empty(0, dtype=np.int64)
    offsets = (np.array([0, *ring_ends], np.int64), np.array([0, *polygon_ends], np.int64))
    xy = np.asarray(coords, dtype="float64")
    polygons = shapely.from_ragged_array(shapely.GeometryType.POLYGON, xy, offsets)
    return polygons, np.asarray(values, dtype=np.int64)


def _clean(geom: Any) -> Any:
    """Drop collinear vertices left by unions (exact: pixel coordinates are integers)."""
    return shapely.simplify(geom, 0.0, preserve_topology=True)


def vectorize(  # noqa: PLR0913 (public writer: its keyword options are its interface)
    labels: Any,
    *,
    classes: Iterable[ClassDef | Mapping[str, Any]],
    georef: GeoRef | None = None,
    slide: SlideInfo | None = None,
    nodata: int | None = 255,
    window: int = 1024,
    skip_classes: Iterable[int] = (0,),
    min_area: float = 0.0,
    out_gpkg: str | Path | None = None,
    out_parquet: str | Path | None = None,
    out_geojson_pixels: str | Path | None = None,
    origin: tuple[float, float] = (0.0, 0.0),
    downsample: float | None = None,
    batch_size: int = 5000,
    check_classes: bool = True,
    instances: Any = None,
    instance_classes: np.ndarray | None = None,
) -> VectorizeResult:
    """Polygonize a class-id array window by window into GeoPackage / GeoParquet / GeoJSON.

    Parameters
    ----------
    labels
        ``(y, x)`` class ids (uint8/uint16/int16/int32/uint32), any array-like with slicing.
    classes
        The class table; ``class_name`` comes from it.
    georef
        Georeference of ``labels``' grid: polygons in its CRS. ``None``: pixel coordinates.
    slide
        Slide metadata for pixel-coordinate outputs: ``mpp_x``/``mpp_y`` (level 0) give areas
        in um^2, and its ``downsample`` is the default of ``downsample``.
    nodata
        Value that is never vectorized (outside the prediction).
    window
        Side of the windows read and polygonized (memory: one window of pixels).
    skip_classes, min_area
        Class ids not vectorized (default: background), and the least ``area`` kept.
    out_gpkg, out_parquet
        GeoPackage (layer ``"predictions"``) and GeoParquet outputs, with attributes
        ``class_id``, ``class_name``, ``area``, in the coordinates described above.
    out_geojson_pixels
        GeoJSON in level-0 *pixel* coordinates with QuPath classification names and colours.
    origin, downsample
        For pixel-coordinate outputs: the ``(row, col)`` level-0 offset of the labels' top-left
        (a region of a slide), and level-0 pixels per labels pixel (default: the slide's, or 1).
    batch_size
        Polygons written per batch.
    check_classes
        Fail with :class:`~segflow.errors.LabelError` on ids outside the table and nodata.
    instances, instance_classes
        Instance ids of ``labels``' objects (:func:`segflow.instances.label_instances`) and
        the class of each id: one polygon per instance (read instead of ``labels``), with
        ``instance_id``, ``centroid_x`` and ``centroid_y`` too; QuPath detections.

    Returns
    -------
    VectorizeResult
        Counts and areas per class, the area unit and the written paths.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((6, 6), "uint8"); lab[1:5, 1:5] = 1
    >>> r = vectorize(lab, classes=[{"id": 0, "name": "bg"}, {"id": 1, "name": "fg"}], window=3)
    >>> r.n_features, r.total_area, r.area_unit
    (1, 16.0, 'px^2')
    """
    raster = check_class_raster(labels, classes, nodata, allowed=_VECTOR_DTYPES)
    _check_vector_options(window, min_area, batch_size)
    frame = _Frame(georef, slide, origin, _level0_downsample(downsample, slide))
    job = _VectorJob(raster, frame, frozenset(int(c) for c in skip_classes), window, min_area,
                     batch_size, raster.checker(check_classes),
                     _instance_classes(instances, instance_classes, raster))  # fmt: skip
    paths = _OutPaths(out_gpkg, out_parquet, out_geojson_pixels)
    result = _vectorize(labels if instances is None else instances, job, paths)
    _log_summary(result, raster.table)
    return result


# ---------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class _VectorJob:
    """The checked settings of one :func:`vectorize` call."""

    raster: ClassRaster
    frame: _Frame
    skip: frozenset[int]
    window: int
    min_area: float
    batch_size: int
    checker: IdChecker | None
    instance_class: np.ndarray | None = None
    """Set when the polygons are instances: the class id of each instance id."""

    def vectorized(self) -> np.ndarray:
        """The class ids that are polygonized: the table's, less ``skip``."""
        return np.array(sorted(set(self.raster.table.ids) - self.skip), dtype="int64")

    def mask(self, data: np.ndarray, win: Window) -> np.ndarray:
        """The pixels of ``data`` (a window of class ids, or of instance ids) to polygonize."""
        if self.instance_class is not None:
            return data > 0
        if self.checker is not None:
            self.checker(data, win)
        return np.isin(data, self.vectorized())

    def columns(self) -> tuple[tuple[str, str], ...]:
        """The attribute columns of the polygons."""
        return CLASS_COLUMNS + (INSTANCE_COLUMNS if self.instance_class is not None else ())


def _instance_classes(instances: Any, classes: np.ndarray | None, raster: ClassRaster
                      ) -> np.ndarray | None:  # fmt: skip
    """The class of each instance id, checked against ``instances`` and the class table."""
    if instances is None:
        return None
    if classes is None:
        raise ConfigError("instances need instance_classes: the class id of each instance id")
    if tuple(instances.shape) != tuple(raster.shape):
        raise ConfigError(
            f"instances of shape {tuple(instances.shape)} do not match the labels' {raster.shape}"
        )
    unknown = set(np.unique(classes[1:]).tolist()) - set(raster.table.ids)
    if unknown:
        raise ConfigError(f"instance classes {sorted(unknown)} are not in the class table")
    return np.asarray(classes, dtype="int64")


@dataclass(frozen=True)
class _OutPaths:
    """The requested outputs (``None``: not written)."""

    gpkg: str | Path | None
    parquet: str | Path | None
    geojson_pixels: str | Path | None


def _check_vector_options(window: int, min_area: float, batch_size: int) -> None:
    """Window side, minimum area and batch size must be usable."""
    if window < 2:
        raise ConfigError(f"window must be >= 2 pixels, got {window}: use e.g. 1024")
    if min_area < 0:
        raise ConfigError(f"min_area must be >= 0, got {min_area}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")


def _level0_downsample(downsample: float | None, slide: SlideInfo | None) -> float:
    """Level-0 pixels per labels pixel: as given, else the slide's, else 1."""
    if downsample is None:
        downsample = float(slide.downsample) if slide is not None else 1.0
    if downsample <= 0:
        raise ConfigError(f"downsample must be > 0, got {downsample}")
    return downsample


def _metadata(job: _VectorJob) -> dict[str, str]:
    """The ``segflow`` metadata item of the GeoPackage and GeoParquet outputs."""
    return {
        "segflow": json.dumps(
            {
                "kind": "predictions" if job.instance_class is None else "instances",
                "area_unit": job.frame.area_unit,
                "coordinates": "crs" if job.frame.georef is not None else "pixels",
                "classes": [c.model_dump() for c in job.raster.table.classes],
                "nodata": job.raster.nodata,
                "skip_classes": sorted(job.skip),
            }
        )
    }


def _open_sinks(
    stack: contextlib.ExitStack, paths: _OutPaths, job: _VectorJob, result: VectorizeResult
) -> tuple[list[Any], QuPathSink | None]:
    """The requested outputs, opened under temporary names moved into place by ``stack``."""
    frame, meta, columns = job.frame, _metadata(job), job.columns()
    sinks: list[Any] = []
    qupath: QuPathSink | None = None
    if paths.gpkg is not None:
        tmp = stack.enter_context(atomic_output(paths.gpkg))
        sinks.append(GpkgSink(tmp, frame.crs.to_wkt() if frame.crs else None, meta, columns))
        result.outputs["gpkg"] = Path(paths.gpkg)
    if paths.parquet is not None:
        tmp = stack.enter_context(atomic_output(paths.parquet))
        psink = ParquetSink(tmp, frame.crs, meta, columns)
        stack.callback(_close_quietly, psink.writer)
        sinks.append(psink)
        result.outputs["parquet"] = Path(paths.parquet)
    if paths.geojson_pixels is not None:
        tmp = stack.enter_context(atomic_output(paths.geojson_pixels))
        qupath = QuPathSink(tmp, job.raster.table, frame.origin, frame.downsample)
        stack.callback(qupath.abort)
        result.outputs["geojson_pixels"] = Path(paths.geojson_pixels)
    return sinks, qupath


def _vectorize(labels: Any, job: _VectorJob, paths: _OutPaths) -> VectorizeResult:
    """Polygonize ``labels`` into the outputs at ``paths``; what was written."""
    frame = job.frame
    result = VectorizeResult(
        area_unit=frame.area_unit,
        crs_wkt=frame.georef.crs_wkt if frame.georef is not None else None,
    )
    with contextlib.ExitStack() as stack:
        sinks, qupath = _open_sinks(stack, paths, job, result)
        table = job.raster.table
        emit = _Emitter(table, frame, job.min_area, job.batch_size, sinks, qupath, result,
                        job.instance_class)  # fmt: skip
        _polygonize(labels, job, emit)
        emit.flush()
        for sink in sinks:
            sink.close()
        if qupath is not None:
            qupath.close()
    return result


def _polygonize(labels: Any, job: _VectorJob, emit: _Emitter) -> None:
    """Polygonize ``labels`` (class or instance ids) window by window, a row of windows at a
    time, into ``emit``."""
    height, width = job.raster.shape
    result = emit.result
    pending: dict[int, list[Any]] = defaultdict(list)  # carried across the row seam
    row_pieces: dict[int, list[Any]] = defaultdict(list)
    row_stop = 0
    for win in iter_windows(height, width, job.window):
        if win.row_stop != row_stop:
            if row_stop:
                _close_row(row_pieces, pending, row_stop, height, emit)
            row_stop = win.row_stop
        result.windows += 1
        data = read_window(labels, win)
        mask = job.mask(data, win)
        if not mask.any():
            continue
        seams = _internal_edges(win, height, width)
        _route(_shapes(data, mask, win), seams, row_pieces, emit)
        held = sum(map(len, row_pieces.values())) + sum(map(len, pending.values()))
        result.max_pending_pieces = max(result.max_pending_pieces, held)
    _close_row(row_pieces, pending, height, height, emit)


def _internal_edges(win: Window, height: int, width: int) -> tuple[int | None, ...]:
    """``(left, right, top, bottom)`` edges of ``win`` inside the raster (``None``: its edge)."""
    return (
        win.col_off if win.col_off > 0 else None,
        win.col_stop if win.col_stop < width else None,
        win.row_off if win.row_off > 0 else None,
        win.row_stop if win.row_stop < height else None,
    )


#: The column of ``shapely.bounds`` (x0, y0, x1, y1) each of ``_internal_edges``' edges (left,
#: right, top, bottom) is compared with.
_EDGE_BOUND = (0, 2, 1, 3)


def _route(
    polygons: tuple[np.ndarray, np.ndarray],
    internal: tuple[int | None, ...],
    row_pieces: dict[int, list[Any]],
    emit: _Emitter,
) -> None:
    """Emit the polygons that touch no ``internal`` edge; keep the others as seam pieces."""
    geoms, values = polygons
    if not len(geoms):
        return
    bounds = shapely.bounds(geoms)
    seam = np.zeros(len(geoms), dtype=bool)
    for edge, column in zip(internal, _EDGE_BOUND, strict=True):
        if edge is not None:
            seam |= bounds[:, column] == edge
    emit.add_many(geoms[~seam], values[~seam])
    for geom, value in zip(geoms[seam].tolist(), values[seam].tolist(), strict=True):
        row_pieces[value].append(geom)


def _log_summary(result: VectorizeResult, table: ClassTable) -> None:
    log.info(
        "vectorized %d polygons in %d windows (%s)",
        result.n_features,
        result.windows,
        ", ".join(f"{table.name(k)}: {v}" for k, v in sorted(result.count_by_class.items())),
    )


def _close_quietly(writer: Any) -> None:
    with contextlib.suppress(Exception):
        if getattr(writer, "is_open", True):
            writer.close()


def _close_row(
    row_pieces: dict[int, list[Any]],
    pending: dict[int, list[Any]],
    row_stop: int,
    height: int,
    emit: _Emitter,
) -> None:
    """Merge this row's seam pieces with the carried ones; emit what cannot grow any more.

    A merged component that does not reach the row's bottom seam (``row_stop``) cannot meet
    any later piece, and every earlier piece it could meet is already merged into it.
    """
    classes = set(row_pieces) | set(pending)
    carried: dict[int, list[Any]] = defaultdict(list)
    for cid in sorted(classes):
        pieces = pending.get(cid, []) + row_pieces.get(cid, [])
        if not pieces:
            continue
        merged = shapely.get_parts(shapely.union_all(np.array(pieces, dtype=object)))
        for part in merged:
            part = _clean(part)
            if row_stop < height and part.bounds[3] == row_stop:
                carried[cid].append(part)
            else:
                emit.add(part, cid)
    row_pieces.clear()
    pending.clear()
    pending.update(carried)
