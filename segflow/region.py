"""Which pixels to process: a region given as map bbox, slide microns or a pixel window.

Pure functions: a region request plus the image's grid (size, georeference, pixel size) gives a
:class:`~segflow.geometry.Window` in the image's pixel coordinates, or a :class:`RegionError`
naming the request, the image's extent and the fix.

Examples
--------
>>> window_from_pixels((10, 20, 100, 50), height=200, width=300)
Window(row_off=20, col_off=10, height=50, width=100)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from segflow.errors import RegionError, option
from segflow.geometry import Window
from segflow.georef import GeoRef, SlideInfo

__all__ = ["resolve_region", "window_from_bbox", "window_from_microns", "window_from_pixels"]


def _clip(window: Window, height: int, width: int, *, asked: str) -> Window:
    image = Window(0, 0, height, width)
    inside = window.intersection(image)
    if inside.size == 0:
        raise RegionError(
            f"region {asked} lies outside the image ({width} x {height} pixels): "
            "choose a region that overlaps it"
        )
    return inside


def window_from_pixels(col_row_width_height: Sequence[int], *, height: int, width: int) -> Window:
    """A ``COL ROW WIDTH HEIGHT`` pixel window, clipped to the image."""
    col, row, w, h = (int(v) for v in col_row_width_height)
    if w <= 0 or h <= 0:
        raise RegionError(f"{option('window')} width and height must be > 0, got {w} x {h}")
    return _clip(Window(row, col, h, w), height, width, asked=option("window", (col, row, w, h)))


def window_from_bbox(
    bbox: Sequence[float],
    *,
    georef: GeoRef,
    height: int,
    width: int,
    bbox_crs: str | None = None,
) -> Window:
    """The pixels whose area meets ``MINX MINY MAXX MAXY`` (in ``bbox_crs``, default the image CRS).

    The bbox is reprojected to the image CRS (its densified outline's bounds), then turned
    into whole pixels with the inverse geotransform: every pixel the bbox touches is included.
    """
    from affine import Affine
    from pyproj import CRS
    from pyproj.exceptions import CRSError
    from rasterio.warp import transform_bounds

    minx, miny, maxx, maxy = (float(v) for v in bbox)
    if not (maxx > minx and maxy > miny):
        raise RegionError(f"{option('bbox')} must have MAXX > MINX and MAXY > MINY, got {list(bbox)}")
    image_crs = CRS.from_wkt(georef.crs_wkt)
    if bbox_crs is not None:
        try:
            crs = CRS.from_user_input(bbox_crs)
        except CRSError:
            raise RegionError(
                f"unknown {option('bbox_crs')} {bbox_crs!r}: give an EPSG code (EPSG:4326), a PROJ string or WKT"
            ) from None
        if crs != image_crs:
            minx, miny, maxx, maxy = transform_bounds(
                crs, image_crs, minx, miny, maxx, maxy, densify_pts=21
            )
    inv = ~Affine.from_gdal(*georef.geotransform)
    corners = [inv @ (x, y) for x in (minx, maxx) for y in (miny, maxy)]
    cols = [c for c, _ in corners]
    rows = [r for _, r in corners]
    c0, c1 = math.floor(min(cols) + 1e-9), math.ceil(max(cols) - 1e-9)
    r0, r1 = math.floor(min(rows) + 1e-9), math.ceil(max(rows) - 1e-9)
    return _clip(
        Window.from_bounds(r0, c0, r1, c1),
        height,
        width,
        asked=option("bbox", tuple(f"{v:g}" for v in (minx, miny, maxx, maxy))) + " (image CRS)",
    )


def window_from_microns(
    bbox_um: Sequence[float], *, slide: SlideInfo, height: int, width: int
) -> Window:
    """A slide region ``MINX MINY MAXX MAXY`` in microns from the slide's top-left corner."""
    if not slide.mpp_x or not slide.mpp_y:
        raise RegionError(
            f"the slide has no microns-per-pixel: give the region in pixels with {option('window')} instead"
        )
    x0, y0, x1, y1 = (float(v) for v in bbox_um)
    c0, c1 = math.floor(x0 / slide.mpp_x), math.ceil(x1 / slide.mpp_x)
    r0, r1 = math.floor(y0 / slide.mpp_y), math.ceil(y1 / slide.mpp_y)
    if c1 <= c0 or r1 <= r0:
        raise RegionError(f"{option('bbox')} must have MAXX > MINX and MAXY > MINY, got {list(bbox_um)}")
    return _clip(
        Window.from_bounds(r0, c0, r1, c1),
        height,
        width,
        asked=option("bbox", tuple(f"{v:g}" for v in (x0, y0, x1, y1))) + " um",
    )


def resolve_region(
    *,
    height: int,
    width: int,
    georef: GeoRef | None = None,
    slide: SlideInfo | None = None,
    bbox: Sequence[float] | None = None,
    bbox_crs: str | None = None,
    window: Sequence[int] | None = None,
) -> Window:
    """The requested region as a pixel window: ``window``, ``bbox``, or the whole image.

    For a georeferenced image ``bbox`` is in map units (``bbox_crs``, default the image CRS);
    for a slide in microns (``bbox_crs`` must be unset or ``"um"``); for a plain image in pixels.
    """
    if bbox is not None and window is not None:
        raise RegionError(f"give either {option('bbox')} or {option('window')}, not both")
    if window is not None:
        return window_from_pixels(window, height=height, width=width)
    if bbox is None:
        return Window(0, 0, height, width)
    if georef is not None:
        return window_from_bbox(bbox, georef=georef, height=height, width=width, bbox_crs=bbox_crs)
    if bbox_crs not in (None, "um", "px"):
        raise RegionError(
            f"{option('bbox_crs')} {bbox_crs!r} given, but the image has no map georeference: "
            "use microns (um) or pixels (px) for slides and plain images"
        )
    if slide is not None and bbox_crs != "px":
        return window_from_microns(bbox, slide=slide, height=height, width=width)
    x0, y0, x1, y1 = bbox
    return window_from_pixels(
        (
            math.floor(x0),
            math.floor(y0),
            math.ceil(x1) - math.floor(x0),
            math.ceil(y1) - math.floor(y0),
        ),
        height=height,
        width=width,
    )
