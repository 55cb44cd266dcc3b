"""The two sides of an evaluation, opened as window readers on one pixel grid.

The grid is the prediction's (a class COG or a prediction store); with polygons as the
prediction, the reference raster's. A reference raster must lie on that grid: the same CRS
and pixel size and a whole-pixel offset (it may cover more, or less: pixels it does not
cover are not counted), or, without georeference, the same size. Polygons are rasterized
window by window (``rasterio.features.rasterize``, pixel centres), each feature one object.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segflow.config import ClassDef
from segflow.config.evaluate import EvaluateOptions
from segflow.errors import ConfigError, SourceError
from segflow.geometry import Window
from segflow.georef import GeoRef
from segflow.instances import object_classes

__all__ = [
    "Grid",
    "Side",
    "check_options",
    "is_vector",
    "object_side",
    "one_class",
    "open_prediction",
    "open_raster",
    "open_reference",
    "raster_grid",
    "rasterizer",
    "read_vector",
]

_VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg", ".parquet", ".geoparquet", ".shp", ".fgb")
_NOT_COUNTED = 255


@dataclass(frozen=True)
class Grid:
    """The evaluation's pixel grid."""

    height: int
    width: int
    georef: GeoRef | None


@dataclass(frozen=True)
class Side:
    """One side, read by windows of the grid: class ids (255: not counted) and, for object
    layers, object ids and their classes (``ids`` None: objects are labelled from classes)."""

    classes: Callable[[Window], np.ndarray]
    ids: Callable[[Window], np.ndarray] | None = None
    class_of: Callable[[np.ndarray], np.ndarray] | None = None


def object_side(
    ids: Callable[[Window], np.ndarray], class_of: Callable[[np.ndarray], np.ndarray]
) -> Side:
    """A side whose objects are given: ``ids`` by window, ``class_of`` their classes (the
    class map follows from both)."""
    return Side(classes=lambda w: class_of(ids(w)).astype("uint8"), ids=ids, class_of=class_of)


def one_class(cls: int) -> Callable[[np.ndarray], np.ndarray]:
    """``class_of`` of objects that all have class ``cls`` (id 0: none)."""
    return lambda i: np.where(i > 0, cls, 0)


def is_vector(path: str) -> bool:
    return Path(path).suffix.lower() in _VECTOR_SUFFIXES


# ------------------------------------------------------------------------- prediction
def open_prediction(path: str) -> tuple[Grid, tuple[ClassDef, ...], Side]:
    """A prediction raster or store: its grid, class table and class reader."""
    from segflow.io import locations, remote
    from segflow.io.store import SceneStore, store_exists

    if remote.is_url(path):
        remote.check_location(path, what="prediction")
        remote.configure_gdal()  # GDAL reads the COG window by window
    if not locations.exists(path):
        raise SourceError(f"prediction not found: {path!r}: pass segment_region's OUT or store")
    if store_exists(path):
        store = SceneStore.open(path)
        labels = store.array("prediction/labels")
        grid = Grid(store.height, store.width, store.georef)
        return grid, tuple(store.classes), Side(classes=lambda w: np.asarray(labels[w.slices]))
    ds = open_raster(path, "prediction")
    classes = _class_table(ds, path)
    whole = Window(0, 0, ds.height, ds.width)
    if ds.tags().get("SEGFLOW_KIND") != "instances":
        return raster_grid(ds), classes, Side(classes=_band_reader(ds, whole))
    return raster_grid(ds), *_instance_side(ds, path, classes, whole)


def _instance_side(
    ds: Any, path: str, classes: tuple[ClassDef, ...], whole: Window
) -> tuple[tuple[ClassDef, ...], Side]:
    """segment_region's instance COG: its ids are the objects (all of its one class)."""
    if len(classes) != 1:
        raise ConfigError(
            f"{path!r} holds instances of {len(classes)} classes, and the class of each id is in "
            "the polygons: evaluate the GeoPackage or the class COG instead"
        )
    cls = classes[0].id
    table = (ClassDef(id=0, name="background"), classes[0]) if cls else classes
    return table, object_side(_band_reader(ds, whole, fill=0), one_class(cls))


def open_raster(path: str, what: str) -> Any:
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        return rasterio.open(path)
    except RasterioIOError as err:
        raise SourceError(f"cannot read the {what} {path!r}: {err}") from err


def raster_grid(ds: Any) -> Grid:
    georef = None
    if ds.crs is not None:
        from rasterio.enums import WktVersion

        georef = GeoRef(crs_wkt=ds.crs.to_wkt(version=WktVersion.WKT2_2019),
                        epsg=ds.crs.to_epsg(),
                        geotransform=tuple(float(v) for v in ds.transform.to_gdal()))  # type: ignore[arg-type]  # fmt: skip
    return Grid(int(ds.height), int(ds.width), georef)


def _class_table(ds: Any, path: str) -> tuple[ClassDef, ...]:
    """The class table a segflow COG carries in its tags."""
    text = ds.tags().get("SEGFLOW_CLASSES")
    if not text:
        raise ConfigError(
            f"{path!r} has no class table (SEGFLOW_CLASSES tag): pass a class COG written by "
            "segment_region, or its prediction store"
        )
    return tuple(ClassDef.model_validate(c) for c in json.loads(text))


def _band_reader(
    ds: Any, placed: Window, fill: int = _NOT_COUNTED
) -> Callable[[Window], np.ndarray]:
    """Windows of band 1 of ``ds``, whose pixel (0, 0) lies at ``placed``'s offset of the grid;
    pixels outside ``ds`` are ``fill``."""
    from rasterio.windows import Window as RWindow

    def read(win: Window) -> np.ndarray:
        out = np.full(win.shape, fill, dtype=ds.dtypes[0])
        inside = win.intersection(placed)
        if inside.size:
            src = inside.translate(-placed.row_off, -placed.col_off)
            rw = RWindow(src.col_off, src.row_off, src.width, src.height)
            rel = inside.relative_to(win)
            out[rel.slices] = ds.read(1, window=rw)
        return out

    return read


# -------------------------------------------------------------------------- reference
def open_reference(opts: EvaluateOptions, grid: Grid) -> Side:
    """The reference, on ``grid``: a class or instance raster, or polygons."""
    if not Path(opts.reference).exists():
        raise SourceError(f"reference not found: {opts.reference!r}: check the path")
    if is_vector(opts.reference):
        return _vector_side(opts, grid)
    ds = open_raster(opts.reference, "reference")
    placed = _placement(grid, raster_grid(ds), opts.reference)
    kind = opts.reference_kind
    if kind == "auto":
        plain = "SEGFLOW_CLASSES" not in ds.tags() and ds.dtypes[0] in ("uint16", "uint32", "int32")
        kind = "instances" if plain else "classes"
    if kind == "classes":
        return Side(classes=_band_reader(ds, placed))
    return object_side(_band_reader(ds, placed, fill=0), one_class(int(opts.reference_class)))


def _placement(grid: Grid, ref: Grid, path: str) -> Window:
    """Where the reference raster lies on the grid (a whole-pixel offset), checked."""
    if grid.georef is None or ref.georef is None:
        if (ref.height, ref.width) != (grid.height, grid.width):
            raise ConfigError(
                f"reference {path!r} is {ref.height} x {ref.width} pixels but the prediction "
                f"{grid.height} x {grid.width}, and one has no georeference to align them"
            )
        return Window(0, 0, ref.height, ref.width)
    from pyproj import CRS

    g, r = grid.georef.geotransform, ref.georef.geotransform
    if not CRS.from_wkt(grid.georef.crs_wkt).equals(CRS.from_wkt(ref.georef.crs_wkt)):
        raise ConfigError(f"reference {path!r} is in another CRS than the prediction: reproject it")
    if not (math.isclose(g[1], r[1], rel_tol=1e-9) and math.isclose(g[5], r[5], rel_tol=1e-9)
            and g[2] == r[2] == g[4] == r[4] == 0):  # fmt: skip
        raise ConfigError(
            f"reference {path!r} has another pixel size than the prediction: resample it"
        )
    col, row = (r[0] - g[0]) / g[1], (r[3] - g[3]) / g[5]
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        raise ConfigError(
            f"reference {path!r} is shifted by a fraction of a pixel from the prediction"
        )
    return Window(round(row), round(col), ref.height, ref.width)


def _vector_side(opts: EvaluateOptions, grid: Grid) -> Side:
    """Polygons rasterized on ``grid``, each feature one object (id = feature index + 1)."""
    gdf = read_vector(opts.reference, grid)
    if opts.class_column in gdf.columns:
        cls = np.concatenate(([0], gdf[opts.class_column].to_numpy(dtype="int64")))
    else:
        cls = np.concatenate(([0], np.full(len(gdf), int(opts.reference_class), "int64")))
    return object_side(rasterizer(gdf, grid), lambda i: cls[i])


def read_vector(path: str, grid: Grid) -> Any:
    """A vector file as a GeoDataFrame in the grid's CRS (pixel coordinates without one)."""
    import geopandas as gpd

    try:
        gdf = (
            gpd.read_parquet(path)
            if path.endswith(("parquet", "geoparquet"))
            else gpd.read_file(path)
        )
    except Exception as err:  # pyogrio/arrow raise many types for unreadable files
        raise SourceError(f"cannot read the polygons {path!r}: {err}") from err
    if grid.georef is not None:
        if gdf.crs is None:
            raise ConfigError(f"polygons {path!r} have no CRS: the grid's is {grid.georef.epsg}")
        gdf = gdf.to_crs(grid.georef.crs_wkt)
    return gdf[~gdf.geometry.is_empty & gdf.geometry.notna()].reset_index(drop=True)


def rasterizer(gdf: Any, grid: Grid) -> Callable[[Window], np.ndarray]:
    from affine import Affine
    from rasterio.features import rasterize

    base = grid.georef.affine() if grid.georef is not None else Affine.identity()
    tree = gdf.sindex

    def ids(win: Window) -> np.ndarray:
        t = base @ Affine.translation(win.col_off, win.row_off)
        x0, y0 = t @ (0, 0)
        x1, y1 = t @ (win.width, win.height)
        hits = tree.query(_box(x0, y0, x1, y1))
        if not len(hits):
            return np.zeros(win.shape, "uint32")
        shapes = ((gdf.geometry.iloc[k], int(k) + 1) for k in sorted(hits))
        return rasterize(shapes, out_shape=win.shape, transform=t, fill=0, dtype="uint32")

    return ids


def _box(x0: float, y0: float, x1: float, y1: float) -> Any:
    import shapely

    return shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def check_options(opts: EvaluateOptions, classes: tuple[ClassDef, ...]) -> tuple[int, ...]:
    """The object classes, checked against the prediction's class table."""
    return object_classes(opts.object_classes, [c.id for c in classes], name="object_classes")
