"""One class raster over many scenes' predictions, on their common pixel grid.

Each mosaic pixel comes from the scene in which it lies farthest from an *inner* edge: an
edge of the scene that is not on the mosaic's outer boundary. There, and only there, a
scene's prediction differs from one run over the union (its mirror padding stands in for
the neighbouring scene's pixels); at the union's own boundary both runs pad alike. So when
neighbouring scenes overlap by at least twice the model's halo, every pixel is taken at
least one halo from any inner edge, and the mosaic equals segment_region over the union,
pixel for pixel, provided the scenes' tiles share the union's down-sampling grid (scenes
cut at multiples of the model's size multiple). Ties go to the scene listed first.

:class:`Mosaic` is an array-like (``shape``, ``dtype``, numpy slicing), so the COG and
polygon writers stream it window by window: memory follows the window, never the mosaic or
the number of scenes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segflow.errors import ConfigError, option
from segflow.geometry import Window
from segflow.io.store import GeoRef

__all__ = ["Mosaic", "Placement", "edge_distance", "place_scenes"]

#: Distance of a pixel from an edge that does not count (on the mosaic's boundary).
_FAR = np.iinfo(np.int32).max


@dataclass(frozen=True)
class Warp:
    """A scene reprojected onto the mosaic's grid: its CRS (WKT), transform and size there."""

    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int


@dataclass(frozen=True)
class Placement:
    """Where one scene's raster lies on the mosaic's grid (pixels), and its reprojection
    onto that grid (nearest neighbour) when it is in another CRS."""

    path: str
    row_off: int
    col_off: int
    height: int
    width: int
    warp: Warp | None = None

    @property
    def window(self) -> Window:
        return Window(self.row_off, self.col_off, self.height, self.width)


def edge_distance(
    rows: np.ndarray, cols: np.ndarray, scene: Window, mosaic_shape: tuple[int, int]
) -> np.ndarray:
    """Pixels from each ``(rows[i], cols[j])`` (mosaic coordinates, inside ``scene``) to the
    nearest inner edge of ``scene``; edges on the mosaic's boundary are infinitely far.

    Examples
    --------
    >>> edge_distance(np.arange(4), np.arange(2, 4), Window(0, 2, 4, 2), (4, 8)).tolist()
    [[0, 0], [0, 0], [0, 0], [0, 0]]
    >>> edge_distance(np.arange(1), np.arange(0, 4), Window(0, 0, 1, 4), (1, 8)).tolist()
    [[3, 2, 1, 0]]
    """
    h, w = mosaic_shape
    far = np.full_like(rows, _FAR, dtype=np.int64)
    top = rows - scene.row_off if scene.row_off > 0 else far
    bottom = scene.row_stop - 1 - rows if scene.row_stop < h else far
    farc = np.full_like(cols, _FAR, dtype=np.int64)
    left = cols - scene.col_off if scene.col_off > 0 else farc
    right = scene.col_stop - 1 - cols if scene.col_stop < w else farc
    by_row = np.minimum(top, bottom).astype(np.int64)
    by_col = np.minimum(left, right).astype(np.int64)
    return np.minimum.outer(by_row, by_col)


def place_scenes(
    paths: Sequence[str | Path], *, crs: str | None = None
) -> tuple[GeoRef, int, int, list[Placement], Any]:
    """The union grid of the scenes' class rasters: its georeference, height and width,
    where each scene lies on it, and the rasters' data type and nodata (``(dtype, nodata)``).

    With ``crs`` (``EPSG:3857``, WKT, ...), every scene is reprojected (nearest neighbour:
    class ids stay class ids) onto one grid in that CRS, at the finest scene's resolution,
    anchored at the CRS's origin so that every scene's pixels line up.

    Raises
    ------
    ConfigError
        No scene; a raster without a CRS; without ``crs``, scenes in different CRSs or pixel
        sizes, or not on one pixel grid (offsets that are not whole pixels); an unknown ``crs``.
    """
    import rasterio
    from rasterio.crs import CRS

    if not paths:
        raise ConfigError("no scene to mosaic: every scene failed or the collection is empty")
    heads = []
    for p in paths:
        with rasterio.open(p) as ds:
            if ds.crs is None:
                raise ConfigError(f"{str(p)!r} has no CRS: only georeferenced scenes mosaic")
            heads.append((str(p), CRS(ds.crs), ds.transform, ds.height, ds.width, ds.dtypes[0],
                          ds.nodata))  # fmt: skip
    if crs is not None:
        return _warped(heads, _target_crs(crs))
    crs0, t0 = heads[0][1], heads[0][2]
    for path, c, t, *_ in heads[1:]:
        if c != crs0:
            raise ConfigError(
                f"scene {path!r} is in {c.to_string()}, not {crs0.to_string()} like "
                f"{heads[0][0]!r}: pass {option('mosaic_crs')} to reproject the mosaic into "
                "one CRS (e.g. EPSG:3857)"
            )
        if not (math.isclose(t.a, t0.a) and math.isclose(t.e, t0.e) and t.b == t.d == 0):
            raise ConfigError(
                f"scene {path!r} has pixels of {t.a} x {-t.e}, not {t0.a} x {-t0.e}: the "
                "scenes of a mosaic share one pixel size (resample them first)"
            )
    x0 = min(t.c for _, _, t, *_ in heads)
    y0 = max(t.f for _, _, t, *_ in heads)
    placements = []
    for path, _, t, h, w, *_ in heads:
        col, row = (t.c - x0) / t0.a, (t.f - y0) / t0.e
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            raise ConfigError(
                f"scene {path!r} is offset by {col:.3f} x {row:.3f} pixels from the others: "
                "the scenes of a mosaic lie on one pixel grid"
            )
        placements.append(Placement(path, round(row), round(col), h, w))
    return _union(placements, crs0, x0, y0, t0.a, t0.e), *_extent(placements), placements, \
        (np.dtype(heads[0][5]), heads[0][6])  # fmt: skip


def _extent(placements: Sequence[Placement]) -> tuple[int, int]:
    return (max(p.row_off + p.height for p in placements),
            max(p.col_off + p.width for p in placements))  # fmt: skip


def _union(placements: Sequence[Placement], crs: Any, x0: float, y0: float, dx: float,
           dy: float) -> GeoRef:  # fmt: skip
    from rasterio.enums import WktVersion

    return GeoRef(crs_wkt=crs.to_wkt(version=WktVersion.WKT2_2019), epsg=crs.to_epsg(),
                  geotransform=(x0, dx, 0.0, y0, 0.0, dy))  # fmt: skip


def _target_crs(text: str) -> Any:
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        return CRS.from_user_input(text)
    except CRSError:
        raise ConfigError(
            f"{option('mosaic_crs', text)} is not a CRS GDAL knows: pass e.g. EPSG:3857"
        ) from None


def _warped(
    heads: list[tuple[Any, ...]], crs: Any
) -> tuple[GeoRef, int, int, list[Placement], Any]:
    """Every scene on one grid in ``crs``: each scene's footprint snapped outwards to whole
    pixels of the finest resolution, the grid anchored at the CRS's origin."""
    from rasterio.warp import calculate_default_transform, transform_bounds
    from rasterio.windows import bounds as window_bounds

    boxes, res = [], math.inf
    for _path, src_crs, t, h, w, *_ in heads:
        box = transform_bounds(src_crs, crs, *window_bounds(((0, h), (0, w)), t))
        dst_t, _, _ = calculate_default_transform(
            src_crs, crs, w, h, *window_bounds(((0, h), (0, w)), t)
        )
        boxes.append(box)
        res = min(res, abs(dst_t.a), abs(dst_t.e))
    snapped = []
    for left, bottom, right, top in boxes:
        x0, y1 = math.floor(left / res) * res, math.ceil(top / res) * res
        snapped.append((x0, y1, math.ceil((right - x0) / res), math.ceil((y1 - bottom) / res)))
    gx0, gy0 = min(s[0] for s in snapped), max(s[1] for s in snapped)
    wkt = crs.to_wkt()
    placements = [
        Placement(h[0], round((gy0 - y1) / res), round((x0 - gx0) / res), hh, ww,
                  Warp(wkt, (x0, res, 0.0, y1, 0.0, -res), ww, hh))
        for h, (x0, y1, ww, hh) in zip(heads, snapped, strict=True)
    ]  # fmt: skip
    return _union(placements, crs, gx0, gy0, res, -res), *_extent(placements), placements, \
        (np.dtype(heads[0][5]), heads[0][6])  # fmt: skip


class Mosaic:
    """The mosaic of ``placements`` as a lazy 2-D array (see the module notes).

    Pixels no scene covers, or that every covering scene marks ``nodata``, are ``nodata``.
    """

    ndim = 2

    def __init__(
        self, placements: Sequence[Placement], shape: tuple[int, int], dtype: Any, nodata: int
    ) -> None:
        self.placements = tuple(placements)
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.nodata = int(nodata)
        self._local = threading.local()

    def _dataset(self, p: Placement) -> Any:
        import rasterio

        handles: dict[str, Any] = getattr(self._local, "handles", None) or {}
        self._local.handles = handles
        if p.path not in handles:
            handles[p.path] = ds = rasterio.open(p.path)
            if p.warp is not None:
                from affine import Affine
                from rasterio.enums import Resampling
                from rasterio.vrt import WarpedVRT

                w = p.warp
                handles[p.path] = WarpedVRT(ds, crs=w.crs_wkt, transform=Affine.from_gdal(*w.transform),
                                            width=w.width, height=w.height, nodata=self.nodata,
                                            resampling=Resampling.nearest)  # fmt: skip
        return handles[p.path]

    def __getitem__(self, key: Any) -> np.ndarray:
        from rasterio.windows import Window as RWindow

        window = _window_of(key, self.shape)
        out = np.full(window.shape, self.nodata, dtype=self.dtype)
        best = np.full(window.shape, -1, dtype=np.int64)
        rows = np.arange(window.row_off, window.row_stop)
        cols = np.arange(window.col_off, window.col_stop)
        for p in self.placements:
            both = window.intersection(p.window)
            if both.size == 0:
                continue
            inner = both.relative_to(p.window)
            data = self._dataset(p).read(
                1, window=RWindow(inner.col_off, inner.row_off, inner.width, inner.height)
            )
            at = both.relative_to(window)
            dist = edge_distance(rows[at.slices[0]], cols[at.slices[1]], p.window, self.shape)
            here_best, here_out = best[at.slices], out[at.slices]
            take = (data != self.nodata) & (dist > here_best)
            here_out[take] = data[take]
            here_best[take] = dist[take]
        return out

    def close(self) -> None:
        """Close this thread's open rasters."""
        for ds in (getattr(self._local, "handles", None) or {}).values():
            source = getattr(ds, "src_dataset", None)  # a WarpedVRT's own raster
            ds.close()
            if source is not None:
                source.close()
        self._local.handles = {}


def _window_of(key: Any, shape: tuple[int, int]) -> Window:
    """The window a ``[..., rows, cols]`` key of unit-step slices selects."""
    parts = [k for k in (key if isinstance(key, tuple) else (key,)) if k is not Ellipsis]
    while len(parts) < 2:
        parts.append(slice(None))
    (r0, r1, rs), (c0, c1, cs) = (s.indices(n) for s, n in zip(parts, shape, strict=True))
    if rs != 1 or cs != 1:
        raise ValueError("a mosaic is read by windows of unit-step slices")
    return Window(r0, c0, r1 - r0, c1 - c0)
