"""Pixel-grid geometry: windows and the grids of blocks that cover an image.

Pure value objects, no I/O. One axis order everywhere: (row, col) for 2-D positions and
(band, row, col) for arrays. Windows are half-open: ``row_off <= r < row_off + height``.

Examples
--------
>>> grid = BlockGrid(height=1000, width=700, block=512)
>>> grid.shape_in_blocks
(2, 2)
>>> grid.window(1, 1)
Window(row_off=512, col_off=512, height=488, width=188)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from segflow.errors import ConfigError

__all__ = ["BlockGrid", "BlockIndex", "Window"]


@dataclass(frozen=True, slots=True)
class Window:
    """A half-open rectangle of pixels: rows ``[row_off, row_off+height)``, same for cols."""

    row_off: int
    col_off: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.height < 0 or self.width < 0:
            raise ConfigError(
                f"window size must be >= 0, got height={self.height} width={self.width}"
            )

    @classmethod
    def from_bounds(cls, row_start: int, col_start: int, row_stop: int, col_stop: int) -> Window:
        """Build a window from start (inclusive) and stop (exclusive) indices."""
        return cls(row_start, col_start, max(0, row_stop - row_start), max(0, col_stop - col_start))

    @property
    def row_stop(self) -> int:
        return self.row_off + self.height

    @property
    def col_stop(self) -> int:
        return self.col_off + self.width

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def size(self) -> int:
        return self.height * self.width

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(row_slice, col_slice)`` to index a 2-D array (or the last two axes)."""
        return (slice(self.row_off, self.row_stop), slice(self.col_off, self.col_stop))

    def intersection(self, other: Window) -> Window:
        """The overlap of two windows (an empty window where they do not overlap)."""
        return Window.from_bounds(
            max(self.row_off, other.row_off),
            max(self.col_off, other.col_off),
            min(self.row_stop, other.row_stop),
            min(self.col_stop, other.col_stop),
        )

    def translate(self, drow: int, dcol: int) -> Window:
        """The same window moved by ``(drow, dcol)``."""
        return Window(self.row_off + drow, self.col_off + dcol, self.height, self.width)

    def pad(self, halo: int) -> Window:
        """The window grown by ``halo`` pixels on every side (may leave the image)."""
        return Window(
            self.row_off - halo, self.col_off - halo, self.height + 2 * halo, self.width + 2 * halo
        )

    def relative_to(self, outer: Window) -> Window:
        """This window in the coordinates of ``outer`` (whose origin becomes (0, 0))."""
        return self.translate(-outer.row_off, -outer.col_off)

    def contains(self, other: Window) -> bool:
        return (
            self.row_off <= other.row_off
            and self.col_off <= other.col_off
            and other.row_stop <= self.row_stop
            and other.col_stop <= self.col_stop
        )


@dataclass(frozen=True, slots=True, order=True)
class BlockIndex:
    """The (row, col) position of a block in a :class:`BlockGrid`."""

    row: int
    col: int

    @property
    def key(self) -> str:
        """A stable text key, e.g. ``"3.7"``, used by progress records."""
        return f"{self.row}.{self.col}"


@dataclass(frozen=True, slots=True)
class BlockGrid:
    """A regular grid of ``block`` x ``block`` windows covering ``height`` x ``width`` pixels.

    The last row and column of blocks are clipped to the image, so every pixel belongs to
    exactly one block.
    """

    height: int
    width: int
    block: int

    def __post_init__(self) -> None:
        if self.block <= 0:
            raise ConfigError(f"block size must be > 0, got {self.block}: use e.g. 512")
        if self.height <= 0 or self.width <= 0:
            raise ConfigError(
                f"grid must have a positive size, got {self.height} x {self.width} pixels"
            )

    @property
    def shape_in_blocks(self) -> tuple[int, int]:
        return (-(-self.height // self.block), -(-self.width // self.block))

    def __len__(self) -> int:
        rows, cols = self.shape_in_blocks
        return rows * cols

    def window(self, row: int, col: int) -> Window:
        """The pixel window of block ``(row, col)``."""
        r0, c0 = row * self.block, col * self.block
        return Window.from_bounds(
            r0, c0, min(r0 + self.block, self.height), min(c0 + self.block, self.width)
        )

    def __iter__(self) -> Iterator[tuple[BlockIndex, Window]]:
        rows, cols = self.shape_in_blocks
        for r in range(rows):
            for c in range(cols):
                yield BlockIndex(r, c), self.window(r, c)

    def blocks_touching(self, window: Window) -> Iterator[tuple[BlockIndex, Window]]:
        """The blocks that overlap ``window`` (clipped to the grid)."""
        w = window.intersection(Window(0, 0, self.height, self.width))
        if w.size == 0:
            return
        for r in range(w.row_off // self.block, (w.row_stop - 1) // self.block + 1):
            for c in range(w.col_off // self.block, (w.col_stop - 1) // self.block + 1):
                yield BlockIndex(r, c), self.window(r, c)
