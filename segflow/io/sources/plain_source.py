"""Plain images (``image``): PNG/JPEG decoded once, and TIFFs with no georeference that are
not slides, read by window.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from segflow.errors import SourceError
from segflow.geometry import Window
from segflow.io.sources.base import TIFF_MAGICS, SourceInfo, _one_line
from segflow.io.sources.files import _head
from segflow.io.sources.tiff_source import _tiff_bands, _tiff_has_alpha, _TiffBase

log = logging.getLogger(__name__)

__all__ = ["PlainImageSource"]


# ------------------------------------------------------------------------- plain images
_PIL_MODES: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    # mode: (dtype, bands, convert to)
    "1": ("uint8", ("gray",), "L"),
    "L": ("uint8", ("gray",), None),
    "LA": ("uint8", ("gray", "alpha"), None),
    "P": ("uint8", ("red", "green", "blue"), "RGB"),
    "PA": ("uint8", ("red", "green", "blue", "alpha"), "RGBA"),
    "RGB": ("uint8", ("red", "green", "blue"), None),
    "RGBA": ("uint8", ("red", "green", "blue", "alpha"), None),
    "RGBX": ("uint8", ("red", "green", "blue"), "RGB"),
    "CMYK": ("uint8", ("cyan", "magenta", "yellow", "black"), None),
    "YCbCr": ("uint8", ("red", "green", "blue"), "RGB"),
    "I;16": ("uint16", ("gray",), None),
    "I;16L": ("uint16", ("gray",), None),
    "I;16B": ("uint16", ("gray",), None),
    "I": ("int32", ("gray",), None),
    "F": ("float32", ("gray",), None),
}


class PlainImageSource(_TiffBase):
    """A plain pixel grid with no georeference: PNG/JPEG (Pillow) or a TIFF (tifffile).

    PNG and JPEG cannot be read by window: the whole image is decoded on the first read and
    cached in memory, so use them only for small images (convert large ones to a tiled TIFF
    or COG). A TIFF is read window by window through Zarr. Palette images become RGB(A).
    Gray pictures stored as RGB(A) keep all their bands. ``read_valid`` is ``alpha > 0``
    when there is an alpha band, else all True.
    """

    def __init__(self, path: str | Path, level: int = 0) -> None:
        super().__init__(path, level)
        self._backend: Literal["pil", "tiff"]
        head = _head(self.file)
        if head.startswith(TIFF_MAGICS):
            self._backend = "tiff"
            tif, self._layout, shapes, dtype, nbands, block = self._probe_tiff()
            try:
                page0 = tif.series[0].levels[0].pages[0]
                bands = _tiff_bands(tif, page0, nbands, "S" in self._layout.axes)
                self._alpha = _tiff_has_alpha(page0, nbands)
            finally:
                tif.close()
            h, w = shapes[self.level]
        else:
            self._backend = "pil"
            dtype, bands, h, w = self._probe_pil()
            shapes, block = [(h, w)], (h, w)
            self._alpha = bands[-1] == "alpha"
        self.info = SourceInfo(
            uri=str(self.path),
            kind="image",
            height=h,
            width=w,
            bands=bands,
            dtype=dtype,
            nodata=None,
            block=block,
            georef=None,
            slide=None,
            level_shapes=tuple(shapes),
        )

    # ----------------------------------------------------------------------- Pillow
    def _probe_pil(self) -> tuple[str, tuple[str, ...], int, int]:
        from PIL import Image

        if self.level != 0:
            raise self._level_error(1)
        try:
            with Image.open(self.path) as img:
                mode, (w, h) = img.mode, img.size
                fmt = img.format
            with Image.open(self.path) as img:
                img.verify()  # PNG: checks every chunk's CRC, so truncation shows up now
        except Image.DecompressionBombError as err:
            raise SourceError(
                f"{str(self.path)!r} is too large for a PNG/JPEG source "
                f"({_one_line(err)}): convert it to a tiled TIFF or COG"
            ) from None
        except Exception as err:
            raise SourceError(
                f"cannot decode image {str(self.path)!r} ({_one_line(err)}): "
                "check the file is complete"
            ) from None
        spec = _PIL_MODES.get(mode)
        if spec is not None:
            return spec[0], spec[1], h, w
        log.debug(
            "unusual Pillow mode %s (%s) in %s: decoding to learn the layout", mode, fmt, self.path
        )
        arr = self._decode_pil()
        return str(arr.dtype), tuple(f"band{i}" for i in range(1, arr.shape[0] + 1)), h, w

    def _decode_pil(self) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(self.path) as img:
                spec = _PIL_MODES.get(img.mode)
                if spec is not None and spec[2] is not None:
                    conv = img.convert(spec[2])
                else:
                    img.load()
                    conv = img
                arr = np.asarray(conv)
        except Exception as err:
            raise SourceError(
                f"cannot decode image {str(self.path)!r} ({_one_line(err)}): "
                "check the file is complete"
            ) from None
        arr = arr[np.newaxis] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("="), copy=False))

    def _open_handle(self) -> Any:
        if self._backend == "tiff":
            return super()._open_handle()
        return self._decode_pil()

    def _close_handle(self, handle: Any) -> None:
        if self._backend == "tiff":
            handle.close()

    def _read(self, window: Window) -> np.ndarray:
        if self._backend == "pil":
            return self._full()[(slice(None), *window.slices)].copy()
        return super()._read(window)

    def _full(self) -> np.ndarray:
        # one decoded copy per process, shared by threads
        handle = self._handles.get(0)
        if handle is None:
            with self._lock:
                handle = self._handles.get(0)
                if handle is None:
                    handle = self._decode_pil()
                    self._handles[0] = handle
        return handle

    def _read_valid(self, window: Window) -> np.ndarray:
        if not self._alpha:
            return np.ones(window.shape, dtype=bool)
        px = self._full()[-1][window.slices] if self._backend == "pil" else self._pixels(window)[-1]
        return np.asarray(px > 0)
