"""The pixel grid: ``grid[window]`` is the window's own grid, as rasterio computes it."""

from __future__ import annotations

import pytest
import rasterio.windows
from affine import Affine

from segflow.errors import LabelError
from segflow.geometry import Window
from segflow.georef import GeoRef, PixelGrid

# a rotated grid: rasterio's window transform must agree on every coefficient
GEO = GeoRef(crs_wkt="", epsg=32616, geotransform=(733600.0, 0.3, 0.02, 3725100.0, 0.01, -0.3))


@pytest.mark.parametrize(
    "window", [Window(0, 0, 5, 7), Window(10, 4, 2, 3), Window(120, 333, 64, 64)]
)
def test_a_windows_grid_is_rasterios_window_transform(window: Window) -> None:
    grid = PixelGrid(1000, 900, GEO)
    sub = grid[window]
    ref = rasterio.windows.transform(
        rasterio.windows.Window(window.col_off, window.row_off, window.width, window.height),
        Affine.from_gdal(*GEO.geotransform),
    )
    assert (sub.height, sub.width) == window.shape
    assert sub.transform.almost_equals(ref, precision=1e-9)
    assert grid.window_transform(window) == sub.transform
    assert sub.georef == GEO[window] and sub.georef.epsg == GEO.epsg
    assert grid.bounds(window) == pytest.approx(sub.bounds())


def test_windows_of_windows_compose_and_plain_grids_keep_their_origin() -> None:
    grid = PixelGrid(1000, 900, GEO)
    outer, inner = Window(100, 50, 400, 300), Window(7, 9, 20, 30)
    direct = grid[Window(107, 59, 20, 30)]
    assert grid[outer][inner].transform.almost_equals(direct.transform, precision=1e-9)
    plain = PixelGrid(1000, 900)
    sub = plain[outer][inner]
    assert sub.georef is None and sub.origin == (107, 59)
    assert sub.transform == Affine.translation(59, 107)
    assert sub.bounds() == (59.0, 107.0, 89.0, 127.0)


def test_an_empty_grid_is_refused() -> None:
    with pytest.raises(LabelError, match="positive size"):
        PixelGrid(0, 5)
