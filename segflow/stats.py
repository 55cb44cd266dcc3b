"""Class frequencies, class weights, the training region and valid pixels (DESIGN.md section 4);
the band statistics of the normalization fingerprint are in :mod:`segflow.fingerprint`.

Everything here is either pure (numpy on small arrays) or builds *lazy* Dask work: the
functions that scan a scene return ``dask.delayed`` objects (one task per chunk, combined by a
tree reduction), and the caller computes them with its own scheduler or client. Nothing here
reads or writes files.

**Training region.** Statistics and class frequencies are taken over the valid pixels of the
training region only (:class:`~segflow.config.TrainRegion`): a pixel window (``bbox``), or a
block split where blocks of ``block`` x ``block`` pixels are numbered row-major from 0 over the
image and block ``k`` is held out when ``k % holdout_every == holdout_every - 1`` (the
``holdout_every``-th, ``2 * holdout_every``-th, ... block). :func:`train_mask_for_window` gives
that mask for any window, so training can reuse it.

**Statistics.** In float64: mean, population standard deviation (``ddof=0``, as numpy), min,
max, merged across chunks with Chan's parallel update (no sum-of-squares cancellation).
Percentiles 0.5 and 99.5 use numpy's default ``linear`` definition. For integer images of at
most 16 bits they are *exact* (per-band histograms with one bin per value). For other dtypes
(float, 32-bit ints) they come from a second pass with a 65536-bin histogram over
``[min, max]``, assuming values spread evenly inside a bin: the error is at most one bin width,
``(max - min) / 65536``. A pixel of a float image where any band is NaN or +/-inf is invalid:
it counts in ``nodata_fraction`` and in no band's statistics.

Examples
--------
>>> from segflow.config import TrainRegion
>>> from segflow.geometry import Window
>>> region = TrainRegion(block=2, holdout_every=2)
>>> train_mask_for_window(region, Window(0, 0, 2, 8), image_shape=(4, 8)).astype(int)
array([[1, 1, 0, 0, 1, 1, 0, 0],
       [1, 1, 0, 0, 1, 1, 0, 0]])
>>> {c: round(w, 6) for c, w in class_weights({0: 900, 1: 100}, "inverse").items()}
{0: 0.2, 1: 1.8}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np

from segflow.config import TrainRegion
from segflow.errors import ConfigError, RegionError
from segflow.geometry import Window

__all__ = [
    "block_windows",
    "check_train_region",
    "class_counts",
    "class_weights",
    "counts_to_dict",
    "sum_parts",
    "train_mask_for_window",
    "tree_reduce",
    "valid_and_finite",
    "yx_chunks",
]

ClassWeightMode = Literal["none", "inverse", "median", "explicit"]


# --------------------------------------------------------------------------- region
def check_train_region(region: TrainRegion | None, height: int, width: int) -> None:
    """Raise :class:`RegionError` if ``region`` selects no pixel of a ``height`` x ``width`` image."""
    if region is None or region.bbox is None:
        return
    r0, c0, r1, c1 = region.bbox
    inside = Window.from_bounds(r0, c0, r1, c1).intersection(Window(0, 0, height, width))
    if inside.size == 0:
        raise RegionError(
            f"training region bbox {tuple(region.bbox)} (row_start, col_start, row_stop, col_stop) "
            f"does not overlap the image of {height} x {width} pixels: give rows within "
            f"[0, {height}) and columns within [0, {width})"
        )


def train_mask_for_window(
    region: TrainRegion | None, window: Window, *, image_shape: tuple[int, int]
) -> np.ndarray:
    """Which pixels of ``window`` belong to the training region (bool, ``window.shape``).

    Pure; ``image_shape`` (height, width) is needed because blocks are numbered row-major over
    the whole image. ``region=None`` means the whole image. The held-out (validation) part of a
    block split is ``~mask``.
    """
    rows = np.arange(window.row_off, window.row_stop)
    cols = np.arange(window.col_off, window.col_stop)
    if region is None:
        return np.ones(window.shape, bool)
    if region.bbox is not None:
        r0, c0, r1, c1 = region.bbox
        return ((rows >= r0) & (rows < r1))[:, None] & ((cols >= c0) & (cols < c1))[None, :]
    assert region.block is not None and region.holdout_every is not None
    b, every = region.block, region.holdout_every
    blocks_per_row = -(-image_shape[1] // b)
    k = (rows // b)[:, None] * blocks_per_row + (cols // b)[None, :]
    return np.asarray(k % every != every - 1)


def block_windows(
    chunks: tuple[tuple[int, ...], tuple[int, ...]],
) -> list[tuple[tuple[int, int], Window]]:
    out = []
    r = 0
    for i, h in enumerate(chunks[0]):
        c = 0
        for j, w in enumerate(chunks[1]):
            out.append(((i, j), Window(r, c, h, w)))
            c += w
        r += h
    return out


def tree_reduce(parts: list[Any], combine: Callable[..., Any], fan: int = 8) -> Any:
    from dask import delayed

    if not parts:
        raise RegionError("nothing to reduce: the image has no chunks")
    while len(parts) > 1:
        parts = [
            delayed(combine, pure=True)(*parts[i : i + fan]) for i in range(0, len(parts), fan)
        ]
    if not hasattr(parts[0], "dask"):
        parts = [delayed(combine, pure=True)(parts[0])]
    return parts[0]


def yx_chunks(x: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (x.chunks[-2], x.chunks[-1])


# --------------------------------------------------------------------------- class counts
def _bins_for(dtype: Any) -> int:
    dt = np.dtype(dtype)
    if dt.kind != "u" or dt.itemsize > 2:
        raise ConfigError(f"labels must be uint8 or uint16, got {dt}: re-run ingest")
    return 1 << (8 * dt.itemsize)


def _count_block(
    labels: np.ndarray,
    valid: np.ndarray | None,
    window: Window,
    region: TrainRegion | None,
    image_shape: tuple[int, int],
    ignore_index: int,
    nbins: int,
) -> np.ndarray:
    keep = labels != ignore_index
    if valid is not None:
        keep &= valid
    if region is not None:
        keep &= train_mask_for_window(region, window, image_shape=image_shape)
    return np.bincount(labels[keep].ravel(), minlength=nbins).astype(np.int64)


def sum_parts(*parts: np.ndarray) -> np.ndarray:
    out = parts[0].copy()
    for p in parts[1:]:
        out += p
    return out


def class_counts(
    labels: Any,
    valid: Any | None = None,
    *,
    ignore_index: int = 255,
    region: TrainRegion | None = None,
) -> Any:
    """Pixels per class id over valid, labelled pixels of the training region (lazy).

    One ``np.bincount`` per chunk, summed by a tree reduction. Pixels equal to
    ``ignore_index`` and invalid pixels are skipped.

    Returns
    -------
    dask.delayed.Delayed
        Computes to an int64 array of length 256 (uint8 labels) or 65536 (uint16).
    """
    from dask import delayed

    nbins = _bins_for(labels.dtype)
    shape = (int(labels.shape[0]), int(labels.shape[1]))
    if valid is not None:
        valid = valid.rechunk(labels.chunks)
    lab_blocks = labels.to_delayed()
    val_blocks = valid.to_delayed() if valid is not None else None
    parts = []
    for (i, j), window in block_windows(yx_chunks(labels)):
        v = val_blocks[i, j] if val_blocks is not None else None
        parts.append(
            delayed(_count_block, pure=True)(
                lab_blocks[i, j], v, window, region, shape, ignore_index, nbins
            )
        )
    return tree_reduce(parts, sum_parts)


def counts_to_dict(
    counts: np.ndarray, *, class_ids: Iterable[int] = (), ignore_index: int = 255
) -> dict[int, int]:
    """``{class_id: count}`` for every id in ``class_ids`` and every id counted (sorted)."""
    ids = {int(i) for i in np.flatnonzero(counts)} | {int(c) for c in class_ids}
    ids.discard(ignore_index)
    return {i: int(counts[i]) if i < len(counts) else 0 for i in sorted(ids)}


def class_weights(
    counts: Mapping[int, int],
    mode: ClassWeightMode,
    *,
    explicit: Mapping[int, float] | None = None,
) -> dict[int, float]:
    """Per-class loss weights ``w_c`` from class pixel counts.

    Modes
    -----
    ``none``
        1 for every class.
    ``inverse``
        ``1 / f_c`` with ``f_c = count_c / total``, scaled so that the mean over the classes
        present (count > 0) is 1.
    ``median``
        Median-frequency balancing (Eigen & Fergus 2015): ``median(f) / f_c`` over the classes
        present. With one scene the frequency of a class is its share of all labelled pixels.
    ``explicit``
        The values in ``explicit`` (every class present must be listed; weights >= 0).

    Classes listed in ``counts`` with count 0 get weight 1 (they do not occur in the training
    region; 1 is neutral).
    """
    ids = sorted(int(c) for c in counts)
    present = [c for c in ids if counts[c] > 0]
    if mode == "none":
        return {c: 1.0 for c in ids}
    if mode == "explicit":
        if explicit is None:
            raise ConfigError(
                "class weight mode 'explicit' needs explicit_class_weights: give id=weight pairs"
            )
        bad = {c: w for c, w in explicit.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ConfigError(f"explicit class weights must be finite and >= 0, got {bad}")
        missing = [c for c in present if c not in explicit]
        if missing:
            raise ConfigError(
                f"explicit class weights lack classes present in the labels: {missing}: add them"
            )
        out = {c: 1.0 for c in ids}
        out.update({int(c): float(w) for c, w in explicit.items()})
        return out
    if mode not in ("inverse", "median"):
        raise ConfigError(
            f"unknown class weight mode {mode!r}: use none, inverse, median or explicit"
        )
    if not present:
        raise RegionError(
            "no labelled valid pixels in the training region: cannot compute "
            f"{mode!r} class weights; choose another region or --class-weights none"
        )
    total = float(sum(counts[c] for c in present))
    freq = {c: counts[c] / total for c in present}
    if mode == "inverse":
        raw = {c: 1.0 / f for c, f in freq.items()}
        scale = len(raw) / sum(raw.values())
        weights = {c: v * scale for c, v in raw.items()}
    else:
        med = float(np.median(list(freq.values())))
        weights = {c: med / f for c, f in freq.items()}
    out = {c: 1.0 for c in ids}
    out.update({c: float(w) for c, w in weights.items()})
    return out


# --------------------------------------------------------------------------- valid pixels
def valid_and_finite(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``valid`` and "every band of the pixel is finite" (NaN and +/-inf are nodata).

    Parameters
    ----------
    data : ``(band, rows, cols)`` pixels.
    valid : ``(rows, cols)`` boolean mask of the same window.

    Returns
    -------
    numpy.ndarray
        A new ``(rows, cols)`` boolean array for float and complex ``data``; ``valid`` itself
        (as bool) for other dtypes, which cannot hold non-finite values.

    Examples
    --------
    >>> data = np.array([[[1.0, np.nan, np.inf, -np.inf]]], dtype=np.float32)
    >>> valid_and_finite(data, np.ones((1, 4), bool)).tolist()
    [[True, False, False, False]]
    """
    valid = np.asarray(valid, dtype=bool)
    data = np.asarray(data)
    if data.dtype.kind not in "fc":
        return valid
    return np.asarray(valid & np.isfinite(data).all(axis=0))
