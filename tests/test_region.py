"""Region requests -> pixel windows, checked against rasterio's own window arithmetic."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import rasterio
from rasterio.enums import WktVersion
from rasterio.warp import transform_bounds
from rasterio.windows import from_bounds

from segflow.errors import RegionError
from segflow.geometry import Window
from segflow.io.store import GeoRef, SlideInfo
from segflow.region import resolve_region


@pytest.fixture(scope="module")
def atlanta(samples: Path) -> tuple[GeoRef, int, int, object]:
    with rasterio.open(samples / "spacenet_atlanta" / "sample_geotiff.tif") as src:
        g = GeoRef(
            src.crs.to_wkt(version=WktVersion.WKT2_2019), src.crs.to_epsg(), src.transform.to_gdal()
        )
        return g, src.height, src.width, src.transform


def test_bbox_in_image_crs_matches_rasterio(atlanta: tuple[GeoRef, int, int, object]) -> None:
    georef, h, w, transform = atlanta
    bbox = (733650.3, 3724800.0, 733800.0, 3724950.7)
    win = resolve_region(height=h, width=w, georef=georef, bbox=bbox)
    ref = from_bounds(*bbox, transform=transform)
    assert win == Window.from_bounds(
        math.floor(ref.row_off),
        math.floor(ref.col_off),
        math.ceil(ref.row_off + ref.height),
        math.ceil(ref.col_off + ref.width),
    )


def test_bbox_in_other_crs_is_reprojected(atlanta: tuple[GeoRef, int, int, object]) -> None:
    georef, h, w, transform = atlanta
    utm = (733700.0, 3724800.0, 733900.0, 3725000.0)
    lonlat = transform_bounds("EPSG:32616", "EPSG:4326", *utm)
    win = resolve_region(height=h, width=w, georef=georef, bbox=lonlat, bbox_crs="EPSG:4326")
    direct = resolve_region(height=h, width=w, georef=georef, bbox=utm)
    assert direct.contains(win.intersection(direct))
    # the lon/lat box encloses the UTM box (grid convergence makes it ~5 % larger here)
    assert win.contains(direct) and win.height < direct.height * 1.1
    back = transform_bounds("EPSG:4326", "EPSG:32616", *lonlat, densify_pts=21)
    ref = from_bounds(*back, transform=transform)
    assert win == Window.from_bounds(
        math.floor(ref.row_off),
        math.floor(ref.col_off),
        math.ceil(ref.row_off + ref.height),
        math.ceil(ref.col_off + ref.width),
    )


def test_region_clipped_and_outside(atlanta: tuple[GeoRef, int, int, object]) -> None:
    georef, h, w, _ = atlanta
    win = resolve_region(height=h, width=w, window=(800, 850, 500, 500))
    assert win == Window(850, 800, 50, 100)
    with pytest.raises(RegionError, match="outside the image"):
        resolve_region(height=h, width=w, georef=georef, bbox=(0, 0, 10, 10))
    with pytest.raises(RegionError, match="unknown --bbox-crs"):
        resolve_region(
            height=h, width=w, georef=georef, bbox=(0, 0, 10, 10), bbox_crs="EPSG:999999"
        )
    with pytest.raises(RegionError, match="outside"):
        resolve_region(height=h, width=w, window=(2000, 0, 10, 10))
    assert resolve_region(height=h, width=w) == Window(0, 0, h, w)


def test_slide_microns() -> None:
    slide = SlideInfo(mpp_x=0.5, mpp_y=0.25, objective_power=20)
    win = resolve_region(height=1000, width=1000, slide=slide, bbox=(10.0, 10.0, 60.0, 35.0))
    assert win == Window.from_bounds(40, 20, 140, 120)
    assert resolve_region(
        height=1000, width=1000, slide=slide, bbox=(10, 10, 60, 35), bbox_crs="px"
    ) == Window(10, 10, 25, 50)
