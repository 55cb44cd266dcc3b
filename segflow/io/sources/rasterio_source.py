"""GDAL through rasterio: GeoTIFF, COG, VRT and anything else GDAL opens (``geotiff`` or
``image``). Valid = GDAL's dataset mask.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from segflow.errors import SourceError
from segflow.geometry import Window
from segflow.io.sources.base import Source, SourceInfo, _one_line, _unique
from segflow.io.store import GeoRef

__all__ = ["RasterioSource"]

# Every block is read once or twice (a window and its neighbour's halo): GDAL's default block
# cache, 5 % of the RAM, only holds memory that grows with the image (ingest of 16384^2 in a
# plain Python process: 0.65 GiB peak, 0.22 GiB with a 64 MiB cache, and no slower). The flows
# set the same; a value the user set wins. GDAL reads it when its cache first fills.
os.environ.setdefault("GDAL_CACHEMAX", "256")


# ---------------------------------------------------------------------------- rasterio
class RasterioSource(Source):
    """GeoTIFF, COG, VRT mosaics and other GDAL rasters, through rasterio.

    Level ``k > 0`` is GDAL overview ``k - 1``. ``read_valid`` is GDAL's dataset mask, which
    honours nodata, internal masks and alpha bands.
    """

    def __init__(self, path: str | Path, level: int = 0) -> None:
        super().__init__(path, level)
        try:
            with _rio_open(self._dataset_name()) as ds:
                shapes = [(int(ds.height), int(ds.width))]
                for i in range(len(ds.overviews(1)) if ds.count else 0):
                    with _rio_open(self._dataset_name(), overview_level=i) as ov:
                        shapes.append((int(ov.height), int(ov.width)))
        except SourceError:
            raise
        except Exception as err:
            raise SourceError(
                f"GDAL cannot read {str(self.path)!r} ({_one_line(err)}): "
                "check the file is a complete raster GDAL can open"
            ) from None
        if level >= len(shapes):
            raise self._level_error(len(shapes))
        ds = self._handle()
        if ds.count == 0:
            raise SourceError(f"{str(self.path)!r} has no raster bands: pass a raster image")
        dtypes = set(ds.dtypes)
        dtype = ds.dtypes[0] if len(dtypes) == 1 else str(np.result_type(*sorted(dtypes)))
        crs = ds.crs
        georef = None
        if crs is not None:
            from rasterio.enums import WktVersion

            georef = GeoRef(
                crs_wkt=crs.to_wkt(version=WktVersion.WKT2_2019),
                epsg=crs.to_epsg(),
                geotransform=tuple(float(v) for v in ds.transform.to_gdal()),  # type: ignore[arg-type]
            )
        is_vrt = ds.driver == "VRT"
        self.info = SourceInfo(
            uri=str(self.path),
            kind="geotiff" if (georef is not None or is_vrt) else "image",
            height=int(ds.height),
            width=int(ds.width),
            bands=_unique(
                d or (ci.name if ci.name != "undefined" else f"band{i}")
                for i, (d, ci) in enumerate(zip(ds.descriptions, ds.colorinterp, strict=True), 1)
            ),
            dtype=str(np.dtype(dtype)),
            nodata=None if ds.nodata is None else float(ds.nodata),
            block=(int(ds.block_shapes[0][0]), int(ds.block_shapes[0][1])),
            georef=georef,
            slide=None,
            level_shapes=tuple(shapes),
        )

    def _open_handle(self) -> Any:
        kw = {"overview_level": self.level - 1} if self.level else {}
        return _rio_open(self._dataset_name(), **kw)

    def _dataset_name(self) -> str | Path:
        """What GDAL opens: the file or URL (a subclass may give a VRT's XML)."""
        return self.path

    def read_decimated(self, window: Window, shape: tuple[int, int]) -> np.ndarray:
        """``window`` sampled to ``shape`` (rows, cols) by nearest neighbour; GDAL reads
        from an overview where the file has one."""
        from rasterio.enums import Resampling

        try:
            out = self._handle().read(window=self._rio_window(window),
                                      out_shape=(len(self.info.bands), *shape),
                                      resampling=Resampling.nearest)  # fmt: skip
        except Exception as err:
            raise SourceError(
                f"reading {window} of {self.info.uri!r} failed ({_one_line(err)}): "
                "check the file is complete"
            ) from None
        return np.asarray(out)

    @staticmethod
    def _rio_window(window: Window) -> Any:
        from rasterio.windows import Window as RWindow

        return RWindow(window.col_off, window.row_off, window.width, window.height)

    def _read(self, window: Window) -> np.ndarray:
        try:
            out = self._handle().read(window=self._rio_window(window), out_dtype=self.info.dtype)
        except Exception as err:
            raise SourceError(
                f"reading {window} of {self.info.uri!r} failed ({_one_line(err)}): "
                "check the file (and, for a VRT, the files it refers to) is complete"
            ) from None
        return np.asarray(out)

    def _valid_of(self, window: Window, data: np.ndarray) -> np.ndarray:
        # When every band's mask comes from nodata alone (or there is none), GDAL's dataset
        # mask is "any band != nodata": compute it from the pixels instead of decoding the
        # window a second time. Internal masks and alpha bands still go through GDAL.
        from rasterio.enums import MaskFlags

        flags = {tuple(f) for f in self._handle().mask_flag_enums}
        nodata = self.info.nodata
        if flags == {(MaskFlags.all_valid,)}:
            return np.ones(data.shape[1:], dtype=bool)
        if flags == {(MaskFlags.nodata,)} and nodata is not None:
            if np.isnan(nodata):
                return np.asarray(~np.isnan(data).all(axis=0))
            if data.dtype.kind == "f" or _one_of_its_values(nodata, data.dtype):
                differs = data != data.dtype.type(nodata)
                return differs[0] if len(differs) == 1 else np.asarray(differs.any(axis=0))
        return self._read_valid(window)

    def _read_valid(self, window: Window) -> np.ndarray:
        try:
            mask = self._handle().dataset_mask(window=self._rio_window(window))
        except Exception as err:
            raise SourceError(
                f"reading the mask of {window} of {self.info.uri!r} failed ({_one_line(err)}): "
                "check the file is complete"
            ) from None
        return np.asarray(mask) != 0


def _one_of_its_values(nodata: float, dtype: np.dtype[Any]) -> bool:
    """Whether GDAL's nodata (always a float: 0.0 for a uint16 band) is a value of the
    integer ``dtype``; one that is not (0.5, 300 for uint8) leaves the mask to GDAL."""
    if dtype.kind not in "iu":
        return bool(np.can_cast(np.min_scalar_type(nodata), dtype))
    info = np.iinfo(dtype)
    return float(nodata).is_integer() and info.min <= nodata <= info.max


def _rio_open(path: str | Path, **kw: Any) -> Any:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, **kw)
