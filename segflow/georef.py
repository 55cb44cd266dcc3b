"""Where pixels are: a map georeference or a slide's pixel size (pure value objects).

The scene store records them, sources read them, regions, labels, the engine and the
exporters use them; none of those needs more than these frozen records. :class:`PixelGrid`
pairs a shape with its georeference; ``grid[window]`` (and ``georef[window]``) is a window's
own grid, as odc-geo's ``GeoBox`` slices.

Examples
--------
>>> g = GeoRef(crs_wkt="", epsg=32616, geotransform=(500.0, 0.5, 0.0, 900.0, 0.0, -0.5))
>>> g.window_geotransform(Window(row_off=10, col_off=4, height=2, width=2))
(502.0, 0.5, 0.0, 895.0, 0.0, -0.5)
>>> grid = PixelGrid(100, 200, g)
>>> grid[Window(row_off=10, col_off=4, height=2, width=2)].bounds()
(502.0, 894.0, 503.0, 895.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segflow.errors import LabelError, RegionError
from segflow.geometry import Window

if TYPE_CHECKING:
    import pyproj
    from affine import Affine

__all__ = ["GeoRef", "PixelGrid", "SlideInfo"]


@dataclass(frozen=True, slots=True)
class GeoRef:
    """A map georeference: CRS and GDAL geotransform of the level-0 pixel grid."""

    crs_wkt: str
    epsg: int | None
    geotransform: tuple[float, float, float, float, float, float]

    def affine(self) -> Any:
        """The transform as an ``affine.Affine`` (rasterio's convention)."""
        from affine import Affine

        return Affine.from_gdal(*self.geotransform)

    def __getitem__(self, window: Window) -> GeoRef:
        """The georeference of ``window``'s own pixel grid (same CRS, shifted origin)."""
        return GeoRef(self.crs_wkt, self.epsg, self.window_geotransform(window))

    def window_geotransform(
        self, window: Window
    ) -> tuple[float, float, float, float, float, float]:
        """The geotransform of a sub-window's own pixel grid."""
        x0, dx, rx, y0, ry, dy = self.geotransform
        return (
            x0 + window.col_off * dx + window.row_off * rx,
            dx,
            rx,
            y0 + window.col_off * ry + window.row_off * dy,
            ry,
            dy,
        )


@dataclass(frozen=True, slots=True)
class SlideInfo:
    """Whole-slide metadata: pixel size in microns and objective power."""

    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None
    vendor: str | None = None
    level: int = 0
    downsample: float = 1.0


@dataclass(frozen=True, slots=True)
class PixelGrid:
    """A pixel grid: its shape, and its georeference if it has one (odc-geo's ``GeoBox``).

    ``georef`` None means a plain pixel grid (slides, PNGs): pixel (row, col) covers
    x in [col + origin col, ...), y in [row + origin row, ...) of the image's pixels.
    ``grid[window]`` is the window's own grid: its shape, and its own georeference (or
    origin), so a window and where it lies never travel separately.
    """

    height: int
    width: int
    georef: GeoRef | None = None
    origin: tuple[int, int] = (0, 0)  # plain grids: (row, col) of pixel (0, 0) in the image

    def __getitem__(self, window: Window) -> PixelGrid:
        """The grid of ``window`` (in this grid's pixels)."""
        if self.georef is not None:
            return PixelGrid(window.height, window.width, self.georef[window])
        row, col = self.origin
        return PixelGrid(window.height, window.width, None,
                         (row + window.row_off, col + window.col_off))  # fmt: skip

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise LabelError(
                f"a pixel grid must have a positive size, got {self.height} x {self.width} pixels"
            )

    @property
    def transform(self) -> Affine:
        """Pixel -> grid coordinates (a translation by ``origin`` for a plain pixel grid)."""
        from affine import Affine

        if self.georef is not None:
            return self.georef.affine()
        return Affine.translation(self.origin[1], self.origin[0])

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
        """Pixel -> grid coordinates of ``window``'s own pixels (``self[window].transform``)."""
        return self[window].transform

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


def _fmt_bounds(b: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.10g}" for v in b) + ")"
