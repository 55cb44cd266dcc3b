"""Object instances from a class map larger than memory: connected components, window by window.

An instance is a 4-connected region of pixels of one class (of the classes asked for): two
touching objects of different classes stay two instances, and the border-weighted U-Net's
thin background gaps between touching objects separate them. 4-connectivity is also the
connectivity of the polygons (``rasterio.features.shapes``), so each instance is exactly one
polygon.

Three streaming passes over ``block`` x ``block`` windows, in row-major order:

1. label each window (``skimage.measure.label``: regions of equal value) under provisional
   ids unique over the whole array, written to ``out``; record each provisional id's class,
   pixel count and first pixel in raster order, and the pairs of ids that meet across the
   window's left and top edges (same class on both sides);
2. join the provisional ids that meet (``scipy.sparse.csgraph.connected_components``) and
   number the joined objects ``1..N`` in the raster order of their first pixel;
3. rewrite ``out`` through that lookup table.

The ids are therefore a pure function of the class map: the same whatever the window, tile,
chunk or worker count, and equal to a whole-array ``scipy.ndimage.label`` renumbered by first
pixel (the tests compare with exactly that). dask-image's ``ndmeasure.label`` merges chunks
the same way but labels a boolean mask (touching objects of different classes would merge)
and numbers objects in chunk order, so its ids change with the chunking; hence this module.

Memory: one window of pixels, one row of the image (the seam above the current windows), and
a few numbers per object (not per pixel).

Examples
--------
>>> import numpy as np
>>> cm = np.array([[1, 1, 0, 2], [0, 1, 0, 2], [1, 0, 0, 0]], "uint8")
>>> out = np.zeros(cm.shape, "uint32")
>>> table = label_instances(cm, out, classes=[1, 2], block=2)
>>> out.tolist()
[[1, 1, 0, 2], [0, 1, 0, 2], [3, 0, 0, 0]]
>>> table.count, table.classes.tolist(), table.pixels.tolist()
(3, [0, 1, 2, 1], [0, 3, 2, 1])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segflow.errors import ConfigError, option
from segflow.geometry import BlockGrid, Window

__all__ = [
    "INSTANCE_DTYPE",
    "InstanceTable",
    "label_instances",
    "object_classes",
    "rank_by_first",
]

#: dtype of instance ids (0: no object).
INSTANCE_DTYPE = np.dtype("uint32")


@dataclass(frozen=True)
class InstanceTable:
    """What :func:`label_instances` found: per instance id (index 0: no object).

    Attributes
    ----------
    count
        Number of instances ``N``; ids are ``1..N``.
    classes
        ``(N + 1,)`` class id of each instance (0 at index 0).
    pixels
        ``(N + 1,)`` pixel count of each instance (0 at index 0).
    """

    count: int
    classes: np.ndarray
    pixels: np.ndarray


@dataclass
class _Pass1:
    """What the labelling pass records, per provisional id (index 0 unused)."""

    width: int
    first: list[np.ndarray] = field(default_factory=lambda: [np.zeros(1, "int64")])
    cls: list[np.ndarray] = field(default_factory=lambda: [np.zeros(1, "int64")])
    pixels: list[np.ndarray] = field(default_factory=lambda: [np.zeros(1, "int64")])
    pairs: list[np.ndarray] = field(default_factory=list)
    next_id: int = 1


def object_classes(
    requested: Iterable[int] | None, ids: Iterable[int], *, name: str
) -> tuple[int, ...]:
    """The class ids whose objects count: ``requested`` (the option ``name``), checked
    against the class table's ``ids``, or by default every class but 0."""
    ids = list(ids)
    wanted = tuple(requested) if requested else tuple(i for i in ids if i != 0)
    unknown = sorted(set(wanted) - set(ids))
    if unknown:
        raise ConfigError(f"{option(name)} names {unknown}, which are not among the classes {ids}")
    if not wanted:
        raise ConfigError(f"the only class is 0: name it in {option(name)} to count its objects")
    return wanted


def label_instances(
    class_map: Any,
    out: Any,
    *,
    classes: Iterable[int],
    block: int = 1024,
) -> InstanceTable:
    """Write the instance ids of ``class_map``'s objects of ``classes`` into ``out``.

    Parameters
    ----------
    class_map
        ``(y, x)`` integer class ids; any array-like with numpy slicing (a zarr array is
        read one ``block`` window at a time).
    out
        ``(y, x)`` array of the same shape that takes uint32 ids (a zarr array, a numpy
        array); written twice (provisional ids, then the final ones).
    classes
        The class ids whose objects are instances (e.g. every class but background).
    block
        Side of the windows read and labelled (memory: a few windows of pixels).

    Returns
    -------
    InstanceTable
        The number of instances and each one's class and pixel count.
    """
    shape = tuple(int(s) for s in class_map.shape)
    wanted = np.array(sorted({int(c) for c in classes}), dtype="int64")
    _check(shape, tuple(int(s) for s in out.shape), wanted, block)
    height, width = shape
    grid = BlockGrid(height, width, block)
    found = _label_windows(class_map, out, grid, wanted)
    lookup, table = _join(found)
    for _, win in grid:
        out[win.slices] = lookup[np.asarray(out[win.slices])]
    return table


def _check(shape: tuple[int, ...], out_shape: tuple[int, ...], wanted: np.ndarray,
           block: int) -> None:  # fmt: skip
    if len(shape) != 2:
        raise ConfigError(f"the class map must be 2-D (y, x), got shape {shape}")
    if out_shape != shape:
        raise ConfigError(f"instance output shape {out_shape} differs from the map's {shape}")
    if not wanted.size:
        raise ConfigError("no instance classes given: name the classes whose objects count")
    if block < 2:
        raise ConfigError(f"block must be >= 2 pixels, got {block}")


def _label_windows(class_map: Any, out: Any, grid: BlockGrid, wanted: np.ndarray) -> _Pass1:
    """Pass 1: provisional ids into ``out``; classes, sizes, first pixels and seam pairs."""
    found = _Pass1(width=grid.width)
    seam = np.zeros(grid.width, "int64")  # provisional ids of the row above the current row
    seam_cls = np.full(grid.width, -1, "int64")
    left = left_cls = np.zeros(0, "int64")
    for win, data in _windows(class_map, grid):
        start = found.next_id
        lab, cls = _label_window(data, wanted, found)
        out[win.slices] = lab.astype(INSTANCE_DTYPE)
        if win.col_off > 0:
            found.pairs.append(_meeting(left, left_cls, lab[:, 0], cls[:, 0]))
        if win.row_off > 0:
            cols = slice(win.col_off, win.col_stop)
            found.pairs.append(_meeting(seam[cols], seam_cls[cols], lab[0], cls[0]))
        left, left_cls = lab[:, -1], cls[:, -1]
        _record(found, lab, cls, win, start)
        bottom = slice(win.col_off, win.col_stop)
        seam[bottom], seam_cls[bottom] = lab[-1], cls[-1]
    return found


def _windows(class_map: Any, grid: BlockGrid) -> Iterator[tuple[Window, np.ndarray]]:
    for _, win in grid:
        yield win, np.asarray(class_map[win.slices])


def _label_window(
    data: np.ndarray, wanted: np.ndarray, found: _Pass1
) -> tuple[np.ndarray, np.ndarray]:
    """Provisional ids (offset past every earlier window's) and classes (-1: no object)."""
    from skimage.measure import label

    member = np.isin(data, wanted)
    cls = np.where(member, data.astype("int64"), -1)
    # equal-value regions; +1 so that class 0 (when asked for) differs from "no object"
    lab = label(np.where(member, cls + 1, 0), background=0, connectivity=1).astype("int64")
    n = int(lab.max())
    if n:
        lab[lab > 0] += found.next_id - 1
        found.next_id += n
    if found.next_id - 1 > np.iinfo(INSTANCE_DTYPE).max:  # before a provisional id wraps
        raise ConfigError(f"{found.next_id - 1} objects do not fit uint32 instance ids")
    return lab, cls


def _meeting(a: np.ndarray, a_cls: np.ndarray, b: np.ndarray, b_cls: np.ndarray) -> np.ndarray:
    """The distinct ``(a, b)`` id pairs of neighbouring pixels of one class, as ``(k, 2)``."""
    touch = (a > 0) & (b > 0) & (a_cls == b_cls)
    return np.unique(np.column_stack((a[touch], b[touch])), axis=0)


def _record(found: _Pass1, lab: np.ndarray, cls: np.ndarray, win: Window, start: int) -> None:
    """Each new id's first pixel (raster order over the whole array), class and size.

    The window's ids are ``start .. found.next_id - 1``: counted by ``bincount``, first
    pixels by ``minimum.at`` (no sort of the window's pixels).
    """
    n = found.next_id - start
    if not n:
        return
    flat = lab.ravel()
    where = np.flatnonzero(flat)
    local = flat[where] - start
    first = np.full(n, flat.size, "int64")
    np.minimum.at(first, local, where)
    rows, cols = np.divmod(first, win.width)
    found.first.append((win.row_off + rows) * found.width + win.col_off + cols)
    found.cls.append(cls.ravel()[first])
    found.pixels.append(np.bincount(local, minlength=n).astype("int64"))


def rank_by_first(first: np.ndarray) -> np.ndarray:
    """Ids ``1..N`` for ``N`` objects, numbered in the raster order of their ``first`` pixels
    (flat indices into the whole array): the numbering every instance id here follows.

    >>> rank_by_first(np.array([40, 3, 17])).tolist()
    [3, 1, 2]
    """
    rank = np.empty(first.size, "int64")
    rank[np.argsort(first, kind="stable")] = np.arange(1, first.size + 1)
    return rank


def _join(found: _Pass1) -> tuple[np.ndarray, InstanceTable]:
    """Pass 2: provisional id -> final id (numbered by first pixel), and the final table."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = found.next_id  # provisional ids 1..n-1, plus 0
    first = np.concatenate(found.first)
    cls = np.concatenate(found.cls)
    pixels = np.concatenate(found.pixels)
    pairs = np.concatenate(found.pairs) if found.pairs else np.zeros((0, 2), "int64")
    graph = coo_matrix((np.ones(len(pairs), "int8"), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    # each object's first pixel: the least first pixel of its pieces
    start = np.full(comp.max() + 1, np.iinfo("int64").max, "int64")
    np.minimum.at(start, comp[1:], first[1:])
    objects = np.unique(comp[1:])
    rank = np.empty(comp.max() + 1, "int64")
    rank[objects] = rank_by_first(start[objects])
    lookup = np.zeros(n, INSTANCE_DTYPE)
    lookup[1:] = rank[comp[1:]]
    count = int(objects.size)
    final_cls = np.zeros(count + 1, "int64")
    final_cls[lookup[1:]] = cls[1:]
    final_px = np.zeros(count + 1, "int64")
    np.add.at(final_px, lookup[1:], pixels[1:])
    return lookup, InstanceTable(count=count, classes=final_cls, pixels=final_px)
