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

from segflow.errors import ConfigError
from segflow.geometry import Window
from segflow.io.store import GeoRef

__all__ = ["Mosaic", "Placement", "edge_distance", "place_scenes"]

#: Distance of a pixel from an edge that does not count (on the mosaic's boundary).
_FAR = np.iinfo(np.int32).max


@dataclass(frozen=True)
class Placement:
    """Where one scene's raster lies on the mosaic's grid (pixels)."""

    path: str
    row_off: int
    col_off: int
    height: int
    width: int

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


def place_scenes(paths: Sequence[str | Path]) -> tuple[GeoRef, int, int, list[Placement], Any]:
    """The union grid of the scenes' class rasters: its georeference, height and width,
    where each scene lies on it, and the rasters' data type and nodata (``(dtype, nodata)``).

    Raises
    ------
    ConfigError
        No scene; a raster without a CRS; scenes in different CRSs or pixel sizes, or not on
        one pixel grid (offsets that are not whole pixels).
    """
    import rasterio
    from rasterio.crs import CRS
    from rasterio.enums import WktVersion

    if not paths:
        raise ConfigError("no scene to mosaic: every scene failed or the collection is empty")
    heads = []
    for p in paths:
        with rasterio.open(p) as ds:
            if ds.crs is None:
                raise ConfigError(f"{str(p)!r} has no CRS: only georeferenced scenes mosaic")
            heads.append((str(p), CRS(ds.crs), ds.transform, ds.height, ds.width, ds.dtypes[0],
                          ds.nodata))  # fmt: skip
    crs, t0 = heads[0][1], heads[0][2]
    for path, c, t, *_ in heads[1:]:
        if c != crs:
            raise ConfigError(
                f"scene {path!r} is in {c.to_string()}, not {crs.to_string()} like "
                f"{heads[0][0]!r}: the scenes of a mosaic share one CRS"
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
    height = max(p.row_off + p.height for p in placements)
    width = max(p.col_off + p.width for p in placements)
    geotransform = (x0, t0.a, 0.0, y0, 0.0, t0.e)
    georef = GeoRef(crs_wkt=crs.to_wkt(version=WktVersion.WKT2_2019), epsg=crs.to_epsg(),
                    geotransform=geotransform)  # fmt: skip
    return georef, height, width, placements, (np.dtype(heads[0][5]), heads[0][6])


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

    def _dataset(self, path: str) -> Any:
        import rasterio

        handles: dict[str, Any] = getattr(self._local, "handles", None) or {}
        self._local.handles = handles
        if path not in handles:
            handles[path] = rasterio.open(path)
        return handles[path]

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
            data = self._dataset(p.path).read(
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
            ds.close()
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
