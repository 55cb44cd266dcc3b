"""The compiled core of the border weights: ``d1 + d2`` where the U-Net border term is kept.

For every object ``k`` of a label array this computes the exact Euclidean distance transform
of ``k`` over its bounding box grown by ``grow`` pixels (Meijster, Roerdink and Hesselink,
"A general algorithm for computing distance transforms in linear time", 2000: a column pass,
then a row pass over the lower envelope of parabolas, all in integers), and keeps a running
minimum and second minimum of the squared distance per pixel.

This is the same work as one ``scipy.ndimage.distance_transform_edt`` per object's crop (what
:mod:`segflow.weights` did before, and what its tests still compare against), but scipy's
transform is a call per object with its own allocations and a float feature transform: at
DSB nucleus density (one object per ~1000 px) those calls, not the arithmetic, were the
cost. Here the whole loop is one numba function over integer squared distances, which are
exact, so the distances (``sqrt`` of the same integers) are bit-identical to scipy's.

The array is worked through in tiles grown by the halo, with one set of tile-sized buffers
reused for all of them, and only the kept pixels come back (flat index, ``d1 + d2``): fresh
memory costs a page fault per 4 KiB, and Dask workers return freed memory to the system at
once (``MALLOC_TRIM_THRESHOLD_``), so per-pixel temporaries cost more than the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np

__all__ = ["kept_sums", "squared_limit"]

F = TypeVar("F", bound=Callable[..., Any])


def _jit(fn: F) -> F:
    """``numba.njit`` without the GIL, cached on disk where numba finds a writable place (beside
    this file, else the user's cache folder); else compiled once per process."""
    try:
        return cast(F, numba.njit(cache=True, nogil=True)(fn))
    except RuntimeError:  # "cannot cache function ...: no locator available" (read-only install)
        return cast(F, numba.njit(nogil=True)(fn))


def squared_limit(r: float) -> int:
    """The largest integer ``q`` with ``sqrt(q) <= r`` in float64 (what ``dist <= r`` keeps).

    >>> squared_limit(21.46), squared_limit(3.0)
    (460, 9)
    """
    q = max(math.floor(r * r), 0)
    while math.sqrt(q + 1) <= r:
        q += 1
    while q > 0 and math.sqrt(q) > r:
        q -= 1
    return q


def kept_sums(instances: np.ndarray, *, r: float, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Background pixels whose two nearest objects lie within ``d1 + d2 <= r``, and that sum.

    Parameters
    ----------
    instances
        2-D integer array of object ids, 0 = background; ids need not be contiguous.
    r
        The cut-off radius (pixels): distances above ``r`` do not count, nor sums above it.
    tile
        Side of the tiles (each grown by ``ceil(r)``) the array is worked through in; the
        result does not depend on it.

    Returns
    -------
    (index, sums)
        Flat (C-order) indices into ``instances``, tile by tile, and float64 ``d1 + d2`` there:
        ``sqrt(q1) + sqrt(q2)`` of the integer squared distances to the nearest and
        second-nearest object (equal where two objects are equally near).
    """
    inst = np.asarray(instances)
    if inst.dtype.kind not in "iu":
        raise TypeError(f"instances must be integers, got {inst.dtype}")
    # one compiled version for the stores' uint32 and one for everything else (a cast to int64
    # keeps ids distinct and non-zero ids non-zero, all the partition needs)
    inst = np.ascontiguousarray(inst if inst.dtype == np.uint32 else inst.astype(np.int64))
    return _kept_sums(inst, float(r), squared_limit(r), math.floor(r), math.ceil(r), int(tile))


@_jit
def _kept_sums(
    inst: np.ndarray, r: float, limit: int, grow: int, halo: int, tile: int
) -> tuple[np.ndarray, np.ndarray]:
    h, w = inst.shape
    side0 = min(tile + 2 * halo, h)
    side1 = min(tile + 2 * halo, w)
    lab = np.empty((side0, side1), np.int64)
    # int64: the squared cut-off exceeds int32 once r > 46340 px (a sigma of ~11k px)
    q1 = np.empty((side0, side1), np.int64)
    q2 = np.empty((side0, side1), np.int64)
    g = np.empty((side0, side1), np.int64)
    stack = np.empty(side1, np.int64)
    starts = np.empty(side1, np.int64)
    index = np.empty(h * w, np.int64)  # pages are only touched where a pixel is kept
    sums = np.empty(h * w, np.float64)
    n = 0
    for t0 in range(0, h, tile):
        for t1 in range(0, w, tile):
            g0, g1 = max(t0 - halo, 0), max(t1 - halo, 0)
            e0, e1 = min(t0 + tile + halo, h), min(t1 + tile + halo, w)
            count = _relabel(inst[g0:e0, g1:e1], lab)
            if count == 0:
                continue
            sub_lab = lab[: e0 - g0, : e1 - g1]
            sub1 = q1[: e0 - g0, : e1 - g1]
            sub2 = q2[: e0 - g0, : e1 - g1]
            sub1[:] = limit + 1
            sub2[:] = limit + 1
            boxes = _bounding_boxes(sub_lab, count)
            for k in range(1, count + 1):
                if boxes[k, 1] == 0:
                    continue
                b0 = max(boxes[k, 0] - grow, 0)
                b1 = min(boxes[k, 1] + grow, e0 - g0)
                c0 = max(boxes[k, 2] - grow, 0)
                c1 = min(boxes[k, 3] + grow, e1 - g1)
                _column_pass(sub_lab, k, b0, b1, c0, c1, g)
                for i in range(b1 - b0):
                    _row_pass(g, i, c1 - c0, b0 + i, c0, limit, stack, starts, sub1, sub2)
            for i in range(t0, min(t0 + tile, h)):
                for j in range(t1, min(t1 + tile, w)):
                    a = sub2[i - g0, j - g1]
                    if a <= limit and inst[i, j] == 0:
                        s = np.sqrt(np.float64(sub1[i - g0, j - g1])) + np.sqrt(np.float64(a))
                        if s <= r:
                            index[n] = i * w + j
                            sums[n] = s
                            n += 1
    return index[:n], sums[:n]


@_jit
def _relabel(block: np.ndarray, lab: np.ndarray) -> int:
    """Ids ``1..count`` of ``block``'s objects into ``lab[:h, :w]``; returns ``count``.

    An offset when the ids span at most the block's size (scene-unique ids of neighbours);
    else the ranks of the sorted distinct ids.
    """
    h, w = block.shape
    seen = False
    lo = np.int64(0)
    hi = np.int64(0)
    for i in range(h):
        for j in range(w):
            v = np.int64(block[i, j])
            if v != 0:
                if not seen:
                    lo = v
                    hi = v
                    seen = True
                lo = min(lo, v)
                hi = max(hi, v)
    if not seen:
        return 0
    if np.uint64(hi) - np.uint64(lo) < np.uint64(h * w):  # the true span, even if hi - lo overflows
        for i in range(h):
            for j in range(w):
                v = np.int64(block[i, j])
                lab[i, j] = v - lo + 1 if v != 0 else 0
        return int(np.uint64(hi) - np.uint64(lo)) + 1
    ids = np.unique(block)
    ids = ids[ids != 0]
    for i in range(h):
        for j in range(w):
            v = block[i, j]
            lab[i, j] = np.searchsorted(ids, v) + 1 if v != 0 else 0
    return ids.size


@_jit
def _bounding_boxes(lab: np.ndarray, count: int) -> np.ndarray:
    """``boxes[k] = (row0, row1, col0, col1)`` of object ``k`` (half-open); ``row1 = 0`` if absent."""
    h, w = lab.shape
    boxes = np.empty((count + 1, 4), np.int64)
    boxes[:, 0] = h
    boxes[:, 1] = 0
    boxes[:, 2] = w
    boxes[:, 3] = 0
    for i in range(h):
        for j in range(w):
            k = lab[i, j]
            if k > 0:
                boxes[k, 0] = min(boxes[k, 0], i)
                boxes[k, 1] = max(boxes[k, 1], i + 1)
                boxes[k, 2] = min(boxes[k, 2], j)
                boxes[k, 3] = max(boxes[k, 3], j + 1)
    return boxes


@_jit
def _column_pass(
    lab: np.ndarray, k: int, r0: int, r1: int, c0: int, c1: int, g: np.ndarray
) -> None:
    """``g[i, j]``: rows from crop pixel (i, j) to the nearest pixel of ``k`` in its column."""
    far = (r1 - r0) + (c1 - c0)  # more than any in-crop distance: "no pixel of k here"
    for j in range(c1 - c0):
        run = far
        for i in range(r1 - r0):
            if lab[r0 + i, c0 + j] == k:
                run = 0
            elif run < far:
                run += 1
            g[i, j] = run
        for i in range(r1 - r0 - 2, -1, -1):
            if g[i + 1, j] + 1 < g[i, j]:
                g[i, j] = g[i + 1, j] + 1


@_jit
def _row_pass(
    g: np.ndarray,
    i: int,
    width: int,
    row: int,
    c0: int,
    limit: int,
    stack: np.ndarray,
    starts: np.ndarray,
    q1: np.ndarray,
    q2: np.ndarray,
) -> None:
    """Exact squared distances along crop row ``i`` (lower envelope), folded into q1/q2."""
    top = 0
    stack[0] = 0
    starts[0] = 0
    for u in range(1, width):
        gu = g[i, u] * g[i, u]
        while top >= 0:
            s = stack[top]
            t = starts[top]
            if (t - s) * (t - s) + g[i, s] * g[i, s] <= (t - u) * (t - u) + gu:
                break
            top -= 1
        if top < 0:
            top = 0
            stack[0] = u
            starts[0] = 0
        else:
            s = stack[top]
            # first column from which parabola u lies below parabola s (floor division)
            sep = (u * u - s * s + gu - g[i, s] * g[i, s]) // (2 * (u - s)) + 1
            if sep < width:
                top += 1
                stack[top] = u
                starts[top] = sep
    for u in range(width - 1, -1, -1):
        s = stack[top]
        d = (u - s) * (u - s) + g[i, s] * g[i, s]
        if u == starts[top]:
            top -= 1
        if d <= limit:
            a = q1[row, c0 + u]
            if d < a:
                q2[row, c0 + u] = a
                q1[row, c0 + u] = d
            elif d < q2[row, c0 + u]:
                q2[row, c0 + u] = d
