"""Raster labels on the image's grid (class values, or georeferenced and resampled) and
instance rasters.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from segflow.config import ClassDef
from segflow.errors import LabelError
from segflow.geometry import Window
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

__all__ = ["InstanceRaster", "RasterLabels", "prepare_instance_raster", "prepare_raster_labels"]

log = logging.getLogger(__name__)

# formats without random access: the whole band is read once per process and cached
_WHOLE_FILE_DRIVERS = frozenset({"PNG", "JPEG", "GIF", "BMP"})
_GRID_RTOL = 1e-9


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
                raise LabelError(
                    f"{what} {str(src)!r} has dtype {ds.dtypes[0]}: ids must be numbers"
                )
            how: Literal["direct", "memory", "warp"] = cls._choose(ds, grid, src, what)
            nodata = ds.nodata
            if how == "direct" and ds.driver in _WHOLE_FILE_DRIVERS:
                how = "memory"
        log.info(
            "%s %s: read %s",
            what,
            src,
            {
                "direct": "directly (same grid)",
                "memory": "whole (small, not tiled)",
                "warp": "reprojected (nearest)",
            }[how],
        )
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
            if (
                same_shape
                and ds_crs.equals(grid_crs, ignore_axis_order=True)
                and np.allclose(gt, ref, rtol=_GRID_RTOL, atol=_GRID_RTOL * pixel)
            ):
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
                log.info(
                    "%s %s and the image share their shape; one of them has no "
                    "georeference, so pixels are matched by index",
                    what,
                    src,
                )
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
                ds,
                crs=CRS.from_wkt(georef.crs_wkt),
                transform=self.grid.transform,
                width=self.grid.width,
                height=self.grid.height,
                resampling=Resampling.nearest,
                src_nodata=None,
                add_alpha=True,
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
            return (
                f"{where} are not in the class map (its keys {keys}): add them to "
                "--class-map, e.g. VALUE:CLASS_ID or VALUE:IGNORE_INDEX"
            )
        return (
            f"{where} are not in the class table {list(self.class_ids)} "
            f"(ignore_index {self.ignore_index}): add them to classes or map them with "
            "--class-map"
        )

    def params(self) -> dict[str, Any]:
        return {
            "kind": "raster",
            "source": self.source,
            "read": self.raster.how,
            "class_map": {str(k): v for k, v in self.table} if self.mapped else None,
            "nodata": self.raster.nodata,
            "resampling": "nearest",
        }


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
                "--class-map %d:%d",
                raster.path,
                nd,
                nd,
                ignore_index,
                nd,
                nd,
                nd,
            )
        table[nd] = ignore_index
    return RasterLabels(
        raster=raster,
        table=tuple(sorted(table.items())),
        class_ids=tuple(ids),
        mapped=class_map is not None,
        ignore_index=ignore_index,
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
        return {
            "kind": "instance_raster",
            "source": self.source,
            "read": self.raster.how,
            "nodata": self.raster.nodata,
            "resampling": "nearest",
        }


def prepare_instance_raster(path: str | Path, grid: PixelGrid) -> InstanceRaster:
    """Check an instance-id raster (0 = background) against the grid; return its reader.

    Same grid rules as :func:`prepare_raster_labels`; its nodata value and grid pixels it
    does not cover read as 0. Ids are returned as uint32.
    """
    return InstanceRaster(_RasterSource.open(path, grid, "instance raster"))
