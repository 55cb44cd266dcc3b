"""Split touching objects: a watershed on each instance's own distance transform.

Connected components merge touching objects of one class (nuclei pressed together, adjoining
buildings) whenever the prediction leaves no background between them. This splits each
instance of :func:`segflow.instances.label_instances` along the necks of its shape:

- the Euclidean distance transform of the instance's own pixels (``scipy.ndimage``);
- markers: its h-maxima of height ``depth`` (``skimage.morphology.h_maxima``; a neck at
  least ``depth`` pixels narrower than the two bodies it joins separates them; a plateau is
  one marker);
- ``skimage.segmentation.watershed`` of the negated distance from those markers, within the
  instance (4-connected basins).

Each instance is processed alone, from its own pixels in its bounding box, so the result does
not depend on windows, tiles or chunks; the pieces are numbered ``1..N`` in raster order of
their first pixel like :func:`~segflow.instances.label_instances`'s ids. Cost: one small
watershed per object (about a millisecond for a nucleus), which is why it is an option.

Memory: the bounding boxes (four numbers per object), one window of ids and the union of the
bounding boxes of the objects that start in it.

Examples
--------
>>> import numpy as np
>>> yy, xx = np.mgrid[:20, :34]
>>> two = ((yy - 10) ** 2 + (xx - 9) ** 2 <= 64) | ((yy - 10) ** 2 + (xx - 24) ** 2 <= 64)
>>> ids = two.astype("uint32")  # one 4-connected object: two discs joined by a neck
>>> out = np.zeros_like(ids)
>>> table = split_instances(ids, out, classes=np.array([0, 1]), block=16)
>>> table.count, sorted(np.unique(out[two]).tolist())
(2, [1, 2])
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segflow.errors import ConfigError
from segflow.geometry import BlockGrid, Window
from segflow.instances import INSTANCE_DTYPE, InstanceTable, rank_by_first

__all__ = ["split_instances"]


@dataclass
class _Boxes:
    """Bounding boxes per id (inclusive start, exclusive stop), grown window by window."""

    count: int
    r0: np.ndarray = field(init=False)
    c0: np.ndarray = field(init=False)
    r1: np.ndarray = field(init=False)
    c1: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        big = np.iinfo("int64").max
        self.r0 = np.full(self.count + 1, big, "int64")
        self.c0 = np.full(self.count + 1, big, "int64")
        self.r1 = np.zeros(self.count + 1, "int64")
        self.c1 = np.zeros(self.count + 1, "int64")

    def add(self, ids: np.ndarray, win: Window) -> None:
        rows, cols = np.nonzero(ids)
        if not rows.size:
            return
        v = ids[rows, cols].astype("int64")
        np.minimum.at(self.r0, v, rows + win.row_off)
        np.minimum.at(self.c0, v, cols + win.col_off)
        np.maximum.at(self.r1, v, rows + win.row_off + 1)
        np.maximum.at(self.c1, v, cols + win.col_off + 1)

    def window(self, i: int) -> Window:
        return Window.from_bounds(
            int(self.r0[i]), int(self.c0[i]), int(self.r1[i]), int(self.c1[i])
        )


@dataclass
class _Pieces:
    """Provisional piece ids: each one's parent instance and first pixel (raster order)."""

    width: int
    parent: list[int] = field(default_factory=lambda: [0])
    first: list[int] = field(default_factory=lambda: [-1])
    pixels: list[int] = field(default_factory=lambda: [0])


def split_instances(
    instances: Any,
    out: Any,
    *,
    classes: np.ndarray,
    depth: float = 2.0,
    block: int = 1024,
) -> InstanceTable:
    """Split each instance of ``instances`` at its necks; the pieces' ids into ``out``.

    Parameters
    ----------
    instances
        ``(y, x)`` uint32 instance ids numbered ``1..N`` (:func:`~segflow.instances.label_instances`).
    out
        Array of the same shape taking the pieces' uint32 ids (written twice).
    classes
        ``(N + 1,)`` class of each instance id (:attr:`InstanceTable.classes`); pieces keep it.
    depth
        Least depth, in pixels of distance, of a neck that splits (larger: fewer splits).
    block
        Side of the windows read at a time.

    Returns
    -------
    InstanceTable
        The pieces: their count, classes and pixel counts.
    """
    if depth <= 0:
        raise ConfigError(f"split depth must be > 0 pixels, got {depth}: use e.g. 2")
    height, width = (int(s) for s in instances.shape)
    grid = BlockGrid(height, width, block)
    count = len(classes) - 1
    boxes = _Boxes(count)
    for _, win in grid:
        boxes.add(np.asarray(instances[win.slices]), win)
        out[win.slices] = np.zeros(win.shape, INSTANCE_DTYPE)  # the groups fill in objects
    pieces = _Pieces(width)
    for union, members in _groups(boxes, grid):
        _split_group(instances, out, union, members, boxes, pieces, depth)
    return _renumber(out, grid, pieces, np.asarray(classes, "int64"))


def _groups(boxes: _Boxes, grid: BlockGrid) -> Iterator[tuple[Window, np.ndarray]]:
    """The instances whose box starts in each window, and the union of their boxes."""
    ids = np.arange(1, boxes.count + 1)
    cell = (boxes.r0[1:] // grid.block) * grid.shape_in_blocks[1] + boxes.c0[1:] // grid.block
    order = np.argsort(cell, kind="stable")
    bounds = np.flatnonzero(np.diff(cell[order])) + 1
    for members in np.split(ids[order], bounds) if ids.size else []:
        union = Window.from_bounds(int(boxes.r0[members].min()), int(boxes.c0[members].min()),
                                   int(boxes.r1[members].max()), int(boxes.c1[members].max()))  # fmt: skip
        yield union, members


def _split_group(
    instances: Any,
    out: Any,
    union: Window,
    members: np.ndarray,
    boxes: _Boxes,
    pieces: _Pieces,
    depth: float,
) -> None:
    """Split the ``members`` (whose boxes lie in ``union``) and write their provisional ids."""
    ids = np.asarray(instances[union.slices])
    buf = np.zeros(union.shape, "int64")
    for i in members.tolist():
        box = boxes.window(i).relative_to(union)
        mask = ids[box.slices] == i
        part = _split_one(mask, depth)
        n = int(part.max())
        start = len(pieces.parent)
        first = _first_pixels(part, n, boxes.window(i), pieces.width)
        pieces.parent.extend([i] * n)
        pieces.first.extend(first.tolist())
        pieces.pixels.extend(np.bincount(part.ravel(), minlength=n + 1)[1:].tolist())
        buf[box.slices][mask] = part[mask] + start - 1
    old = np.asarray(out[union.slices])
    out[union.slices] = np.where(buf > 0, buf, old).astype(INSTANCE_DTYPE)


def _split_one(mask: np.ndarray, depth: float) -> np.ndarray:
    """Pieces ``1..k`` of one object's ``mask`` (its bounding box): a distance watershed."""
    from scipy import ndimage
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    markers, n = ndimage.label(h_maxima(dist, depth) & mask)
    if n <= 1:
        return mask.astype("int64")
    return watershed(-dist, markers, mask=mask, connectivity=1).astype("int64")


def _first_pixels(part: np.ndarray, n: int, box: Window, width: int) -> np.ndarray:
    """The global raster index of each piece's first pixel."""
    flat = part.ravel()
    values, first = np.unique(flat, return_index=True)
    keep = values > 0
    rows, cols = np.divmod(first[keep], box.width)
    out = np.empty(n, "int64")
    out[values[keep] - 1] = (box.row_off + rows) * width + box.col_off + cols
    return out


def _renumber(out: Any, grid: BlockGrid, pieces: _Pieces, classes: np.ndarray) -> InstanceTable:
    """Number the pieces by first pixel; rewrite ``out``; the pieces' table."""
    first = np.asarray(pieces.first, "int64")
    n = first.size - 1
    lookup = np.zeros(n + 1, "int64")
    lookup[1:] = rank_by_first(first[1:])
    for _, win in grid:
        out[win.slices] = lookup[np.asarray(out[win.slices])].astype(INSTANCE_DTYPE)
    final_cls = np.zeros(n + 1, "int64")
    final_cls[lookup[1:]] = classes[np.asarray(pieces.parent[1:], "int64")]
    final_px = np.zeros(n + 1, "int64")
    final_px[lookup[1:]] = np.asarray(pieces.pixels[1:], "int64")
    return InstanceTable(count=n, classes=final_cls, pixels=final_px)
