"""What every label reader shares: the pixel grid, label blocks, the reader interface, class
tables and small helpers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segflow.config import ClassDef
from segflow.errors import LabelError, RegionError
from segflow.geometry import Window
from segflow.io.store import GeoRef

if TYPE_CHECKING:
    import pyproj
    from affine import Affine


__all__ = ["LabelBlock", "LabelReader", "PixelGrid", "label_dtype"]

log = logging.getLogger(__name__)

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
        where = (
            f"EPSG:{self.georef.epsg}"
            if self.georef and self.georef.epsg
            else ("a custom CRS" if self.georef else "pixel coordinates")
        )
        return (
            f"{self.height} x {self.width} pixels, bounds {_fmt_bounds(self.bounds())} in {where}"
        )

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


# --------------------------------------------------------------------------- small helpers
def _boxes_intersect(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _fmt_bounds(b: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.10g}" for v in b) + ")"


def _crs_text(crs: Any) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else repr(crs.name)


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
