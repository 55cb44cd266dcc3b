"""What every source shares: :class:`SourceInfo`, the :class:`Source` interface, thumbnails
and small helpers.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from segflow.errors import RegionError, SourceError
from segflow.geometry import Window
from segflow.io.remote import is_url
from segflow.io.store import GeoRef, SlideInfo
from segflow.stats import valid_and_finite

log = logging.getLogger(__name__)

__all__ = ["Source", "SourceInfo", "SourceKind"]


SourceKind = Literal["geotiff", "slide", "image"]

THUMB_SIDE = 1024
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


# ---------------------------------------------------------------------------- value objects
@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What a source holds, at the level it was opened at.

    Attributes
    ----------
    uri : absolute path of the file.
    kind : ``"geotiff"`` (GDAL-opened, georeferenced or VRT), ``"slide"`` (whole-slide image)
        or ``"image"`` (a plain pixel grid).
    height, width : pixels at the chosen level.
    bands : one name per band (GDAL description or colour interpretation; ``"red"``,
        ``"green"``, ``"blue"`` for RGB; ``"gray"`` for one band; ``"bandN"`` otherwise).
    dtype : numpy dtype name of :meth:`Source.read` results.
    nodata : the nodata value, or None.
    block : the native block/tile ``(rows, cols)``; reads aligned to it decode least.
    georef : CRS (WKT2 + EPSG) and GDAL geotransform of the chosen level's grid, or None.
    slide : whole-slide metadata, or None. ``mpp_x``/``mpp_y`` are microns per pixel *of the
        chosen level* (level-0 value times that level's downsample); ``downsample`` is the
        level's average downsample, as OpenSlide reports it.
    level_shapes : ``(height, width)`` of every level (one entry for a flat image).
    """

    uri: str
    kind: SourceKind
    height: int
    width: int
    bands: tuple[str, ...]
    dtype: str
    nodata: float | None
    block: tuple[int, int]
    georef: GeoRef | None
    slide: SlideInfo | None
    level_shapes: tuple[tuple[int, int], ...]

    @property
    def full_window(self) -> Window:
        """The window covering the whole image."""
        return Window(0, 0, self.height, self.width)


# ------------------------------------------------------------------------------ base class
class Source:
    """A window reader over one image at one level (use :func:`open_source` to make one).

    Subclasses implement ``_open_handle``, ``_close_handle``, ``_read`` and ``_read_valid``
    and set ``self.info`` in their constructor.
    """

    info: SourceInfo
    #: whether one handle may be shared by all threads (else one handle per thread)
    _shared_handle: ClassVar[bool] = False
    _TRANSIENT: ClassVar[tuple[str, ...]] = ("_handles", "_lock", "_local")

    def __init__(self, path: str | Path, level: int = 0) -> None:
        # a URL (s3://, https://, /vsicurl/...) is kept as given: GDAL opens it
        self.path: str | Path = str(path) if is_url(path) else Path(os.path.abspath(path))
        if not isinstance(level, int) or isinstance(level, bool) or level < 0:
            raise SourceError(f"level must be an integer >= 0, got {level!r}: pass e.g. level=0")
        self.level = level
        self._init_transient()

    @property
    def file(self) -> Path:
        """The local file (the readers that need one: tifffile, OpenSlide, Pillow)."""
        if not isinstance(self.path, Path):
            raise SourceError(
                f"{self.path!r} is not a local file: only GDAL-readable rasters (GeoTIFF, COG, "
                "VRT) are read from URLs"
            )
        return self.path

    # -------------------------------------------------------------- handles and pickling
    def _init_transient(self) -> None:
        self._handles: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in self._TRANSIENT:
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_transient()

    def _handle(self) -> Any:
        key = 0 if self._shared_handle else threading.get_ident()
        handle = self._handles.get(key)
        if handle is None:
            with self._lock:
                handle = self._handles.get(key)
                if handle is None:
                    handle = self._open_handle()
                    self._handles[key] = handle
        return handle

    def _open_handle(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close_handle(self, handle: Any) -> None:
        handle.close()

    def close(self) -> None:
        """Close every open handle (a later read reopens the file)."""
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for h in handles:
            try:
                self._close_handle(h)
            except Exception:  # closing must never raise
                log.debug("closing a handle of %s failed", self.path, exc_info=True)
        self._local = threading.local()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        i = getattr(self, "info", None)
        if i is None:
            return f"{type(self).__name__}({str(self.path)!r})"
        return (
            f"{type(self).__name__}({i.uri!r}, level={self.level}, {i.height}x{i.width}, "
            f"bands={i.bands}, dtype={i.dtype})"
        )

    # ------------------------------------------------------------------------- reading
    def read(self, window: Window) -> np.ndarray:
        """The pixels of ``window`` as ``(band, rows, cols)``, dtype ``info.dtype``.

        The window must lie inside the image (:class:`RegionError` otherwise).
        """
        self._check_window(window)
        return self._read(window)

    def read_valid(self, window: Window) -> np.ndarray:
        """The ``(rows, cols)`` boolean mask of pixels inside the data footprint.

        For float sources the pixels are read too: a pixel where any band is NaN or +/-inf
        is invalid (see :func:`valid_and_finite`).
        """
        if self._may_be_non_finite:
            return self.read_with_valid(window)[1]
        self._check_window(window)
        return self._read_valid(window)

    def read_with_valid(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """``(read(window), read_valid(window))``, decoding the pixels only once where possible.

        This is the one place where the reader's own mask (nodata, internal mask, alpha,
        tissue) meets the non-finite rule: every valid mask a source hands out comes from here
        (or, for integer sources, which have no non-finite values, from ``_read_valid``).
        """
        self._check_window(window)
        data = self._read(window)
        return data, valid_and_finite(data, self._valid_of(window, data))

    @property
    def _may_be_non_finite(self) -> bool:
        """Whether pixels of this source can be NaN or infinite (float and complex dtypes)."""
        return np.dtype(self.info.dtype).kind in "fc"

    def _valid_of(self, window: Window, data: np.ndarray) -> np.ndarray:
        """The valid mask of ``window`` given its already-read pixels (default: read it)."""
        return self._read_valid(window)

    def _read(self, window: Window) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read_valid(self, window: Window) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_window(self, window: Window) -> None:
        h, w = self.info.height, self.info.width
        if (
            window.size == 0
            or window.row_off < 0
            or window.col_off < 0
            or window.row_stop > h
            or window.col_stop > w
        ):
            raise RegionError(
                f"window {window} is empty or outside the image of {self.info.uri!r} "
                f"({h} x {w} pixels at level {self.level}): request a non-empty window within "
                f"rows 0..{h} and cols 0..{w}"
            )

    def _level_error(self, count: int) -> SourceError:
        return SourceError(
            f"level {self.level} is out of range for {str(self.path)!r}, which has {count} "
            f"level(s): pass a level from 0 to {count - 1}"
        )


def _thumbnail(read: Callable[[Window], np.ndarray], h: int, w: int) -> np.ndarray:
    """A ``(band, rows, cols)`` thumbnail, at most about ``THUMB_SIDE`` pixels a side.

    An image of up to 4096 x 4096 pixels is read in strips and subsampled; a larger one (a
    slide with no small level) by an 8 x 8 grid of 256-pixel windows, so the cost stays
    bounded whatever the slide's size.
    """
    if h * w <= 4096 * 4096:
        step = max(1, math.ceil(max(h, w) / THUMB_SIDE))
        rows = step * max(1, 512 // step)
        strips = [
            read(Window(r, 0, min(rows, h - r), w))[:, ::step, ::step] for r in range(0, h, rows)
        ]
        return np.concatenate(strips, axis=1)
    side, n = 256, 8
    parts = []
    for r in np.linspace(0, h - side, n).astype(int):
        row = [
            read(Window(int(r), int(c), side, side))[:, ::2, ::2]
            for c in np.linspace(0, w - side, n).astype(int)
        ]
        parts.append(np.concatenate(row, axis=2))
    return np.concatenate(parts, axis=1)


# ------------------------------------------------------------------------------- helpers
def _float_or_none(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _unique(names: Any) -> tuple[str, ...]:
    """Band names made unique by suffixing repeats with their 1-based position."""
    out = [str(n) for n in names]
    dup = {n for n in out if out.count(n) > 1}
    return tuple(f"{n}_{i}" if n in dup else n for i, n in enumerate(out, 1))


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."
