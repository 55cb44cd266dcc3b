"""A quick-look PNG: the image, contrast-stretched, with the class colours overlaid.

Both arrays are decimated while they are read (strided windows of a few rows at a time), so
memory is bounded by the output size, never by the scene.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence, Set
from pathlib import Path
from typing import Any

import numpy as np

from segflow.config import ClassDef
from segflow.errors import ConfigError
from segflow.io.export._common import ClassTable, atomic_output, check_labels

__all__ = ["decimate", "quicklook_png", "stretch"]

log = logging.getLogger(__name__)


def decimate(arr: Any, step: int, *, rows_per_read: int = 256) -> np.ndarray:
    """Every ``step``-th pixel of the last two axes, read a strip of output rows at a time.

    Examples
    --------
    >>> decimate(np.arange(25).reshape(5, 5), 2)
    array([[ 0,  2,  4],
           [10, 12, 14],
           [20, 22, 24]])
    """
    height, width = int(arr.shape[-2]), int(arr.shape[-1])
    lead = tuple(int(s) for s in arr.shape[:-2])
    out_h, out_w = -(-height // step), -(-width // step)
    out = np.empty((*lead, out_h, out_w), dtype=np.dtype(arr.dtype))
    rows = max(1, rows_per_read)
    for o0 in range(0, out_h, rows):
        o1 = min(o0 + rows, out_h)
        r0, r1 = o0 * step, min(o1 * step, height)
        out[..., o0:o1, :] = np.asarray(arr[(..., slice(r0, r1, step), slice(0, width, step))])
    return out


def stretch(
    image: np.ndarray,
    percentiles: tuple[float, float] = (2.0, 98.0),
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Scale each band of ``(band, y, x)`` to uint8 between its low and high percentiles."""
    out = np.zeros(image.shape, dtype=np.uint8)
    for i, band in enumerate(image):
        b = band.astype("float64")
        ok = np.isfinite(b) if valid is None else (valid & np.isfinite(b))
        if not ok.any():
            continue
        lo, hi = np.percentile(b[ok], percentiles)
        if hi <= lo:
            hi = lo + 1.0
        out[i] = np.clip((b - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)
        out[i][~ok] = 0
    return out


def _read_image(image: Any, step: int, out_shape: tuple[int, int]) -> np.ndarray:
    if hasattr(image, "read") and hasattr(image, "count"):  # a rasterio dataset: use overviews
        from rasterio.enums import Resampling

        return np.asarray(
            image.read(out_shape=(image.count, *out_shape), resampling=Resampling.nearest)
        )
    arr = decimate(image, step)
    if arr.ndim == 2:
        arr = arr[None]
    return arr


def quicklook_png(
    image: Any | None,
    labels: Any,
    path: str | Path,
    *,
    classes: Iterable[ClassDef | Mapping[str, Any]],
    nodata: int | None = 255,
    max_size: int = 1024,
    alpha: float = 0.5,
    bands: Sequence[int] | None = None,
    skip_classes: Iterable[int] = (0,),
    image_nodata: float | None = None,
    percentiles: tuple[float, float] = (2.0, 98.0),
) -> Path:
    """Write a PNG of ``image`` (stretched 2-98 %) with ``labels`` coloured on top.

    Parameters
    ----------
    image
        ``(band, y, x)`` or ``(y, x)`` array-like (zarr, numpy), an open rasterio dataset, or
        ``None`` for the labels alone on black.
    labels
        ``(y, x)`` class ids on the same pixel grid as ``image``.
    path
        The output ``.png`` (written atomically).
    classes
        Class colours; classes in ``skip_classes`` (background) and ``nodata`` stay clear.
    max_size
        Longest side of the PNG: both arrays are decimated by ``ceil(max(h, w) / max_size)``.
    alpha
        Opacity of the class colours, 0..1.
    bands
        Which three bands (0-based) are red, green, blue; default the first three (or one band
        as grey).
    image_nodata
        Image value left out of the percentile stretch.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> img = np.arange(3 * 40 * 60, dtype="uint16").reshape(3, 40, 60)
    >>> lab = np.zeros((40, 60), "uint8"); lab[10:20, 10:30] = 1
    >>> p = quicklook_png(img, lab, tempfile.mkdtemp() + "/q.png", max_size=30,
    ...                   classes=[{"id": 0, "name": "bg"}, {"id": 1, "name": "x", "color": "#ff0000"}])
    >>> from PIL import Image
    >>> Image.open(p).size
    (30, 20)
    """
    from PIL import Image

    lshape = check_labels(labels)
    table = ClassTable(classes)
    _check_look(max_size, alpha)
    if image is not None:
        _check_same_grid(image, lshape)
    height, width = lshape
    step = max(1, math.ceil(max(height, width) / max_size))
    lab = decimate(labels, step)
    out_shape = lab.shape
    if image is not None:
        rgb = _image_rgb(image, step, out_shape, bands, image_nodata, percentiles)
    else:
        rgb = np.zeros((*out_shape, 3), dtype="float32")
    _overlay(rgb, lab, table, {int(c) for c in skip_classes}, nodata, alpha)
    png = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))
    with atomic_output(path) as tmp:
        png.save(tmp, format="PNG", optimize=True)
    log.debug("wrote quick-look %s (%d x %d, step %d)", path, out_shape[1], out_shape[0], step)
    return Path(path)


def _check_look(max_size: int, alpha: float) -> None:
    """The PNG size and the opacity of the class colours must be usable."""
    if max_size < 1:
        raise ConfigError(f"max_size must be >= 1, got {max_size}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be between 0 and 1, got {alpha}")


def _check_same_grid(image: Any, lshape: tuple[int, ...]) -> None:
    """``image`` (an array-like or a rasterio dataset) must have the labels' ``(y, x)`` size."""
    ishape = tuple(
        int(s)
        for s in (
            (image.count, image.height, image.width)
            if hasattr(image, "count") and hasattr(image, "read")
            else image.shape
        )
    )
    if ishape[-2:] != lshape:
        raise ConfigError(
            f"image {ishape[-2:]} and labels {lshape} are not on the same pixel grid: "
            "pass the image of the region that was segmented"
        )


def _image_rgb(
    image: Any,
    step: int,
    out_shape: tuple[int, int],
    bands: Sequence[int] | None,
    image_nodata: float | None,
    percentiles: tuple[float, float],
) -> np.ndarray:
    """``image`` decimated by ``step`` as contrast-stretched ``(y, x, 3)`` float32 RGB."""
    img = _read_image(image, step, out_shape)
    if bands is None:
        bands = (0, 1, 2) if img.shape[0] >= 3 else (0, 0, 0)
    if len(bands) != 3 or any(not 0 <= b < img.shape[0] for b in bands):
        raise ConfigError(f"bands must be three band indices below {img.shape[0]}, got {bands}")
    valid = None
    if image_nodata is not None:
        valid = ~np.all(img == image_nodata, axis=0)
    return stretch(img[list(bands)], percentiles, valid).transpose(1, 2, 0).astype("float32")


def _overlay(
    rgb: np.ndarray,
    lab: np.ndarray,
    table: ClassTable,
    skip: Set[int],
    nodata: int | None,
    alpha: float,
) -> None:
    """Blend the class colours into ``rgb`` in place (not ``skip`` classes nor ``nodata``)."""
    for c in table.classes:
        if c.id in skip or c.id == nodata:
            continue
        sel = lab == c.id
        if sel.any():
            rgb[sel] = (1.0 - alpha) * rgb[sel] + alpha * np.array(c.rgb, dtype="float32")
