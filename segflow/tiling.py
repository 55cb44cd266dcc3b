"""Overlap-tile geometry: which windows a model sees, which pixels each keeps, how they blend.

Pure: integers and small numpy arrays, no I/O. Image coordinates throughout (row, col), the
pixel grid of the source at level 0; windows may extend past the image, where the input is
mirrored (DESIGN.md section 4).

Two layouts of model input windows (all windows of a layout have the same square ``size``):

``crop`` (U-Net overlap-tile)
    Output tiles of ``tile`` x ``tile`` pixels on a grid anchored at ``origin`` (the pixel
    (0, 0) of the output store, so tiles align with its chunks). Tile ``k`` keeps its *core*
    ``[origin + k*tile, origin + (k+1)*tile)`` (clipped to the image) and is predicted from the
    input window grown by ``halo`` on every side. Cores partition the image: every pixel comes
    from exactly one tile, including the last row and column, which are simply clipped (their
    input window is still full size, mirrored past the image edge). With ``halo`` at least the
    model's receptive-field radius the stitched result equals whole-image inference on the
    image reflect-padded by ``halo``.

``gaussian`` (nnU-Net / MONAI sliding window)
    Windows of ``window`` pixels placed exactly as ``monai.inferers.sliding_window_inference``
    places them over the image *reflect-padded by* ``halo``: starts ``-halo + k*stride`` with
    ``stride = int(window * (1 - overlap))``, the last one moved back to end at
    ``size + halo``. Each window contributes all its pixels inside the image, weighted by
    :func:`gaussian_importance_map` (sigma = window / 8); the engine divides by the weight sum.
    The layout depends only on the image, never on the requested region, so any region equals
    the same pixels of a whole-image run.

Mirroring (:func:`mirror_indices`) is numpy ``reflect`` (``d c b | a b c d``, the edge pixel
not repeated), applied repeatedly when a window reaches further than one image side past the
edge (exactly what ``np.pad(mode="reflect")`` does for large pads); an axis of length 1 is
repeated.

Model size multiples: networks with ``k`` downsampling steps need an input side divisible by
``2**k``. A ``crop`` window of ``tile + 2*halo`` is then *extended* on its bottom/right side to
the next multiple (real pixels where the image has them, mirrored beyond), and the extra
outputs are discarded; the core and its left/top context are unchanged, so tiles stay aligned
with the image grid. A ``gaussian`` window must itself be a multiple.

Examples
--------
>>> lay = crop_layout(1000, 700, tile=512, halo=32)
>>> lay.size, lay.shape
(576, (2, 2))
>>> t = lay.tile(1, 1)
>>> t.window, t.core
(Window(row_off=480, col_off=480, height=576, width=576), Window(row_off=512, col_off=512, height=488, width=188))
>>> mirror_indices(range(-3, 7), 5).tolist()
[3, 2, 1, 0, 1, 2, 3, 4, 3, 2]
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Iterator, Set
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np

from segflow.errors import ConfigError, option
from segflow.geometry import BlockGrid, BlockIndex, Window

__all__ = [
    "AxisPlan",
    "IngestTask",
    "MergeMode",
    "MirrorPlan",
    "Step",
    "Tile",
    "TileLayout",
    "crop_layout",
    "gaussian_importance_map",
    "gaussian_layout",
    "mirror_indices",
    "mirror_plan",
    "plan_tasks",
    "round_up",
    "schedule",
    "strips",
    "task_units",
]

MergeMode = Literal["crop", "gaussian"]


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


# ---------------------------------------------------------------------------- mirroring
def mirror_indices(index: Iterable[int] | np.ndarray, n: int) -> np.ndarray:
    """Map (possibly out-of-range) positions onto ``[0, n)`` by numpy ``reflect`` mirroring.

    Periodic with period ``2 * (n - 1)``, which is what ``np.pad(mode="reflect")`` produces
    for pads of any length; with ``n == 1`` every position maps to 0.
    """
    idx = np.asarray(index, dtype=np.int64)
    if n <= 0:
        raise ConfigError(f"cannot mirror into an empty axis (length {n})")
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    m = np.mod(idx, period)
    return np.where(m < n, m, period - m)


@dataclass(frozen=True, slots=True, eq=False)
class MirrorPlan:
    """How to build a (possibly out-of-image) window from pixels inside the image.

    Read ``source`` (a window inside the image), then :meth:`take` the rows/cols: slices when
    the window lies inside the image, index arrays where it is mirrored.
    """

    window: Window
    source: Window
    rows: slice | np.ndarray
    cols: slice | np.ndarray

    @property
    def mirrored(self) -> bool:
        """Whether any part of the window lies outside the image."""
        return not (isinstance(self.rows, slice) and isinstance(self.cols, slice))

    def take(self, block: np.ndarray) -> np.ndarray:
        """The window's pixels from ``block``, the array read at ``source`` (last two axes)."""
        if isinstance(self.rows, slice) and isinstance(self.cols, slice):
            return block[..., self.rows, self.cols]
        rows = np.arange(block.shape[-2])[self.rows] if isinstance(self.rows, slice) else self.rows
        cols = np.arange(block.shape[-1])[self.cols] if isinstance(self.cols, slice) else self.cols
        return block[..., rows[:, None], cols[None, :]]


def _axis_source(start: int, stop: int, n: int) -> tuple[int, int, slice | np.ndarray]:
    if start >= 0 and stop <= n:
        return start, stop, slice(None)
    idx = mirror_indices(np.arange(start, stop), n)
    lo, hi = int(idx.min()), int(idx.max()) + 1
    return lo, hi, idx - lo


def mirror_plan(window: Window, height: int, width: int) -> MirrorPlan:
    """Plan reading ``window`` of a ``height`` x ``width`` image, mirroring past its edges.

    Inside the image the window gets real pixels (never mirrored context from the requested
    region's edge); only beyond the image edges are pixels mirrored. The source window read is
    the bounding box of the pixels needed, so the result equals
    ``np.pad(image, p, mode="reflect")`` at the same place for any large enough ``p``.
    """
    if window.height <= 0 or window.width <= 0:
        raise ConfigError(f"cannot read an empty window {window}")
    r0, r1, rows = _axis_source(window.row_off, window.row_stop, height)
    c0, c1, cols = _axis_source(window.col_off, window.col_stop, width)
    return MirrorPlan(window, Window.from_bounds(r0, c0, r1, c1), rows, cols)


# ---------------------------------------------------------------------------- blending
@lru_cache(maxsize=8)
def _importance_map(size: int, sigma_scale: float) -> np.ndarray:
    import torch

    # The same torch operations, in the same order, as MONAI 1.x
    # ``monai.data.utils.compute_importance_map(mode="gaussian")``, so the values are identical.
    sigma = size * sigma_scale
    x = torch.arange(start=-(size - 1) / 2.0, end=(size - 1) / 2.0 + 1, dtype=torch.float)
    x = torch.exp(x**2 / (-2 * sigma**2))
    imp = x.unsqueeze(-1) * x[None]
    min_non_zero = max(torch.min(imp).item(), 1e-3)
    out = torch.clamp_(imp.to(torch.float), min=min_non_zero).numpy().astype(np.float32)
    out.setflags(write=False)
    return out


def gaussian_importance_map(size: int, sigma_scale: float = 0.125) -> np.ndarray:
    """nnU-Net / MONAI Gaussian blending weights for a ``size`` x ``size`` window (float32).

    ``exp(-d**2 / (2 sigma**2))`` per axis around the window centre, sigma =
    ``sigma_scale * size``, outer product, clamped below at ``max(min, 1e-3)``: equal to
    ``monai.data.utils.compute_importance_map((size, size), mode="gaussian",
    sigma_scale=sigma_scale)``. The returned array is read-only and cached.
    """
    if size <= 0:
        raise ConfigError(f"window size must be > 0, got {size}")
    return _importance_map(int(size), float(sigma_scale))


# ---------------------------------------------------------------------------- layouts
@dataclass(frozen=True, slots=True)
class AxisPlan:
    """Windows along one axis: input start of each window and the span it contributes.

    ``core_starts`` and ``core_stops`` are non-decreasing, and every core is non-empty and
    inside ``[0, length)``.
    """

    length: int
    size: int
    starts: tuple[int, ...]
    core_starts: tuple[int, ...]
    core_stops: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.starts)

    def touching(self, start: int, stop: int) -> range:
        """Indices of the windows whose core overlaps ``[start, stop)``."""
        lo = bisect.bisect_right(self.core_stops, start)
        hi = bisect.bisect_left(self.core_starts, stop)
        return range(lo, max(lo, hi))


@dataclass(frozen=True, slots=True)
class Tile:
    """One model input window and the pixels it contributes (both in image coordinates)."""

    index: BlockIndex
    window: Window
    core: Window


@dataclass(frozen=True, slots=True)
class TileLayout:
    """Every model window over an image: the product of a row and a column :class:`AxisPlan`."""

    mode: MergeMode
    height: int
    width: int
    rows: AxisPlan
    cols: AxisPlan
    _weights: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        """Side of every model input window."""
        return self.rows.size

    @property
    def shape(self) -> tuple[int, int]:
        """Number of windows along (rows, cols)."""
        return (len(self.rows), len(self.cols))

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def tile(self, row: int, col: int) -> Tile:
        r, c = self.rows, self.cols
        return Tile(
            BlockIndex(row, col),
            Window(r.starts[row], c.starts[col], r.size, c.size),
            Window.from_bounds(
                r.core_starts[row], c.core_starts[col], r.core_stops[row], c.core_stops[col]
            ),
        )

    def __iter__(self) -> Iterator[Tile]:
        for i in range(len(self.rows)):
            for j in range(len(self.cols)):
                yield self.tile(i, j)

    def touching(self, window: Window) -> Iterator[Tile]:
        """The tiles whose core overlaps ``window``, row-major."""
        for i in self.rows.touching(window.row_off, window.row_stop):
            for j in self.cols.touching(window.col_off, window.col_stop):
                yield self.tile(i, j)

    def count_touching(self, window: Window) -> int:
        """How many tiles contribute to ``window`` (without listing them)."""
        return len(self.rows.touching(window.row_off, window.row_stop)) * len(
            self.cols.touching(window.col_off, window.col_stop)
        )

    def weights(self, tile: Tile, part: Window | None = None) -> np.ndarray | None:
        """Blending weights of ``tile`` over ``part`` (default its core); ``None`` means all 1."""
        if self._weights is None:
            return None
        rel = (part or tile.core).relative_to(tile.window)
        return self._weights[rel.slices]


def _check_image(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise ConfigError(f"image must have a positive size, got {height} x {width} pixels")


def _crop_axis(n: int, tile: int, halo: int, size: int, origin: int) -> AxisPlan:
    k0 = -(origin // tile) - (1 if origin % tile else 0)  # first tile reaching pixel 0
    k1 = -(-(n - origin) // tile)  # one past the last tile reaching pixel n - 1
    starts, cs, ce = [], [], []
    for k in range(k0, k1):
        a = origin + k * tile
        starts.append(a - halo)
        cs.append(max(0, a))
        ce.append(min(n, a + tile))
    return AxisPlan(n, size, tuple(starts), tuple(cs), tuple(ce))


def crop_layout(
    height: int,
    width: int,
    *,
    tile: int,
    halo: int,
    size_multiple: int = 1,
    origin: tuple[int, int] = (0, 0),
) -> TileLayout:
    """Overlap-tile layout: ``tile`` cores on a grid anchored at ``origin``, ``halo`` context.

    Input windows are ``round_up(tile + 2*halo, size_multiple)`` pixels, extended on the
    bottom/right side when rounding adds pixels (see the module notes).
    """
    _check_image(height, width)
    if tile <= 0:
        raise ConfigError(f"tile must be > 0, got {tile}: use e.g. {option('tile', 512)}")
    if halo < 0:
        raise ConfigError(f"halo must be >= 0, got {halo}")
    if size_multiple <= 0:
        raise ConfigError(f"size_multiple must be > 0, got {size_multiple}")
    size = round_up(tile + 2 * halo, size_multiple)
    return TileLayout(
        "crop",
        height,
        width,
        _crop_axis(height, tile, halo, size, origin[0]),
        _crop_axis(width, tile, halo, size, origin[1]),
    )


def _gaussian_axis(n: int, window: int, overlap: float, halo: int) -> AxisPlan:
    # MONAI's dense_patch_slices over the padded axis of length L = n + 2*halo, shifted by -halo
    length = n + 2 * halo
    if length <= window:
        # MONAI pads an axis shorter than the window evenly (extra pixel at the end)
        starts = [-halo - (window - length) // 2]
    else:
        interval = max(1, int(window * (1 - overlap)))
        count = next(d for d in range(length) if d * interval + window >= length) + 1
        starts = [
            d * interval - max(d * interval + window - length, 0) - halo for d in range(count)
        ]
    kept = [(s, max(0, s), min(n, s + window)) for s in starts]
    kept = [k for k in kept if k[1] < k[2]]  # windows entirely in the mirrored margin add nothing
    return AxisPlan(
        n, window, tuple(k[0] for k in kept), tuple(k[1] for k in kept), tuple(k[2] for k in kept)
    )


def gaussian_layout(
    height: int,
    width: int,
    *,
    window: int,
    overlap: float = 0.5,
    halo: int = 0,
    size_multiple: int = 1,
    sigma_scale: float = 0.125,
) -> TileLayout:
    """Sliding-window layout with Gaussian blending, as MONAI's over the image padded by ``halo``."""
    _check_image(height, width)
    if window <= 0:
        raise ConfigError(f"window must be > 0, got {window}")
    if not 0 <= overlap < 1:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap}: use e.g. 0.5")
    if halo < 0:
        raise ConfigError(f"halo must be >= 0, got {halo}")
    if size_multiple <= 0 or window % size_multiple:
        raise ConfigError(
            f"gaussian window {window} is not a multiple of the model's size multiple "
            f"{size_multiple}: use a window of {round_up(window, max(1, size_multiple))}"
        )
    return TileLayout(
        "gaussian",
        height,
        width,
        _gaussian_axis(height, window, overlap, halo),
        _gaussian_axis(width, window, overlap, halo),
        gaussian_importance_map(window, sigma_scale),
    )


# ---------------------------------------------------------------------------- schedule
@dataclass(frozen=True, slots=True)
class Step:
    """Run ``tile`` through the model and add its output to ``units``."""

    tile: Tile
    units: tuple[BlockIndex, ...]


def schedule(
    layout: TileLayout,
    grid: BlockGrid,
    units: Collection[BlockIndex],
    *,
    origin: tuple[int, int] = (0, 0),
) -> list[Step]:
    """The tiles needed for ``units`` of ``grid``, row-major, each tile once.

    ``grid`` is the output's grid of write units, whose pixel (0, 0) is image pixel
    ``origin``. A step lists every one of ``units`` its tile's core overlaps; a unit receives
    exactly ``layout.count_touching(window)`` contributions (its window in image coordinates),
    so a consumer can finish it as soon as that many have arrived. Pass the units of one
    column strip at a time (:func:`strips`) to bound how many units are open at once.
    """
    if not units:
        return []
    wanted = set(units)
    windows = [grid.window(u.row, u.col).translate(*origin) for u in wanted]
    bbox = Window.from_bounds(
        min(w.row_off for w in windows),
        min(w.col_off for w in windows),
        max(w.row_stop for w in windows),
        max(w.col_stop for w in windows),
    )
    steps = []
    for tile in layout.touching(bbox):
        core = tile.core.translate(-origin[0], -origin[1])
        hit = tuple(idx for idx, _ in grid.blocks_touching(core) if idx in wanted)
        if hit:
            steps.append(Step(tile, hit))
    return steps


def strips(columns: Iterable[int], per_strip: int) -> list[list[int]]:
    """Group unit columns into strips ``[k*per_strip, (k+1)*per_strip)``, in order."""
    if per_strip <= 0:
        raise ConfigError(f"strip width must be > 0 units, got {per_strip}")
    groups: dict[int, list[int]] = {}
    for c in sorted(set(columns)):
        groups.setdefault(c // per_strip, []).append(c)
    return [groups[k] for k in sorted(groups)]


# --------------------------------------------------------------------------- ingest reads
@dataclass(frozen=True, slots=True)
class IngestTask:
    """Whole write units that one task owns, read through one source window."""

    window: Window
    units: tuple[tuple[BlockIndex, Window], ...]


def task_units(
    grid: BlockGrid, source_block: tuple[int, int], *, task_pixels: int = 2048
) -> tuple[int, int]:
    """The units (rows, columns) of one task of :func:`plan_tasks`.

    >>> task_units(BlockGrid(1000, 1000, 512), (4, 1000)), task_units(BlockGrid(9000, 9000, 512), (512, 512))
    ((1, 2), (4, 4))
    """
    cols = grid.shape_in_blocks[1]
    if source_block[1] >= grid.width and cols > 1:  # strips: one row of units
        return 1, cols
    side = max(1, task_pixels // grid.block)
    return side, side


def plan_tasks(
    grid: BlockGrid,
    source_block: tuple[int, int],
    *,
    done: Set[BlockIndex] = frozenset(),
    task_pixels: int = 2048,
) -> list[IngestTask]:
    """Group write units into tasks whose reads follow the source's own block layout.

    A source whose blocks span the full width (strips) is read one full row of units at a
    time, so each strip is decoded once; tiled sources are read in squares of units about
    ``task_pixels`` on a side (fewer, larger reads and writes). Units in ``done`` are left
    out, so a resumed run writes nothing twice.

    >>> tasks = plan_tasks(BlockGrid(1000, 1000, 512), (4, 1000))
    >>> [t.window for t in tasks]
    [Window(row_off=0, col_off=0, height=512, width=1000), Window(row_off=512, col_off=0, height=488, width=1000)]
    """
    rows, cols = grid.shape_in_blocks
    step_r, step_c = task_units(grid, source_block, task_pixels=task_pixels)
    tasks = []
    for r0 in range(0, rows, step_r):
        for c0 in range(0, cols, step_c):
            todo = tuple(
                (BlockIndex(r, c), grid.window(r, c))
                for r in range(r0, min(r0 + step_r, rows))
                for c in range(c0, min(c0 + step_c, cols))
                if BlockIndex(r, c) not in done
            )
            if todo:
                window = Window.from_bounds(
                    min(w.row_off for _, w in todo),
                    min(w.col_off for _, w in todo),
                    max(w.row_stop for _, w in todo),
                    max(w.col_stop for _, w in todo),
                )
                tasks.append(IngestTask(window, todo))
    return tasks
