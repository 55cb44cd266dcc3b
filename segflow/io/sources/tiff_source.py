"""Tiled and pyramidal TIFF and OME-TIFF through tifffile and Zarr (``slide``), for what
OpenSlide cannot open or reads only in part.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np

from segflow.errors import SourceError
from segflow.geometry import Window
from segflow.io.sources.base import (
    Source,
    SourceInfo,
    _float_or_none,
    _one_line,
    _thumbnail,
    _unique,
)
from segflow.io.store import SlideInfo
from segflow.tissue import _slide_threshold, tissue_mask

__all__ = ["TiffSlideSource"]


# ------------------------------------------------------------------------------ tifffile
@dataclass
class _TiffHandle:
    tif: Any  # tifffile.TiffFile
    array: Any  # zarr.Array over one level: axes as in `axes`

    def close(self) -> None:
        self.tif.close()


@dataclass(frozen=True)
class _TiffLayout:
    """Where the band, row and column axes of a tifffile level array are."""

    axes: str
    band_axis: int | None

    @classmethod
    def of(cls, axes: str, shape: tuple[int, ...], path: Path | str) -> _TiffLayout:
        if "Y" not in axes or "X" not in axes:
            raise SourceError(
                f"TIFF {str(path)!r} has axes {axes!r} with no Y/X plane: pass a 2-D image"
            )
        others = [i for i, a in enumerate(axes) if a not in "YX" and shape[i] > 1]
        if len(others) > 1:
            raise SourceError(
                f"TIFF {str(path)!r} is a stack with axes {axes!r} and shape {shape}: segflow "
                "reads one 2-D image (with bands); extract a single plane first"
            )
        band = others[0] if others else None
        return cls(axes, band)

    def take(self, arr: Any, window: Window) -> np.ndarray:
        index: list[Any] = []
        for i, a in enumerate(self.axes):
            if a == "Y":
                index.append(slice(window.row_off, window.row_stop))
            elif a == "X":
                index.append(slice(window.col_off, window.col_stop))
            else:
                index.append(slice(None) if i == self.band_axis else 0)
        data = np.asarray(arr[tuple(index)])
        kept = [a for i, a in enumerate(self.axes) if a in "YX" or i == self.band_axis]
        order = [kept.index(self.axes[self.band_axis])] if self.band_axis is not None else []
        order += [kept.index("Y"), kept.index("X")]
        data = data.transpose(order)
        if self.band_axis is None:
            data = data[np.newaxis]
        return np.ascontiguousarray(data)


def _tiff_open(path: Path | str) -> Any:
    """tifffile over a local file, or over an object read by ranged GETs (a URL)."""
    import tifffile

    from segflow.io import remote

    try:
        if isinstance(path, str) and remote.is_url(path):
            # a RawIOBase: seek, tell and read, as tifffile's FileHandle uses them
            ranged = cast(IO[bytes], remote.open_ranged(remote.object_url(path)))
            return tifffile.TiffFile(ranged)
        return tifffile.TiffFile(path)
    except remote.RemoteError:
        raise
    except Exception as err:
        raise SourceError(
            f"cannot read TIFF {str(path)!r} ({_one_line(err)}): check the file is a complete TIFF"
        ) from None


def _tiff_level_array(tif: Any, level: int) -> Any:
    import zarr

    store = tif.series[0].aszarr(level=level)
    return zarr.open_array(store, mode="r")


def _tiff_bands(tif: Any, page: Any, nbands: int, from_samples: bool) -> tuple[str, ...]:
    if nbands == 1:
        return ("gray",)
    photometric = int(page.photometric)
    if from_samples and photometric in (2, 6) and nbands in (3, 4):  # RGB, YCbCr (decoded)
        return ("red", "green", "blue", "alpha")[:nbands]
    if tif.is_ome:
        names = _ome_channel_names(tif.ome_metadata)
        if len(names) == nbands and all(names):
            return _unique(names)
    return tuple(f"band{i}" for i in range(1, nbands + 1))


def _tiff_has_alpha(page: Any, nbands: int) -> bool:
    extras = tuple(int(e) for e in (page.extrasamples or ()))
    # EXTRASAMPLE 1 = associated (premultiplied) alpha, 2 = unassociated alpha
    return nbands in (2, 4) and bool(extras) and extras[-1] in (1, 2)


def _tiff_block(page: Any) -> tuple[int, int]:
    if page.is_tiled:
        return (int(page.tilelength), int(page.tilewidth))
    rows = int(page.rowsperstrip or page.imagelength)
    return (min(rows, int(page.imagelength)), int(page.imagewidth))


class _TiffBase(Source):
    """Shared tifffile machinery: one Zarr array over the chosen level, read by window."""

    def _probe_tiff(
        self,
    ) -> tuple[Any, _TiffLayout, list[tuple[int, int]], str, int, tuple[int, int]]:
        tif = _tiff_open(self.path)
        try:
            series = tif.series[0]
            levels = series.levels
            if self.level >= len(levels):
                raise self._level_error(len(levels))
            shapes = []
            for lvl in levels:
                _TiffLayout.of(lvl.axes, tuple(lvl.shape), self.path)  # each level is 2-D
                shapes.append(
                    (int(lvl.shape[lvl.axes.index("Y")]), int(lvl.shape[lvl.axes.index("X")]))
                )
            lvl = levels[self.level]
            lay = _TiffLayout.of(lvl.axes, tuple(lvl.shape), self.path)
            nbands = 1 if lay.band_axis is None else int(lvl.shape[lay.band_axis])
            page = lvl.pages[0] if lvl.pages else series.pages[0]
            return tif, lay, shapes, str(np.dtype(lvl.dtype)), nbands, _tiff_block(page)
        except BaseException:
            tif.close()
            raise

    def _open_handle(self) -> Any:
        tif = _tiff_open(self.path)
        try:
            return _TiffHandle(tif, _tiff_level_array(tif, self.level))
        except Exception as err:
            tif.close()
            raise SourceError(
                f"cannot read level {self.level} of {str(self.path)!r} "
                f"({_one_line(err)}): check the file is complete"
            ) from None

    def _pixels(self, window: Window) -> np.ndarray:
        cached = getattr(self._local, "last", None)
        if cached is not None and cached[0] == window:
            return cached[1]
        try:
            data = self._layout.take(self._handle().array, window)
        except SourceError:
            raise
        except Exception as err:
            raise SourceError(
                f"reading {window} of {self.info.uri!r} failed ({_one_line(err)}): "
                "check the file is complete"
            ) from None
        self._local.last = (window, data)
        return data

    def _read(self, window: Window) -> np.ndarray:
        return self._pixels(window).copy()

    _layout: _TiffLayout


class TiffSlideSource(_TiffBase):
    """Tiled/pyramidal TIFF, SVS and OME-TIFF slides through tifffile (Zarr by window).

    Levels are tifffile's ``series[0].levels`` (SubIFD or page pyramids). Microns per pixel
    come from OME ``PhysicalSizeX/Y`` (converted to µm), else the Aperio ``MPP`` entry, else
    the TIFF resolution when its unit is the centimetre.
    """

    def __init__(self, path: str | Path, level: int = 0) -> None:
        super().__init__(path, level)
        tif, self._layout, shapes, dtype, nbands, block = self._probe_tiff()
        try:
            page0 = tif.series[0].levels[0].pages[0]
            bands = _tiff_bands(tif, page0, nbands, "S" in self._layout.axes)
            self._alpha = _tiff_has_alpha(page0, nbands)
            mpp_x, mpp_y, objective, vendor = _tiff_slide_meta(tif, page0)
            rgb8 = dtype == "uint8" and bands[:3] == ("red", "green", "blue")
            self.threshold: int | None = None
            if rgb8:
                thumb = _tiff_thumbnail(tif, shapes, self.path)
                self.threshold = _slide_threshold(
                    thumb[:3], thumb[3] if self._alpha and thumb.shape[0] > 3 else None
                )
        finally:
            tif.close()
        h, w = shapes[self.level]
        h0, w0 = shapes[0]
        self.info = SourceInfo(
            uri=str(self.path),
            kind="slide",
            height=h,
            width=w,
            bands=bands,
            dtype=dtype,
            nodata=None,
            block=block,
            georef=None,
            slide=SlideInfo(
                mpp_x=None if mpp_x is None else mpp_x * (w0 / w),
                mpp_y=None if mpp_y is None else mpp_y * (h0 / h),
                objective_power=objective,
                vendor=vendor,
                level=self.level,
                downsample=(w0 / w + h0 / h) / 2,
            ),
            level_shapes=tuple(shapes),
        )

    def _read_valid(self, window: Window) -> np.ndarray:
        px = self._pixels(window)
        alpha = px[-1] if self._alpha else None
        if self.threshold is None:
            return np.ones(window.shape, bool) if alpha is None else alpha > 0
        return tissue_mask(px[:3], self.threshold, alpha)


def _tiff_thumbnail(tif: Any, shapes: list[tuple[int, int]], path: Path | str) -> np.ndarray:
    """A thumbnail of the smallest level of a tifffile pyramid (see :func:`_thumbnail`)."""
    last = len(shapes) - 1
    lvl = tif.series[0].levels[last]
    lay = _TiffLayout.of(lvl.axes, tuple(lvl.shape), path)
    arr = _tiff_level_array(tif, last)
    return _thumbnail(lambda win: lay.take(arr, win), *shapes[last])


def _tiff_slide_meta(tif: Any, page: Any) -> tuple[float | None, float | None, float | None, str]:
    mpp_x = mpp_y = objective = None
    vendor = "generic-tiff"
    if tif.is_ome:
        vendor = "ome"
        mpp_x, mpp_y, objective = _ome_physical_size(tif.ome_metadata)
    elif tif.is_svs:
        from tifffile.tifffile import svs_description_metadata

        vendor = "aperio"
        try:
            meta = svs_description_metadata(page.description)
        except Exception:
            meta = {}
        mpp = _float_or_none(meta.get("MPP"))
        mpp_x = mpp_y = mpp
        objective = _float_or_none(meta.get("AppMag"))
    if mpp_x is None and int(page.resolutionunit) == 3:  # RESUNIT.CENTIMETER
        rx, ry = page.resolution
        if rx > 0 and ry > 0:
            mpp_x, mpp_y = 1e4 / rx, 1e4 / ry
    return mpp_x, mpp_y, objective, vendor


_UNIT_TO_UM = {
    "µm": 1.0,
    "um": 1.0,
    "\u03bcm": 1.0,
    "nm": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "pm": 1e-6,
    "Å": 1e-4,
}


def _ome_root(xml: str | None) -> ET.Element | None:
    if not xml:
        return None
    try:
        return ET.fromstring(xml)
    except ET.ParseError:
        return None


def _ome_physical_size(xml: str | None) -> tuple[float | None, float | None, float | None]:
    root = _ome_root(xml)
    if root is None:
        return None, None, None
    pixels = next((e for e in root.iter() if e.tag.endswith("}Pixels") or e.tag == "Pixels"), None)
    sizes: list[float | None] = [None, None]
    if pixels is not None:
        for i, axis in enumerate("XY"):
            value = _float_or_none(pixels.get(f"PhysicalSize{axis}"))
            unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
            factor = _UNIT_TO_UM.get(unit)
            sizes[i] = None if value is None or factor is None else value * factor
    objective = next(
        (
            _float_or_none(e.get("NominalMagnification"))
            for e in root.iter()
            if e.tag.endswith("}Objective") and e.get("NominalMagnification")
        ),
        None,
    )
    return sizes[0], sizes[1], objective


def _ome_channel_names(xml: str | None) -> list[str]:
    root = _ome_root(xml)
    if root is None:
        return []
    pixels = next((e for e in root.iter() if e.tag.endswith("}Pixels")), None)
    if pixels is None:
        return []
    return [c.get("Name", "") for c in pixels if c.tag.endswith("}Channel")]
