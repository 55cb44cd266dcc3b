"""Pyramidal OME-TIFF label images for slide viewers (QuPath, OMERO, napari), streamed.

Level 0 is written tile by tile from the input array; each lower-resolution level (factor 2)
is first computed window by window from the level above into a temporary Zarr store beside the
output (so memory is bounded by a window, never by a level), then written as a SubIFD of
level 0. Downsampling is ``mode`` of each 2 x 2 block (ties go to the top-left pixel, which is
also what ``nearest`` takes), so every level holds only class ids. The OME-XML carries
``PhysicalSizeX/Y`` in micrometres for level 0, and the class table as the image description.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from segflow.config import ClassDef
from segflow.errors import ConfigError
from segflow.geometry import Window
from segflow.io.export._common import (
    IdChecker,
    atomic_output,
    downsample_mode2,
    iter_windows,
    read_window,
    scratch_path,
)
from segflow.io.export._inputs import ClassRaster, check_class_raster
from segflow.tiling import round_up

__all__ = ["downsample_mode2", "write_ome_tiff_labels"]

log = logging.getLogger(__name__)

_DTYPES = ("uint8", "uint16", "uint32")


def _level_shapes(height: int, width: int, tile: int, levels: int | None) -> list[tuple[int, int]]:
    shapes = [(height, width)]
    while True:
        h, w = shapes[-1]
        if levels is None and max(h, w) <= tile:
            break
        if levels is not None and len(shapes) >= levels:
            break
        if h == 1 and w == 1:
            break
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def _iter_tiles(
    arr: Any, height: int, width: int, tile: int, strip_cols: int
) -> Iterator[np.ndarray]:
    """Tiles in row-major order, reading ``tile`` x ``strip_cols`` strips (bounded memory)."""
    for r0 in range(0, height, tile):
        r1 = min(r0 + tile, height)
        for s0 in range(0, width, strip_cols):
            s1 = min(s0 + strip_cols, width)
            strip = read_window(arr, Window.from_bounds(r0, s0, r1, s1))
            for c0 in range(0, s1 - s0, tile):
                yield strip[:, c0 : c0 + tile]


def write_ome_tiff_labels(  # noqa: PLR0913 (public writer: its keyword options are its interface)
    labels: Any,
    path: str | Path,
    *,
    mpp_x: float | None,
    mpp_y: float | None,
    classes: Iterable[ClassDef | Mapping[str, Any]],
    tile: int = 512,
    levels: int | None = None,
    nodata: int | None = None,
    method: Literal["mode", "nearest"] = "mode",
    compression: str = "zlib",
    window: int = 2048,
    name: str = "labels",
    check_classes: bool = True,
) -> Path:
    """Write a 2-D class-id array as a tiled, pyramidal OME-TIFF (SubIFD levels).

    Parameters
    ----------
    labels
        ``(y, x)`` uint8/uint16/uint32 class ids, any array-like with slicing.
    path
        The output ``.ome.tif``; written under a temporary name and moved into place at the end.
    mpp_x, mpp_y
        Level-0 pixel size in micrometres (``PhysicalSizeX/Y``); ``None`` leaves them out.
    classes
        The class table, stored as JSON in the OME image description.
    tile
        Tile side (multiple of 16).
    levels
        Number of pyramid levels including level 0; default: halve until one tile holds it.
    nodata
        Value allowed besides the class ids (checked only).
    method
        ``"mode"`` of 2 x 2 cells (default) or ``"nearest"``.
    compression
        A tifffile compression, ``"zlib"`` (deflate, read by Bio-Formats) by default.
    window
        Side of the windows read when building lower levels (memory bound).

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> lab = np.zeros((100, 80), "uint8"); lab[20:60, 10:30] = 1
    >>> p = write_ome_tiff_labels(lab, tempfile.mkdtemp() + "/l.ome.tif", mpp_x=0.5, mpp_y=0.5,
    ...                           classes=[{"id": 0, "name": "bg"}, {"id": 1, "name": "x"}],
    ...                           tile=32)
    >>> with tifffile.TiffFile(p) as tif:
    ...     [lvl.shape for lvl in tif.series[0].levels]
    [(100, 80), (50, 40), (25, 20)]
    """
    raster = check_class_raster(labels, classes, nodata, allowed=_DTYPES)
    _check_options(tile, levels, method, mpp_x, mpp_y)
    layout = _plan_levels(raster.shape, tile, levels, window)
    checker = raster.checker(check_classes)
    out = Path(path)
    with atomic_output(out) as tmp, scratch_path(out, ".zarr") as scratch:
        # 1. lower levels into a scratch store, each from the previous one, window by window
        pyramid = _lower_levels(labels, scratch, layout, raster, method, checker)
        if len(layout.shapes) == 1 and checker is not None:
            height, width = raster.shape
            for win in iter_windows(height, width, layout.window):
                checker(read_window(labels, win), win)
        # 2. the TIFF: level 0 with SubIFDs for the lower levels, tile by tile
        metadata = _ome_metadata(name, raster, mpp_x, mpp_y)
        _write_tiff(tmp, pyramid, layout, raster.dtype, compression, metadata, mpp_x, mpp_y)
    log.debug("wrote OME-TIFF %s with %d levels", out, len(layout.shapes))
    return out


@dataclass(frozen=True)
class _Levels:
    """The pyramid's level shapes, its tile side and the sizes it is read in."""

    shapes: list[tuple[int, int]]
    tile: int
    window: int  # side of the windows read to build lower levels (a multiple of 2 * tile)
    strip_cols: int  # width of the strips the tiles of a level are read in


def _check_options(
    tile: int, levels: int | None, method: str, mpp_x: float | None, mpp_y: float | None
) -> None:
    """Tile side, number of levels, downsampling method and pixel sizes must be usable."""
    if tile < 16 or tile % 16:
        raise ConfigError(f"tile must be a multiple of 16 and >= 16, got {tile}: use 512")
    if levels is not None and levels < 1:
        raise ConfigError(f"levels must be >= 1, got {levels}")
    if method not in ("mode", "nearest"):
        raise ConfigError(f"method must be 'mode' or 'nearest', got {method!r}")
    for label, v in (("mpp_x", mpp_x), ("mpp_y", mpp_y)):
        if v is not None and not v > 0:
            raise ConfigError(f"{label} must be > 0 micrometres, got {v}")


def _plan_levels(shape: tuple[int, ...], tile: int, levels: int | None, window: int) -> _Levels:
    """The levels of a ``shape`` image and the window and strip sizes they are read in."""
    height, width = shape
    window = round_up(max(window, 2 * tile), 2 * tile)
    strip_cols = round_up(max(window, tile), tile)
    return _Levels(_level_shapes(height, width, tile, levels), tile, window, strip_cols)


def _lower_levels(
    labels: Any,
    scratch: Path,
    layout: _Levels,
    raster: ClassRaster,
    method: Literal["mode", "nearest"],
    checker: IdChecker | None,
) -> list[Any]:
    """``labels`` and its lower levels, each halved from the one above into ``scratch``.

    ``checker`` sees every window of ``labels`` as the first lower level is built.
    """
    import zarr

    pyramid: list[Any] = [labels]
    for k, (h, w) in enumerate(layout.shapes[1:], start=1):
        arr = zarr.create_array(
            store=str(scratch),
            name=f"{k}",
            shape=(h, w),
            dtype=raster.dtype,
            chunks=(min(layout.tile, h), min(layout.tile, w)),
            fill_value=0,
            zarr_format=3,
        )
        above = layout.shapes[k - 1]
        check = checker if k == 1 else None
        _halve(pyramid[-1], arr, above, layout.window, method, raster.nodata, check)
        pyramid.append(arr)
    return pyramid


def _halve(
    src: Any,
    dst: Any,
    shape: tuple[int, int],
    window: int,
    method: Literal["mode", "nearest"],
    nodata: int | None,
    checker: Callable[[np.ndarray, Window], None] | None,
) -> None:
    """Write ``src`` (of ``shape``) halved into ``dst``, window by window.

    ``checker`` (an :class:`IdChecker`, or any hook) sees every window of ``src`` first.
    """
    ph, pw = shape
    for win in iter_windows(ph, pw, window):
        block = read_window(src, win)
        if checker is not None:
            checker(block, win)
        small = downsample_mode2(block, method, nodata=nodata)
        dst[
            win.row_off // 2 : win.row_off // 2 + small.shape[0],
            win.col_off // 2 : win.col_off // 2 + small.shape[1],
        ] = small


def _ome_metadata(
    name: str, raster: ClassRaster, mpp_x: float | None, mpp_y: float | None
) -> dict[str, Any]:
    """The OME metadata of level 0: name, class table (as JSON) and pixel sizes."""
    metadata: dict[str, Any] = {
        "axes": "YX",
        "Name": name,
        "Description": json.dumps(
            {
                "segflow": {
                    "kind": "labels",
                    "nodata": raster.nodata,
                    "classes": [c.model_dump() for c in raster.table.classes],
                }
            }
        ),
    }
    if mpp_x:
        metadata.update(PhysicalSizeX=float(mpp_x), PhysicalSizeXUnit="µm")
    if mpp_y:
        metadata.update(PhysicalSizeY=float(mpp_y), PhysicalSizeYUnit="µm")
    return metadata


def _resolution(k: int, mpp_x: float | None, mpp_y: float | None) -> dict[str, Any]:
    """TIFF resolution tags of level ``k`` (pixels per cm), where both pixel sizes are known."""
    if not (mpp_x and mpp_y):
        return {}
    scale = 2**k
    return {
        "resolution": (1e4 / (mpp_x * scale), 1e4 / (mpp_y * scale)),
        "resolutionunit": "CENTIMETER",
    }


def _write_tiff(
    path: Path,
    pyramid: list[Any],
    layout: _Levels,
    dtype: np.dtype[Any],
    compression: str,
    metadata: dict[str, Any],
    mpp_x: float | None,
    mpp_y: float | None,
) -> None:
    """Level 0 of ``pyramid`` with the lower levels as SubIFDs, tile by tile."""
    import tifffile

    shapes = layout.shapes
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for k, (h, w) in enumerate(shapes):
            tif.write(
                _iter_tiles(pyramid[k], h, w, layout.tile, layout.strip_cols),
                shape=(h, w),
                dtype=dtype,
                tile=(layout.tile, layout.tile),
                compression=compression,
                photometric="minisblack",
                subifds=len(shapes) - 1 if k == 0 else None,
                subfiletype=1 if k else 0,
                metadata=metadata if k == 0 else None,
                maxworkers=1,
                **_resolution(k, mpp_x, mpp_y),
            )
