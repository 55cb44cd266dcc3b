"""Where pixels are: a map georeference or a slide's pixel size (pure value objects).

The scene store records them, sources read them, regions, labels, the engine and the
exporters use them; none of those needs more than these two frozen records.

Examples
--------
>>> g = GeoRef(crs_wkt="", epsg=32616, geotransform=(500.0, 0.5, 0.0, 900.0, 0.0, -0.5))
>>> g.window_geotransform(Window(row_off=10, col_off=4, height=2, width=2))
(502.0, 0.5, 0.0, 895.0, 0.0, -0.5)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from segflow.geometry import Window

__all__ = ["GeoRef", "SlideInfo"]


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
