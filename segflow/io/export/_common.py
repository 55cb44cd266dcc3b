"""Helpers shared by the exporters: scratch paths, input checks, class tables, windows.

:func:`~segflow.atomic.atomic_output` (every exporter's way of writing) is re-exported here.

Internal module; the public API is re-exported by :mod:`segflow.io.export`.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from segflow.atomic import atomic_output, remove_with_siblings
from segflow.config import ClassDef
from segflow.errors import ConfigError, LabelError
from segflow.geometry import BlockGrid, Window

log = logging.getLogger(__name__)

__all__ = [
    "ArrayLike",
    "ClassTable",
    "IdChecker",
    "atomic_output",
    "check_labels",
    "count_values",
    "downsample_mode2",
    "iter_windows",
    "publish_directory",
    "read_window",
    "scratch_path",
]


class ArrayLike(Protocol):
    """What the exporters read: ``.shape``, ``.dtype`` and numpy basic slicing.

    A ``zarr.Array`` (e.g. ``SceneStore.array("prediction/labels")``), a ``numpy.ndarray`` or
    a ``dask.array.Array`` all qualify; only one window is read at a time.
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    def __getitem__(self, key: Any) -> Any: ...


# --------------------------------------------------------------------------- outputs
@contextlib.contextmanager
def scratch_path(beside: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a unique temporary path beside ``beside``; always removed afterwards."""
    ref = Path(beside)
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{uuid.uuid4().hex[:12]}.scratch{suffix}")
    try:
        yield tmp
    finally:
        if tmp.is_dir():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        remove_with_siblings(tmp)


def publish_directory(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final`` (beside it), replacing ``final``.

    A directory cannot be swapped in one :func:`os.replace`: an older ``final`` is renamed
    aside first, ``tmp`` renamed into place, then the old one deleted; if the second rename
    fails, the old one is put back. A reader sees the old tree or the new one (or, for an
    instant, none), never a mix.
    """
    import os
    import shutil

    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.old")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------- class table
class ClassTable:
    """The class table as the exporters need it: ids, names, colours, lookups."""

    def __init__(self, classes: Iterable[ClassDef | Mapping[str, Any]]) -> None:
        defs = tuple(c if isinstance(c, ClassDef) else ClassDef.model_validate(c) for c in classes)
        if not defs:
            raise ConfigError("the class table is empty: pass classes=[ClassDef(id=0, ...), ...]")
        ids = [c.id for c in defs]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ConfigError(
                f"class ids must be unique, got duplicates {dup}: fix the class table"
            )
        self.classes = tuple(sorted(defs, key=lambda c: c.id))
        self.by_id = {c.id: c for c in self.classes}

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.classes)

    def name(self, class_id: int) -> str:
        return self.by_id[class_id].name

    def tags(self) -> dict[str, str]:
        """GDAL metadata items naming the classes (``CLASS_<id>=name``, plus JSON)."""
        import json

        out = {f"CLASS_{c.id}": c.name for c in self.classes}
        out["SEGFLOW_CLASSES"] = json.dumps([c.model_dump() for c in self.classes])
        return out


def check_labels(labels: Any, *, what: str = "labels", ndim: int = 2) -> tuple[int, ...]:
    """Check that ``labels`` is an array-like of integers with ``ndim`` dimensions."""
    shape = getattr(labels, "shape", None)
    dtype = getattr(labels, "dtype", None)
    if shape is None or dtype is None or not hasattr(labels, "__getitem__"):
        raise ConfigError(
            f"{what} must be an array-like with .shape, .dtype and slicing (zarr/numpy), "
            f"got {type(labels).__name__}"
        )
    if len(shape) != ndim:
        dims = "(y, x)" if ndim == 2 else "(class, y, x)"
        raise ConfigError(f"{what} must be {ndim}-D {dims}, got shape {tuple(shape)}")
    if any(int(s) <= 0 for s in shape):
        raise ConfigError(f"{what} is empty: shape {tuple(shape)}")
    return tuple(int(s) for s in shape)


def check_integer_dtype(dtype: Any, *, what: str, allowed: Sequence[str]) -> np.dtype[Any]:
    dt = np.dtype(dtype)
    if dt.name not in allowed:
        raise ConfigError(
            f"{what} dtype must be one of {list(allowed)}, got {dt.name}: cast the class ids first"
        )
    return dt


def check_nodata(nodata: int | None, dtype: np.dtype[Any], table: ClassTable) -> int | None:
    """Check the nodata value fits ``dtype`` and is not also a class id."""
    if nodata is None:
        return None
    if isinstance(nodata, float) and not float(nodata).is_integer():
        raise ConfigError(f"nodata must be an integer class value, got {nodata!r}")
    value = int(nodata)
    info = np.iinfo(dtype)
    if not info.min <= value <= info.max:
        raise ConfigError(
            f"nodata {value} does not fit the labels' dtype {dtype.name} "
            f"({info.min}..{info.max}): pass e.g. nodata={info.max}"
        )
    if value in table.by_id:
        raise ConfigError(
            f"nodata {value} is also class {table.name(value)!r} in the class table: "
            "choose a value outside the table (e.g. 255)"
        )
    return value


FEW_VALUES = 8  # up to this many values are counted one comparison each


def count_values(block: np.ndarray, values: Sequence[int]) -> list[int]:
    """How many pixels of ``block`` equal each of ``values``.

    Up to :data:`FEW_VALUES` values (the usual class table): one vectorized comparison each,
    several times faster than ``np.bincount``, which first widens every uint8 pixel to
    int64; more values of an unsigned ``block``: one ``np.bincount``.

    Examples
    --------
    >>> count_values(np.array([[0, 1], [1, 7]], np.uint8), [1, 7, 9])
    [2, 1, 0]
    """
    if len(values) > FEW_VALUES and block.dtype.kind == "u":
        n = np.bincount(block.ravel())
        return [int(n[v]) if 0 <= v < n.size else 0 for v in values]
    return [int(np.count_nonzero(block == v)) for v in values]


class IdChecker:
    """Raise :class:`LabelError` on values that are neither a class id nor nodata.

    For a few allowed values, :func:`count_values` (a few times faster than a gather); else
    a boolean lookup table for unsigned 8/16-bit labels (one gather per pixel), ``np.isin``
    otherwise.
    """

    def __init__(self, table: ClassTable, dtype: np.dtype[Any], nodata: int | None) -> None:
        self.table = table
        allowed = [*table.ids, *([] if nodata is None else [int(nodata)])]
        self.allowed = np.array(sorted(set(allowed)), dtype="int64")
        # few allowed values: counting them is the check (see __call__)
        self.few: list[int] | None = (
            self.allowed.tolist() if len(self.allowed) <= FEW_VALUES else None
        )
        self.lut: np.ndarray | None = None
        if dtype.kind == "u" and dtype.itemsize <= 2:
            size = int(np.iinfo(dtype).max) + 1
            self.lut = np.zeros(size, dtype=bool)
            self.lut[self.allowed[self.allowed < size]] = True

    def __call__(self, block: np.ndarray, window: Window) -> None:
        if self.few is not None and sum(count_values(block, self.few)) == block.size:
            return
        ok = self.lut[block] if self.lut is not None else np.isin(block, self.allowed)
        if not ok.all():
            bad = np.unique(block[~ok])[:10]
            raise LabelError(
                f"labels hold values {bad.tolist()} that are not in the class table "
                f"{list(self.table.ids)} nor nodata (first seen in window {window}): "
                "add them to the class table or pass the right nodata"
            )


# --------------------------------------------------------------------------- windows
def iter_windows(height: int, width: int, size: int) -> Iterator[Window]:
    """Row-major windows of ``size`` x ``size`` (clipped at the edges) covering the array."""
    for _, w in BlockGrid(height, width, size):
        yield w


def read_window(arr: Any, window: Window) -> np.ndarray:
    """Read one window of the last two axes as a numpy array."""
    return np.asarray(arr[(..., *window.slices)])


def downsample_mode2(
    labels: np.ndarray, method: Literal["mode", "nearest"] = "mode", *, nodata: int | None = None
) -> np.ndarray:
    """Halve a class-id raster: each output pixel is the most frequent id of its 2 x 2 block
    (``method="nearest"``: its top-left pixel).

    ``nodata`` pixels never win over a class id (a block is nodata only when all four are);
    ties go to the first of (top-left, top-right, bottom-left, bottom-right). Odd sizes give
    ``ceil(n / 2)`` pixels, the last from one row/column, like GDAL's overviews.

    GDAL's ``mode`` overview resampling does the same but took 22 ns per pixel here (20 s for
    a gigapixel mask, every level read from full resolution); this vectorized 2 x 2 vote
    builds each level from the previous one while the mask streams through.

    Examples
    --------
    >>> downsample_mode2(np.array([[1, 1, 2], [0, 1, 2]], np.uint8))
    array([[1, 2]], dtype=uint8)
    >>> downsample_mode2(np.array([[255, 255], [255, 3]], np.uint8), nodata=255)
    array([[3]], dtype=uint8)
    """
    if method == "nearest":
        return labels[::2, ::2].copy()
    h, w = labels.shape
    if h % 2 or w % 2:  # repeat the last row/column: each pixel counts twice, the mode stays
        labels = np.pad(labels, ((0, h % 2), (0, w % 2)), mode="edge")
    hh, ww = labels.shape[0] // 2, labels.shape[1] // 2
    # the four pixels of each block as contiguous planes (strided views are 3x slower)
    q = np.ascontiguousarray(labels.reshape(hh, 2, ww, 2).transpose(1, 3, 0, 2)).reshape(4, hh, ww)
    best = _vote_closed_form(q)  # element-wise over every block: no gathering of mixed ones
    if nodata is not None:
        # blocks holding nodata and a class id need the counting vote; nodata is rare
        nd = q == nodata
        fix = np.flatnonzero((nd[0] | nd[1] | nd[2] | nd[3]) & ~(nd[0] & nd[1] & nd[2] & nd[3]))
        if fix.size:
            best.reshape(-1)[fix] = _vote_counting(q.reshape(4, -1)[:, fix], nodata)
    return best


def _vote_closed_form(q: np.ndarray) -> np.ndarray:
    """The most frequent of the four ``q[i]``, element-wise (ties: the first); no nodata.

    From the six pairwise comparisons, over every block (uniform ones too: cheaper than
    finding and gathering the mixed ones). Of four pixels, the first one wins whenever it
    has a partner (no other id can have more than two votes, and a 2-2 tie goes to the
    first); otherwise the second wins if it has a partner, else the third if the last two
    agree, else (all different) the first.
    """
    first_paired = (q[0] == q[1]) | (q[0] == q[2]) | (q[0] == q[3])
    second_paired = (q[1] == q[2]) | (q[1] == q[3])
    best = q[0].copy()
    np.copyto(best, q[1], where=~first_paired & second_paired)
    np.copyto(best, q[2], where=~first_paired & ~second_paired & (q[2] == q[3]))
    return best


def _vote_counting(q: np.ndarray, nodata: int) -> np.ndarray:
    """The most frequent of each column of ``q`` (4, n), nodata never winning (unless all
    four are nodata); ties: the first. By counting each pixel's votes."""
    eq = {(i, j): q[i] == q[j] for i in range(4) for j in range(i + 1, 4)}
    best = q[0].copy()
    best_n = np.full(q.shape[1], -1, np.int8)
    for c in range(4):
        n = np.ones(q.shape[1], np.int8)  # votes for q[c]: itself and every equal pixel
        for o in range(4):
            if o != c:
                n += eq[min(c, o), max(c, o)]
        n[q[c] == nodata] = 0
        better = n > best_n  # strict: ties keep the earlier pixel
        np.copyto(best, q[c], where=better)
        np.copyto(best_n, n, where=better)
    return best
