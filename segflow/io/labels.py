"""Labels for ingest: vector and raster labels read window by window on an image's pixel grid.

A *label reader* turns one source of labels into arrays on the level-0 pixel grid of an
image (a :class:`PixelGrid`), one :class:`~segflow.geometry.Window` at a time:

- :func:`prepare_vector_labels`: polygons, lines or points (GeoJSON, GeoPackage, Shapefile,
  GeoParquet) rasterized to class ids *and* instance ids (one id per feature);
- :func:`prepare_raster_labels`: a raster of class values, optionally remapped, read
  directly when it shares the image's grid, else reprojected (nearest) onto it;
- :func:`prepare_instance_raster`: a raster of object ids (0 = none), same grid rules.

``prepare_*`` validate everything that can be checked up front and fail with one
:class:`~segflow.errors.LabelError` line; what can only be seen in the pixels (a raster value
outside the class table) raises the same error from ``read``. Readers are small frozen
dataclasses and pickle cheaply: vector features are normalized once into a GeoParquet file
and loaded (with a spatial index) lazily, once per process; rasters are opened per read, so a
reader can be shared by threads (GDAL handles are not thread-safe).

Conventions: pixel-centre rule (``all_touched=False``), later features win where features
overlap, ``ignore_index`` marks unlabelled pixels (grid pixels outside a label raster, and a
label raster's nodata value unless the class map names it). On a plain pixel grid (no
georeference) vector coordinates are pixel coordinates: x = column, y = row.

Examples
--------
>>> import tempfile, geopandas as gpd, shapely
>>> from pathlib import Path
>>> from segflow.config import ClassDef
>>> tmp = Path(tempfile.mkdtemp())
>>> gpd.GeoDataFrame(geometry=[shapely.box(1, 1, 3, 2)]).to_file(tmp / "a.geojson")
>>> classes = [ClassDef(id=0, name="background"), ClassDef(id=1, name="object")]
>>> reader = prepare_vector_labels(tmp / "a.geojson", PixelGrid(3, 4, None),
...                                classes=classes, workdir=tmp)
>>> block = reader.read(Window(0, 0, 3, 4))
>>> block.labels
array([[0, 0, 0, 0],
       [0, 1, 1, 0],
       [0, 0, 0, 0]], dtype=uint8)
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from segflow.config import ClassDef
from segflow.errors import LabelError, RegionError
from segflow.geometry import Window
from segflow.io.store import GeoRef

if TYPE_CHECKING:
    import geopandas as gpd
    import pyproj
    from affine import Affine

__all__ = [
    "FEATURES_FILE",
    "InstanceRaster",
    "LabelBlock",
    "LabelReader",
    "PixelGrid",
    "RasterLabels",
    "VectorLabels",
    "label_dtype",
    "prepare_instance_raster",
    "prepare_raster_labels",
    "prepare_vector_labels",
]

log = logging.getLogger(__name__)

#: Name of the normalized features file written into ``workdir``.
FEATURES_FILE = "labels.parquet"

_PARQUET_SUFFIXES = (".parquet", ".geoparquet")
# formats without random access: the whole band is read once per process and cached
_WHOLE_FILE_DRIVERS = frozenset({"PNG", "JPEG", "GIF", "BMP"})
_GRID_RTOL = 1e-9
_MAX_INSTANCE = np.iinfo(np.uint32).max


# --------------------------------------------------------------------------- value objects
@dataclass(frozen=True, slots=True)
class PixelGrid:
    """The target grid: an image's level-0 pixels, with its georeference if it has one.

    ``georef`` None means a plain pixel grid (slides, PNGs): pixel (row, col) covers
    x in [col, col + 1), y in [row, row + 1).
    """

    height: int
    width: int
    georef: GeoRef | None = None

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise LabelError(
                f"label grid must have a positive size, got {self.height} x {self.width} pixels"
            )

    @property
    def transform(self) -> Affine:
        """Pixel -> grid coordinates (the identity for a plain pixel grid)."""
        from affine import Affine

        return self.georef.affine() if self.georef else Affine.identity()

    @property
    def crs(self) -> pyproj.CRS | None:
        """The grid's CRS (None for a plain pixel grid)."""
        import pyproj

        return pyproj.CRS.from_wkt(self.georef.crs_wkt) if self.georef else None

    def bounds(self, window: Window | None = None) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` of the grid, or of ``window``, in grid coordinates."""
        w = window or Window(0, 0, self.height, self.width)
        t = self.transform
        cols = np.array([w.col_off, w.col_stop, w.col_off, w.col_stop], float)
        rows = np.array([w.row_off, w.row_off, w.row_stop, w.row_stop], float)
        xs, ys = t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f
        return (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))

    def window_transform(self, window: Window) -> Affine:
        """Pixel -> grid coordinates of ``window``'s own pixels."""
        from affine import Affine

        if self.georef is None:
            return Affine.translation(window.col_off, window.row_off)
        return Affine.from_gdal(*self.georef.window_geotransform(window))

    def describe(self) -> str:
        """``"H x W pixels, bounds (...) in CRS"`` for messages."""
        where = f"EPSG:{self.georef.epsg}" if self.georef and self.georef.epsg else (
            "a custom CRS" if self.georef else "pixel coordinates")
        return f"{self.height} x {self.width} pixels, bounds {_fmt_bounds(self.bounds())} in {where}"

    def check_window(self, window: Window) -> None:
        """Raise :class:`~segflow.errors.RegionError` unless ``window`` lies inside the grid."""
        if not Window(0, 0, self.height, self.width).contains(window):
            raise RegionError(
                f"label window {window} is outside the {self.height} x {self.width} grid: "
                "read windows inside the image"
            )


@dataclass(frozen=True, slots=True)
class LabelBlock:
    """The labels of one window: class ids ``(h, w)`` and/or instance ids ``(h, w)`` uint32."""

    labels: np.ndarray | None = None
    instances: np.ndarray | None = None


class LabelReader:
    """Base of the label readers: ``read(window)`` gives the window's :class:`LabelBlock`."""

    __slots__ = ()

    #: which arrays ``read`` fills
    has_labels: bool = False
    has_instances: bool = False

    def read(self, window: Window) -> LabelBlock:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """How the labels were made (JSON-able), for the store's array record."""
        raise NotImplementedError


# --------------------------------------------------------------------------- class tables
def label_dtype(classes: Sequence[ClassDef], ignore_index: int) -> np.dtype[Any]:
    """``uint8`` if every class id and ``ignore_index`` fit in 0..255, else ``uint16``.

    >>> label_dtype([ClassDef(id=0, name="bg"), ClassDef(id=1, name="fg")], 255)
    dtype('uint8')
    >>> label_dtype([ClassDef(id=0, name="bg")], 256)
    dtype('uint16')
    """
    top = max([c.id for c in classes] + [ignore_index])
    return np.dtype(np.uint8 if top <= 255 else np.uint16)


def _class_ids(classes: Sequence[ClassDef], ignore_index: int) -> list[int]:
    """The sorted class ids, after checking the table is usable."""
    ids = [c.id for c in classes]
    if not ids:
        raise LabelError("the class table is empty: declare at least one class (id, name)")
    if len(set(ids)) != len(ids):
        raise LabelError(f"class ids must be unique, got {ids}: give each class its own id")
    if not 0 <= ignore_index <= 65535:
        raise LabelError(f"ignore_index must be in 0..65535, got {ignore_index}")
    if ignore_index in ids:
        raise LabelError(
            f"ignore_index {ignore_index} is also a class id: choose another ignore_index"
        )
    return sorted(ids)


def _table_text(classes: Sequence[ClassDef]) -> str:
    return "[" + ", ".join(f"{c.id} {c.name!r}" for c in sorted(classes, key=lambda c: c.id)) + "]"


# --------------------------------------------------------------------------- vector labels
@dataclass(frozen=True, slots=True)
class VectorLabels(LabelReader):
    """Vector features, normalized into ``features`` (GeoParquet), rasterized per window.

    Holds only small values; the features and their STRtree are loaded lazily, once per
    process (:func:`_load_features`), so pickling a reader to Dask workers is cheap.
    """

    features: Path
    grid: PixelGrid
    dtype: str
    fill: int
    source: str
    count: int
    class_field: str | None
    class_value: int

    has_labels = True
    has_instances = True

    def read(self, window: Window) -> LabelBlock:
        """Class and instance ids of ``window`` (pixel-centre rule, later features win)."""
        from rasterio.features import rasterize

        self.grid.check_window(window)
        feats = _load_features(*_file_key(self.features))
        instances = np.zeros(window.shape, np.uint32)
        if window.size and feats.tree is not None:
            import shapely

            hits = np.sort(feats.tree.query(shapely.box(*self.grid.bounds(window))))
            if hits.size:
                rasterize(
                    zip(feats.geometries[hits], feats.instances[hits].tolist(), strict=True),
                    out=instances,
                    transform=self.grid.window_transform(window),
                    all_touched=False,
                )
        # one rasterization: ids are unique per feature, so the class of each pixel is the
        # class of the feature that won it (and the fill where none did)
        labels = feats.class_of_instance[instances].astype(self.dtype, copy=False)
        labels[instances == 0] = self.fill
        return LabelBlock(labels=labels, instances=instances)

    def params(self) -> dict[str, Any]:
        return {
            "kind": "vector", "source": self.source, "features": self.count,
            "class_field": self.class_field, "class_value": self.class_value, "fill": self.fill,
            "rule": "pixel centre (all_touched=False), later features win",
        }


@dataclass(frozen=True, eq=False)
class _Features:
    geometries: np.ndarray  # shapely geometries in grid coordinates
    instances: np.ndarray  # uint32, unique
    class_of_instance: np.ndarray  # class id by instance id (entry 0 unused)
    tree: Any  # shapely.STRtree, None when there are no features


def _file_key(path: Path) -> tuple[str, int, int]:
    """Cache key of a file: its path, mtime and size (a rewritten file is reloaded)."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise LabelError(
            f"prepared labels {str(path)!r} are gone ({err.strerror}): run prepare_vector_labels "
            "again (the workdir must be readable by every worker)"
        ) from None
    return (str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _load_features(path: str, mtime_ns: int, size: int) -> _Features:
    """Load prepared features and build their spatial index (once per process and file)."""
    import geopandas as gpd
    import shapely

    gdf = gpd.read_parquet(path)
    geoms = np.asarray(gdf.geometry.array, dtype=object)
    log.debug("loaded %d label features from %s", len(geoms), path)
    instances = gdf["instance_id"].to_numpy(np.uint32)
    classes = gdf["class_id"].to_numpy()
    class_of_instance = np.zeros(int(instances.max(initial=0)) + 1, classes.dtype)
    class_of_instance[instances] = classes
    return _Features(
        geometries=geoms,
        instances=instances,
        class_of_instance=class_of_instance,
        tree=shapely.STRtree(geoms) if len(geoms) else None,
    )


def prepare_vector_labels(
    path: str | Path,
    grid: PixelGrid,
    *,
    classes: Sequence[ClassDef],
    class_field: str | None = None,
    class_value: int = 1,
    background: int | None = 0,
    ignore_index: int = 255,
    workdir: Path,
    layer: str | int | None = None,
) -> VectorLabels:
    """Read, check and normalize vector labels once; return a cheap, picklable reader.

    Parameters
    ----------
    path
        GeoJSON, GeoPackage, Shapefile (anything OGR reads) or GeoParquet (``.parquet``).
    grid
        The image's level-0 grid. Features are reprojected to its CRS when theirs differs;
        on a plain grid their coordinates are taken as pixel coordinates (x = col, y = row).
    classes
        The class table; every feature's class must be one of its ids.
    class_field
        Attribute holding each feature's class: integer ids, or class *names* for a text
        field. None burns ``class_value`` for every feature.
    background
        Class of pixels no feature covers; None leaves them ``ignore_index`` (unlabelled).
    workdir
        Where the normalized features are written (``workdir/labels.parquet``): geometry in
        grid coordinates, ``class_id``, ``instance_id``. Workers must be able to read it.
    layer
        Layer of a multi-layer file (GeoPackage); default the first.

    Each feature with a non-empty geometry gets instance id = its 1-based row number in the
    file after empty geometries are dropped: deterministic and unique across the scene.
    Features outside the grid are dropped after numbering, so ids may have gaps.

    Raises
    ------
    LabelError
        Unreadable file, missing field, classes outside the table, no CRS where the grid
        has one, or features whose total bounds miss the grid.
    """
    import geopandas as gpd
    import shapely

    src = Path(path)
    ids = _class_ids(classes, ignore_index)
    dtype = label_dtype(classes, ignore_index)
    fill = ignore_index if background is None else background
    if background is not None and background not in ids:
        raise LabelError(
            f"background class {background} is not in the class table {_table_text(classes)}: "
            "add it to the classes, or pass background=None to leave uncovered pixels "
            f"unlabelled ({ignore_index})"
        )
    if class_field is None and class_value not in ids:
        raise LabelError(
            f"class_value {class_value} is not in the class table {_table_text(classes)}: "
            "pass one of its ids as --class-value, or name the class field with --class-field"
        )

    gdf = _read_vector(src, class_field, layer)
    keep = ~(gdf.geometry.isna() | gdf.geometry.is_empty).to_numpy()
    if not keep.any():
        raise LabelError(
            f"labels file {str(src)!r} has no features with a geometry "
            f"({len(gdf)} rows, all empty): check the file and --labels"
        )
    gdf = gdf.loc[keep].reset_index(drop=True)
    if len(gdf) > _MAX_INSTANCE:
        raise LabelError(f"labels file {str(src)!r} has {len(gdf)} features, more than uint32 ids")
    gdf["instance_id"] = np.arange(1, len(gdf) + 1, dtype=np.uint32)

    gdf = _to_grid(gdf, grid, src)
    gdf["class_id"] = _feature_classes(gdf, class_field, class_value, classes, ids, src)

    out = gpd.GeoDataFrame(
        {
            "class_id": gdf["class_id"].to_numpy(dtype),
            "instance_id": gdf["instance_id"].to_numpy(np.uint32),
        },
        geometry=shapely.force_2d(np.asarray(gdf.geometry.array, dtype=object)),
        crs=grid.crs,
    )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / FEATURES_FILE
    fd, tmp_name = tempfile.mkstemp(prefix=f".{FEATURES_FILE}.", suffix=".partial", dir=workdir)
    os.close(fd)
    try:
        out.to_parquet(tmp_name, index=False)
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    log.info("prepared %d label features from %s into %s", len(out), src, target)
    return VectorLabels(
        features=target.resolve(), grid=grid, dtype=dtype.name, fill=fill, source=str(src),
        count=len(out), class_field=class_field, class_value=class_value,
    )


def _read_vector(src: Path, class_field: str | None, layer: str | int | None) -> gpd.GeoDataFrame:
    """The file's geometries (and ``class_field``), with a clear error for each failure."""
    import geopandas as gpd

    if not src.exists():
        raise LabelError(f"labels file not found: {str(src)!r}: check --labels")
    is_parquet = src.suffix.lower() in _PARQUET_SUFFIXES
    try:
        if is_parquet:
            import pyarrow.parquet as pq

            fields = list(pq.read_schema(src).names)
        else:
            import pyogrio

            fields = list(pyogrio.read_info(src, layer=layer)["fields"])
    except Exception as err:
        raise LabelError(
            f"cannot read labels file {str(src)!r} ({type(err).__name__}: {err}): "
            "give a GeoJSON, GeoPackage, Shapefile or GeoParquet file"
        ) from err
    if class_field is not None and class_field not in fields:
        raise LabelError(
            f"class field {class_field!r} is not in labels file {str(src)!r}: its fields are "
            f"{fields}: pass one of them as --class-field, or omit it to burn --class-value"
        )
    columns = [class_field] if class_field else []
    try:
        if is_parquet:
            gdf = gpd.read_parquet(src)
            gdf = gdf[[*columns, gdf.geometry.name]]
        else:
            gdf = gpd.read_file(src, columns=columns, layer=layer, engine="pyogrio")
    except Exception as err:
        raise LabelError(
            f"cannot read labels file {str(src)!r} ({type(err).__name__}: {err}): "
            "check that it is a valid vector file (GeoParquet needs its 'geo' metadata)"
        ) from err
    return gdf


def _to_grid(gdf: gpd.GeoDataFrame, grid: PixelGrid, src: Path) -> gpd.GeoDataFrame:
    """Features in grid coordinates, those outside the grid dropped; error if all miss it."""
    import shapely

    grid_bounds = grid.bounds()
    file_bounds = tuple(float(v) for v in gdf.total_bounds)
    search, reproject = grid_bounds, False
    if grid.georef is None:
        if gdf.crs is not None:
            log.info("the image has no georeference: coordinates in %s are read as pixel "
                     "coordinates (x = column, y = row); its CRS %s is not used", src,
                     gdf.crs.to_string())
        gdf = gdf.set_crs(None, allow_override=True)
        file_crs_text = "pixel coordinates"
    else:
        grid_crs = grid.crs
        if gdf.crs is None:
            raise LabelError(
                f"labels file {str(src)!r} has no CRS but the image is in {_crs_text(grid_crs)}: "
                "give the file its CRS (e.g. ogr2ogr -a_srs EPSG:XXXX out.gpkg in.shp, or add a "
                ".prj beside a Shapefile)"
            )
        file_crs_text = _crs_text(gdf.crs)
        if not gdf.crs.equals(grid_crs, ignore_axis_order=True):
            from rasterio.warp import transform_bounds

            search = transform_bounds(grid_crs, gdf.crs, *grid_bounds, densify_pts=21)
            reproject = True
    if not _boxes_intersect(file_bounds, search):
        raise LabelError(
            f"labels in {str(src)!r} do not overlap the image: their bounds "
            f"{_fmt_bounds(file_bounds)} in {file_crs_text}, the image is {grid.describe()}: "
            "check that the labels belong to this image and that their CRS is declared correctly"
        )
    inside = gdf.sindex.query(shapely.box(*search))
    gdf = gdf.iloc[np.sort(inside)]
    if reproject:
        gdf = gdf.to_crs(grid.crs)
    if len(gdf) == 0:
        log.warning("no feature of %s lies on the image (%s): every pixel gets the "
                    "background class (or ignore_index)", src, grid.describe())
    else:
        log.debug("%d features of %s lie on the image", len(gdf), src)
    return gdf


def _feature_classes(
    gdf: gpd.GeoDataFrame,
    class_field: str | None,
    class_value: int,
    classes: Sequence[ClassDef],
    ids: list[int],
    src: Path,
) -> np.ndarray:
    """Each feature's class id, checked against the class table."""
    import pandas as pd

    if class_field is None:
        return np.full(len(gdf), class_value, np.int64)
    col = gdf[class_field]
    missing = int(col.isna().sum())
    if missing:
        raise LabelError(
            f"{missing} of {len(col)} features in {str(src)!r} have no value in class field "
            f"{class_field!r}: fill them in or drop those features"
        )
    if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        values = col.to_numpy(np.float64)
        if not np.all(values == np.round(values)):
            bad = sorted({float(v) for v in values[values != np.round(values)]})[:10]
            raise LabelError(
                f"class field {class_field!r} in {str(src)!r} has non-integer values {bad}: "
                "class ids must be integers"
            )
        out = values.astype(np.int64)
        unknown = sorted({int(v) for v in np.unique(out)} - set(ids))
    else:  # text: class names
        by_name = {c.name: c.id for c in classes}
        names = col.astype(str)
        unknown = sorted(set(names.unique()) - set(by_name))
        out = names.map(by_name).to_numpy()
    if unknown:
        raise LabelError(
            f"class field {class_field!r} in {str(src)!r} has values {unknown[:20]} that are not "
            f"in the class table {_table_text(classes)}: add them to the classes or fix the "
            "features (a text field must hold class names, a numeric one class ids)"
        )
    return np.asarray(out, np.int64)


# --------------------------------------------------------------------------- raster labels
@dataclass(frozen=True, slots=True)
class _RasterSource:
    """A one-band raster read on the grid: directly, from a whole-file cache, or warped."""

    path: str
    grid: PixelGrid
    how: Literal["direct", "memory", "warp"]
    nodata: float | None

    @classmethod
    def open(cls, path: str | Path, grid: PixelGrid, what: str) -> _RasterSource:
        """Check ``path`` against ``grid`` and choose how to read it."""
        src = Path(path)
        if not src.exists():
            raise LabelError(f"{what} not found: {str(src)!r}: check the path")
        with _open_raster(src, what) as ds:
            if ds.count != 1:
                raise LabelError(
                    f"{what} {str(src)!r} has {ds.count} bands: give one band of ids "
                    "(convert colour-coded labels to ids first)"
                )
            if "complex" in ds.dtypes[0]:
                raise LabelError(f"{what} {str(src)!r} has dtype {ds.dtypes[0]}: ids must be numbers")
            how: Literal["direct", "memory", "warp"] = cls._choose(ds, grid, src, what)
            nodata = ds.nodata
            if how == "direct" and ds.driver in _WHOLE_FILE_DRIVERS:
                how = "memory"
        log.info("%s %s: read %s", what, src, {"direct": "directly (same grid)",
                 "memory": "whole (small, not tiled)", "warp": "reprojected (nearest)"}[how])
        return cls(str(src.resolve()), grid, how, nodata)

    @staticmethod
    def _choose(ds: Any, grid: PixelGrid, src: Path, what: str) -> Literal["direct", "warp"]:
        import pyproj

        same_shape = (ds.height, ds.width) == (grid.height, grid.width)
        shape_text = f"{ds.height} x {ds.width} pixels"
        if grid.georef is not None and ds.crs is not None:
            ds_crs = pyproj.CRS.from_wkt(ds.crs.to_wkt())
            grid_crs = grid.crs
            assert grid_crs is not None
            gt, ref = np.array(ds.transform.to_gdal()), np.array(grid.georef.geotransform)
            pixel = max(abs(ref[1]), abs(ref[5]), abs(ref[2]), abs(ref[4]))
            if (same_shape and ds_crs.equals(grid_crs, ignore_axis_order=True)
                    and np.allclose(gt, ref, rtol=_GRID_RTOL, atol=_GRID_RTOL * pixel)):
                return "direct"
            from rasterio.warp import transform_bounds

            b = transform_bounds(ds.crs, grid_crs, *ds.bounds, densify_pts=21)
            if not _boxes_intersect(b, grid.bounds()):
                raise LabelError(
                    f"{what} {str(src)!r} does not overlap the image: its bounds "
                    f"{_fmt_bounds(tuple(ds.bounds))} in {_crs_text(ds_crs)}, the image is "
                    f"{grid.describe()}: check that the labels belong to this image"
                )
            return "warp"
        if same_shape:
            if (grid.georef is None) != (ds.crs is None):
                log.info("%s %s and the image share their shape; one of them has no "
                         "georeference, so pixels are matched by index", what, src)
            return "direct"
        if grid.georef is None:
            reason = "the image has no georeference, so labels cannot be reprojected onto it"
        else:
            reason = "the label raster has no georeference (CRS and transform)"
        raise LabelError(
            f"{what} {str(src)!r} is {shape_text} but the image is {grid.height} x {grid.width} "
            f"and {reason}: give labels of the image's shape, or georeference both"
        )

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray | None]:
        """The raw values of ``window`` and where the raster covers it (None: everywhere)."""
        self.grid.check_window(window)
        if self.how == "memory":
            return _whole_band(*_file_key(Path(self.path)))[window.slices], None
        from rasterio.windows import Window as RioWindow

        rio_window = RioWindow(window.col_off, window.row_off, window.width, window.height)
        with _open_raster(Path(self.path), "label raster") as ds:
            if self.how == "direct":
                return ds.read(1, window=rio_window), None
            from rasterio.crs import CRS
            from rasterio.enums import Resampling
            from rasterio.vrt import WarpedVRT

            georef = self.grid.georef
            assert georef is not None
            # src_nodata=None: values come through as they are (the nodata rule is applied by
            # the caller, as for direct reads); the alpha band says where the raster is
            with WarpedVRT(
                ds, crs=CRS.from_wkt(georef.crs_wkt), transform=self.grid.transform,
                width=self.grid.width, height=self.grid.height, resampling=Resampling.nearest,
                src_nodata=None, add_alpha=True,
            ) as vrt:
                values = vrt.read(1, window=rio_window)
                covered = vrt.read_masks(1, window=rio_window) > 0
        return values, covered


def _open_raster(src: Path, what: str) -> Any:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(src)
    except RasterioIOError as err:
        raise LabelError(f"cannot open {what} {str(src)!r}: {err}: give a GeoTIFF or PNG") from err


@functools.lru_cache(maxsize=4)
def _whole_band(path: str, mtime_ns: int, size: int) -> np.ndarray:
    """Band 1 of a small non-tiled raster (PNG ...), read once per process."""
    with _open_raster(Path(path), "label raster") as ds:
        band = ds.read(1)
    band.setflags(write=False)
    return band


def _integer_values(values: np.ndarray, src: str, what: str) -> np.ndarray:
    """``values`` as integers; LabelError on non-integral floats."""
    if np.issubdtype(values.dtype, np.integer):
        return values
    good = np.isfinite(values) & (values == np.round(values))
    if not good.all():
        bad = np.unique(values[~good])[:10].tolist()
        raise LabelError(f"{what} {src!r} has non-integer values {bad}: ids must be integers")
    return values.astype(np.int64)


@dataclass(frozen=True, slots=True)
class RasterLabels(LabelReader):
    """A raster of class values on (or reprojected onto) the grid, mapped to class ids.

    ``table`` maps each accepted raw value to its class id (or ``ignore_index``); any other
    value raises :class:`~segflow.errors.LabelError` from :meth:`read`.
    """

    raster: _RasterSource
    table: tuple[tuple[int, int], ...]
    class_ids: tuple[int, ...]
    mapped: bool
    ignore_index: int
    dtype: str

    has_labels = True

    @property
    def source(self) -> str:
        return self.raster.path

    def read(self, window: Window) -> LabelBlock:
        values, covered = self.raster.read(window)
        values = _integer_values(values, self.source, "label raster")
        out_dtype = np.dtype(self.dtype)
        if values.dtype in (np.uint8, np.uint16):  # a lookup table over every possible value
            lut = np.full(np.iinfo(values.dtype).max + 1, -1, np.int32)
            for raw, cls in self.table:
                if 0 <= raw < lut.size:
                    lut[raw] = cls
            mapped = lut[values]
        else:
            uniq, inverse = np.unique(values, return_inverse=True)
            table = dict(self.table)
            mapped = np.array([table.get(int(u), -1) for u in uniq], np.int32)[inverse]
            mapped = mapped.reshape(values.shape)
        bad = mapped < 0
        if covered is not None:
            bad &= covered
        if bad.any():
            raise LabelError(self._bad_values_message(np.unique(values[bad]).tolist(), window))
        if covered is not None:
            mapped[~covered] = self.ignore_index
        return LabelBlock(labels=mapped.astype(out_dtype))

    def _bad_values_message(self, bad: list[int], window: Window) -> str:
        where = f"label values {bad[:20]} in {self.source!r} (window {window})"
        if self.mapped:
            keys = sorted(k for k, _ in self.table)
            return (f"{where} are not in the class map (its keys {keys}): add them to "
                    "--class-map, e.g. VALUE:CLASS_ID or VALUE:IGNORE_INDEX")
        return (f"{where} are not in the class table {list(self.class_ids)} "
                f"(ignore_index {self.ignore_index}): add them to classes or map them with "
                "--class-map")

    def params(self) -> dict[str, Any]:
        return {"kind": "raster", "source": self.source, "read": self.raster.how,
                "class_map": {str(k): v for k, v in self.table} if self.mapped else None,
                "nodata": self.raster.nodata, "resampling": "nearest"}


def prepare_raster_labels(
    path: str | Path,
    grid: PixelGrid,
    *,
    classes: Sequence[ClassDef],
    class_map: Mapping[int, int] | None = None,
    ignore_index: int = 255,
) -> RasterLabels:
    """Check a class-value raster against the grid and class table; return its reader.

    The raster is read directly when it has the grid's shape and (when both are
    georeferenced) its CRS and geotransform (within 1e-9 relative); a georeferenced raster on
    another grid is reprojected with nearest resampling (``rasterio.vrt.WarpedVRT``); a plain
    raster of another shape is an error. Grid pixels the raster does not cover are
    ``ignore_index``.

    ``class_map`` maps raw values to class ids (or ``ignore_index``), e.g. ``{0: 1, 255: 0}``;
    without it raw values must be class ids or ``ignore_index``. The raster's nodata value
    reads as ``ignore_index`` unless ``class_map`` maps it. Values outside the map (or table)
    raise :class:`~segflow.errors.LabelError` when the window holding them is read.

    >>> import numpy as np, tempfile, rasterio
    >>> from PIL import Image
    >>> tmp = tempfile.mkdtemp()
    >>> Image.fromarray(np.array([[0, 255]], np.uint8)).save(f"{tmp}/m.png")
    >>> classes = [ClassDef(id=0, name="bg"), ClassDef(id=1, name="fg")]
    >>> r = prepare_raster_labels(f"{tmp}/m.png", PixelGrid(1, 2), classes=classes,
    ...                           class_map={0: 1, 255: 0})
    >>> r.read(Window(0, 0, 1, 2)).labels
    array([[1, 0]], dtype=uint8)
    """
    ids = _class_ids(classes, ignore_index)
    allowed = {*ids, ignore_index}
    if class_map is not None:
        if not class_map:
            raise LabelError("class_map is empty: map raw values to class ids, e.g. {0: 0, 255: 1}")
        table = {int(k): int(v) for k, v in class_map.items()}
        wrong = {k: v for k, v in table.items() if v not in allowed}
        if wrong:
            raise LabelError(
                f"class map {wrong} sends values to ids that are not in the class table "
                f"{_table_text(classes)} (ignore_index {ignore_index}): map them to class ids"
            )
    else:
        table = {v: v for v in allowed}
    raster = _RasterSource.open(path, grid, "label raster")
    nodata = raster.nodata
    if nodata is not None and float(nodata).is_integer() and int(nodata) not in (class_map or {}):
        nd = int(nodata)
        if class_map is None and nd in ids:
            log.warning(
                "label raster %s declares nodata %d, which is also class %d: those pixels are "
                "read as ignore_index %d (unlabelled); if %d means that class there, pass "
                "--class-map %d:%d", raster.path, nd, nd, ignore_index, nd, nd, nd)
        table[nd] = ignore_index
    return RasterLabels(
        raster=raster, table=tuple(sorted(table.items())), class_ids=tuple(ids),
        mapped=class_map is not None, ignore_index=ignore_index,
        dtype=label_dtype(classes, ignore_index).name,
    )


# --------------------------------------------------------------------------- instance raster
@dataclass(frozen=True, slots=True)
class InstanceRaster(LabelReader):
    """A raster of object ids (0 = none) on (or reprojected onto) the grid, as uint32."""

    raster: _RasterSource

    has_instances = True

    @property
    def source(self) -> str:
        return self.raster.path

    def read(self, window: Window) -> LabelBlock:
        values, covered = self.raster.read(window)
        values = _integer_values(values, self.source, "instance raster")
        if self.raster.nodata is not None:
            values = np.where(values == self.raster.nodata, 0, values)
        if covered is not None:
            values = np.where(covered, values, 0)
        if values.size and (values.min() < 0 or values.max() > _MAX_INSTANCE):
            raise LabelError(
                f"instance raster {self.source!r} has ids outside 0..{_MAX_INSTANCE} in window "
                f"{window} (min {values.min()}, max {values.max()}): ids must be >= 0 (0 = none)"
            )
        return LabelBlock(instances=values.astype(np.uint32))

    def params(self) -> dict[str, Any]:
        return {"kind": "instance_raster", "source": self.source, "read": self.raster.how,
                "nodata": self.raster.nodata, "resampling": "nearest"}


def prepare_instance_raster(path: str | Path, grid: PixelGrid) -> InstanceRaster:
    """Check an instance-id raster (0 = background) against the grid; return its reader.

    Same grid rules as :func:`prepare_raster_labels`; its nodata value and grid pixels it
    does not cover read as 0. Ids are returned as uint32.
    """
    return InstanceRaster(_RasterSource.open(path, grid, "instance raster"))


# --------------------------------------------------------------------------- small helpers
def _boxes_intersect(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _fmt_bounds(b: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.10g}" for v in b) + ")"


def _crs_text(crs: Any) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else repr(crs.name)
