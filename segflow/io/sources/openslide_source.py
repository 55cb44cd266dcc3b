"""Whole-slide images through OpenSlide (``slide``), as RGB. Valid = tissue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segflow.errors import SourceError
from segflow.geometry import Window
from segflow.io.sources.base import Source, SourceInfo, _float_or_none, _one_line, _thumbnail
from segflow.io.store import SlideInfo
from segflow.tissue import _slide_threshold, tissue_mask

__all__ = ["OpenSlideSource"]


# ---------------------------------------------------------------------------- OpenSlide
class OpenSlideSource(Source):
    """Whole-slide images through OpenSlide; pixels as RGB uint8.

    ``read_region`` positions a region in level-0 coordinates: a level-``k`` window starts at
    ``(col * downsample, row * downsample)``. That is exact only for integer downsamples, so
    :func:`open_source` reads TIFF-based slides whose level has a non-integer downsample
    through :class:`TiffSlideSource` instead.
    """

    _shared_handle = True  # OpenSlide is thread-safe

    def __init__(self, path: str | Path, level: int = 0) -> None:
        super().__init__(path, level)
        try:
            osr = self._handle()
        except Exception as err:
            raise SourceError(
                f"OpenSlide cannot open {str(self.path)!r} ({_one_line(err)}): "
                "check the slide file (and its companion files) is complete"
            ) from None
        if level >= osr.level_count:
            raise self._level_error(osr.level_count)
        props = osr.properties
        w, h = osr.level_dimensions[level]
        w0, h0 = osr.level_dimensions[0]
        ds = float(osr.level_downsamples[level])
        self._downsample = ds
        mpp_x = _float_or_none(props.get("openslide.mpp-x"))
        mpp_y = _float_or_none(props.get("openslide.mpp-y"))
        tile_h = props.get(f"openslide.level[{level}].tile-height")
        tile_w = props.get(f"openslide.level[{level}].tile-width")
        last = osr.level_count - 1
        lw, lh = osr.level_dimensions[last]
        lds = float(osr.level_downsamples[last])

        def read_last(win: Window) -> np.ndarray:
            loc = (round(win.col_off * lds), round(win.row_off * lds))
            region = osr.read_region(loc, last, (win.width, win.height))
            return np.asarray(region).transpose(2, 0, 1)

        thumb = _thumbnail(read_last, int(lh), int(lw))
        self.threshold = _slide_threshold(thumb[:3], thumb[3])
        self.info = SourceInfo(
            uri=str(self.path),
            kind="slide",
            height=int(h),
            width=int(w),
            bands=("red", "green", "blue"),
            dtype="uint8",
            nodata=None,
            block=(int(tile_h), int(tile_w)) if tile_h and tile_w else (256, 256),
            georef=None,
            slide=SlideInfo(
                mpp_x=None if mpp_x is None else mpp_x * (w0 / w),
                mpp_y=None if mpp_y is None else mpp_y * (h0 / h),
                objective_power=_float_or_none(props.get("openslide.objective-power")),
                vendor=props.get("openslide.vendor"),
                level=level,
                downsample=ds,
            ),
            level_shapes=tuple((int(b), int(a)) for a, b in osr.level_dimensions),
        )

    def _open_handle(self) -> Any:
        import openslide

        return openslide.OpenSlide(str(self.path))

    def _rgba(self, window: Window) -> np.ndarray:
        cached = getattr(self._local, "last", None)
        if cached is not None and cached[0] == window:
            return cached[1]
        ds = self._downsample
        loc = (round(window.col_off * ds), round(window.row_off * ds))
        try:
            region = self._handle().read_region(loc, self.level, (window.width, window.height))
        except Exception as err:
            raise SourceError(
                f"OpenSlide failed reading {window} of {self.info.uri!r} ({_one_line(err)}): "
                "check the slide file is complete"
            ) from None
        rgba = np.asarray(region)  # (rows, cols, 4), un-premultiplied
        self._local.last = (window, rgba)
        return rgba

    def _read(self, window: Window) -> np.ndarray:
        return np.ascontiguousarray(self._rgba(window)[..., :3].transpose(2, 0, 1))

    def _read_valid(self, window: Window) -> np.ndarray:
        rgba = self._rgba(window)
        return tissue_mask(rgba[..., :3].transpose(2, 0, 1), self.threshold, rgba[..., 3])
