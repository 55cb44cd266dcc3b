"""Vector labels (GeoPackage, GeoParquet, Shapefile, GeoJSON): read once, normalized to the
image grid, rasterized per block.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segflow.config import ClassDef
from segflow.errors import LabelError
from segflow.geometry import Window

if TYPE_CHECKING:
    import geopandas as gpd

from segflow.georef import _fmt_bounds
from segflow.io.labels.base import (
    _MAX_INSTANCE,
    LabelBlock,
    LabelReader,
    PixelGrid,
    _boxes_intersect,
    _class_ids,
    _crs_text,
    _file_key,
    _table_text,
    label_dtype,
)

__all__ = ["FEATURES_FILE", "VectorLabels", "prepare_vector_labels"]

log = logging.getLogger(__name__)

#: Name of the normalized features file written into ``workdir``.
FEATURES_FILE = "labels.parquet"
_PARQUET_SUFFIXES = (".parquet", ".geoparquet")


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
            "kind": "vector",
            "source": self.source,
            "features": self.count,
            "class_field": self.class_field,
            "class_value": self.class_value,
            "fill": self.fill,
            "rule": "pixel centre (all_touched=False), later features win",
        }


@dataclass(frozen=True, eq=False)
class _Features:
    geometries: np.ndarray  # shapely geometries in grid coordinates
    instances: np.ndarray  # uint32, unique
    class_of_instance: np.ndarray  # class id by instance id (entry 0 unused)
    tree: Any  # shapely.STRtree, None when there are no features


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
    src = Path(path)
    ids = _class_ids(classes, ignore_index)
    dtype = label_dtype(classes, ignore_index)
    fill = ignore_index if background is None else background
    _check_burn_classes(classes, ids, background, ignore_index, class_field, class_value)
    gdf = _numbered(_read_vector(src, class_field, layer), src)
    gdf = _to_grid(gdf, grid, src)
    gdf["class_id"] = _feature_classes(gdf, class_field, class_value, classes, ids, src)
    out = _normalized(gdf, dtype, grid)
    target = _write_features(out, Path(workdir))
    log.info("prepared %d label features from %s into %s", len(out), src, target)
    return VectorLabels(
        features=target.resolve(),
        grid=grid,
        dtype=dtype.name,
        fill=fill,
        source=str(src),
        count=len(out),
        class_field=class_field,
        class_value=class_value,
    )


def _check_burn_classes(
    classes: Sequence[ClassDef],
    ids: list[int],
    background: int | None,
    ignore_index: int,
    class_field: str | None,
    class_value: int,
) -> None:
    """The background class, and ``class_value`` where it is burnt, must be in the table."""
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


def _numbered(gdf: gpd.GeoDataFrame, src: Path) -> gpd.GeoDataFrame:
    """The features with a geometry, numbered 1, 2, ... in ``instance_id`` (file order)."""
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
    return gdf


def _normalized(gdf: gpd.GeoDataFrame, dtype: np.dtype[Any], grid: PixelGrid) -> gpd.GeoDataFrame:
    """What is written: 2-D geometries in grid coordinates, ``class_id``, ``instance_id``."""
    import geopandas as gpd
    import shapely

    return gpd.GeoDataFrame(
        {
            "class_id": gdf["class_id"].to_numpy(dtype),
            "instance_id": gdf["instance_id"].to_numpy(np.uint32),
        },
        geometry=shapely.force_2d(np.asarray(gdf.geometry.array, dtype=object)),
        crs=grid.crs,
    )


def _write_features(out: gpd.GeoDataFrame, workdir: Path) -> Path:
    """Write ``out`` as ``workdir/labels.parquet`` (atomically); its path."""
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
    return target


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
            log.info(
                "the image has no georeference: coordinates in %s are read as pixel "
                "coordinates (x = column, y = row); its CRS %s is not used",
                src,
                gdf.crs.to_string(),
            )
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
        log.warning(
            "no feature of %s lies on the image (%s): every pixel gets the "
            "background class (or ignore_index)",
            src,
            grid.describe(),
        )
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
