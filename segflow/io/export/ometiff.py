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
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from segflow.config import ClassDef
from segflow.errors import ConfigError
from segflow.geometry import Window
from segflow.io.export._common import (
    ClassTable,
    IdChecker,
    atomic_output,
    check_integer_dtype,
    check_labels,
    check_nodata,
    downsample_mode2,
    iter_windows,
    read_window,
    scratch_path,
)
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


def write_ome_tiff_labels(  # noqa: C901, PLR0913 (house: to split)
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
    import tifffile
    import zarr

    shape = check_labels(labels)
    dtype = check_integer_dtype(labels.dtype, what="labels", allowed=_DTYPES)
    table = ClassTable(classes)
    nodata = check_nodata(nodata, dtype, table)
    if tile < 16 or tile % 16:
        raise ConfigError(f"tile must be a multiple of 16 and >= 16, got {tile}: use 512")
    if levels is not None and levels < 1:
        raise ConfigError(f"levels must be >= 1, got {levels}")
    if method not in ("mode", "nearest"):
        raise ConfigError(f"method must be 'mode' or 'nearest', got {method!r}")
    for label, v in (("mpp_x", mpp_x), ("mpp_y", mpp_y)):
        if v is not None and not v > 0:
            raise ConfigError(f"{label} must be > 0 micrometres, got {v}")
    height, width = shape
    shapes = _level_shapes(height, width, tile, levels)
    window = round_up(max(window, 2 * tile), 2 * tile)
    checker = IdChecker(table, dtype, nodata) if check_classes else None
    strip_cols = round_up(max(window, tile), tile)

    out = Path(path)
    with atomic_output(out) as tmp, scratch_path(out, ".zarr") as scratch:
        # 1. lower levels into a scratch store, each from the previous one, window by window
        pyramid: list[Any] = [labels]
        for k, (h, w) in enumerate(shapes[1:], start=1):
            arr = zarr.create_array(
                store=str(scratch),
                name=f"{k}",
                shape=(h, w),
                dtype=dtype,
                chunks=(min(tile, h), min(tile, w)),
                fill_value=0,
                zarr_format=3,
            )
            prev = pyramid[-1]
            ph, pw = shapes[k - 1]
            for win in iter_windows(ph, pw, window):
                block = read_window(prev, win)
                if k == 1 and checker is not None:
                    checker(block, win)
                small = downsample_mode2(block, method, nodata=nodata)
                arr[
                    win.row_off // 2 : win.row_off // 2 + small.shape[0],
                    win.col_off // 2 : win.col_off // 2 + small.shape[1],
                ] = small
            pyramid.append(arr)
        if len(shapes) == 1 and checker is not None:
            for win in iter_windows(height, width, window):
                checker(read_window(labels, win), win)

        # 2. the TIFF: level 0 with SubIFDs for the lower levels, tile by tile
        metadata: dict[str, Any] = {
            "axes": "YX",
            "Name": name,
            "Description": json.dumps(
                {
                    "segflow": {
                        "kind": "labels",
                        "nodata": nodata,
                        "classes": [c.model_dump() for c in table.classes],
                    }
                }
            ),
        }
        if mpp_x:
            metadata.update(PhysicalSizeX=float(mpp_x), PhysicalSizeXUnit="µm")
        if mpp_y:
            metadata.update(PhysicalSizeY=float(mpp_y), PhysicalSizeYUnit="µm")
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            for k, (h, w) in enumerate(shapes):
                res: dict[str, Any] = {}
                if mpp_x and mpp_y:
                    scale = 2**k
                    res = {
                        "resolution": (1e4 / (mpp_x * scale), 1e4 / (mpp_y * scale)),
                        "resolutionunit": "CENTIMETER",
                    }
                tif.write(
                    _iter_tiles(pyramid[k], h, w, tile, strip_cols),
                    shape=(h, w),
                    dtype=dtype,
                    tile=(tile, tile),
                    compression=compression,
                    photometric="minisblack",
                    subifds=len(shapes) - 1 if k == 0 else None,
                    subfiletype=1 if k else 0,
                    metadata=metadata if k == 0 else None,
                    maxworkers=1,
                    **res,
                )
    log.debug("wrote OME-TIFF %s with %d levels", out, len(shapes))
    return out
