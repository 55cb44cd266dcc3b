"""What every label reader shares: the pixel grid, label blocks, the reader interface, class
tables and small helpers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segflow.config import ClassDef
from segflow.errors import LabelError
from segflow.geometry import Window
from segflow.georef import PixelGrid

__all__ = ["LabelBlock", "LabelReader", "PixelGrid", "label_dtype"]

log = logging.getLogger(__name__)

_MAX_INSTANCE = np.iinfo(np.uint32).max


# --------------------------------------------------------------------------- value objects
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
