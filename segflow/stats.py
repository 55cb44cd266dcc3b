"""Class frequencies, class weights and the normalization fingerprint (DESIGN.md section 4).

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

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from segflow.atomic import write_json_atomic
from segflow.config import TrainRegion
from segflow.errors import ConfigError, RegionError
from segflow.geometry import Window

__all__ = [
    "valid_and_finite",
    "FLOAT_HIST_BINS",
    "FINGERPRINT_VERSION",
    "BandMoments",
    "Fingerprint",
    "band_histograms",
    "band_moments",
    "check_train_region",
    "class_counts",
    "class_weights",
    "counts_to_dict",
    "fingerprint_from_moments",
    "percentiles",
    "pixel_size",
    "train_mask_for_window",
]

#: Bins of the histogram that approximates percentiles of non-integer images.
FLOAT_HIST_BINS = 1 << 16
#: Version of the fingerprint document.
FINGERPRINT_VERSION = 1
#: The percentiles stored in the fingerprint.
PERCENTILES = (0.5, 99.5)

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


def _block_windows(
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


def _tree(parts: list[Any], combine: Callable[..., Any], fan: int = 8) -> Any:
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


def _yx_chunks(x: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
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


def _sum(*parts: np.ndarray) -> np.ndarray:
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
    for (i, j), window in _block_windows(_yx_chunks(labels)):
        v = val_blocks[i, j] if val_blocks is not None else None
        parts.append(
            delayed(_count_block, pure=True)(
                lab_blocks[i, j], v, window, region, shape, ignore_index, nbins
            )
        )
    return _tree(parts, _sum)


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


# --------------------------------------------------------------------------- band statistics
@dataclass
class BandMoments:
    """Mergeable per-band summaries of the training pixels (float64)."""

    n: np.ndarray  # (B,) pixels counted per band
    mean: np.ndarray  # (B,)
    m2: np.ndarray  # (B,) sum of squared deviations from the mean
    min: np.ndarray  # (B,)
    max: np.ndarray  # (B,)
    hist: np.ndarray | None  # (B, L) exact value histogram for <= 16-bit integer images
    valid_pixels: int  # valid pixels in the scanned area (whole image, any region)
    pixels: int  # all pixels in the scanned area

    @staticmethod
    def merge(*parts: BandMoments) -> BandMoments:
        """Chan et al.'s parallel combination of means and squared deviations."""
        out = parts[0]
        for p in parts[1:]:
            n = out.n + p.n
            na, nb, nn = out.n.astype(np.float64), p.n.astype(np.float64), np.maximum(n, 1)
            delta = p.mean - out.mean
            mean = np.where(
                out.n == 0, p.mean, np.where(p.n == 0, out.mean, out.mean + delta * nb / nn)
            )
            m2 = out.m2 + p.m2 + delta * delta * na * nb / nn
            hist = None
            if out.hist is not None and p.hist is not None:
                hist = out.hist + p.hist
            out = BandMoments(
                n=n,
                mean=mean,
                m2=m2,
                min=np.fmin(out.min, p.min),
                max=np.fmax(out.max, p.max),
                hist=hist,
                valid_pixels=out.valid_pixels + p.valid_pixels,
                pixels=out.pixels + p.pixels,
            )
        return out


def _int_hist_spec(dtype: Any) -> tuple[int, int] | None:
    """(bins, offset) of an exact histogram for integer dtypes of at most 16 bits."""
    dt = np.dtype(dtype)
    if dt.kind in "ui" and dt.itemsize <= 2:
        bins = 1 << (8 * dt.itemsize)
        return bins, (0 if dt.kind == "u" else bins // 2)
    return None


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


def _train_pixels(
    image: np.ndarray,
    valid: np.ndarray | None,
    window: Window,
    region: TrainRegion | None,
    image_shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """(mask of training pixels, mask of valid pixels) of one block.

    A pixel where any band is NaN or +/-inf is invalid (as ingest marks it in ``valid``; done
    here again for stores written before that rule), so it counts in ``nodata_fraction`` and
    is left out of every band's statistics.
    """
    vmask = valid_and_finite(image, np.ones(window.shape, bool) if valid is None else valid)
    mask = vmask & train_mask_for_window(region, window, image_shape=image_shape)
    return mask, vmask


def _moments_block(
    image: np.ndarray,
    valid: np.ndarray | None,
    window: Window,
    region: TrainRegion | None,
    image_shape: tuple[int, int],
) -> BandMoments:
    mask, vmask = _train_pixels(image, valid, window, region, image_shape)
    bands = image.shape[0]
    n = np.zeros(bands, np.int64)
    mean, m2 = np.zeros(bands), np.zeros(bands)
    lo, hi = np.full(bands, np.nan), np.full(bands, np.nan)
    spec = _int_hist_spec(image.dtype)
    hist = np.zeros((bands, spec[0]), np.int64) if spec else None
    for b in range(bands):
        x = image[b][mask]
        if image.dtype.kind == "f":
            x = x[np.isfinite(x)]
        if x.size == 0:
            continue
        if hist is not None and spec is not None:
            hist[b] = np.bincount((x.astype(np.int64) + spec[1]), minlength=spec[0])
        xf = x.astype(np.float64)
        n[b] = xf.size
        mean[b] = xf.mean()
        d = xf - mean[b]
        m2[b] = float(np.dot(d, d))
        lo[b], hi[b] = xf.min(), xf.max()
    return BandMoments(
        n=n,
        mean=mean,
        m2=m2,
        min=lo,
        max=hi,
        hist=hist,
        valid_pixels=int(vmask.sum()),
        pixels=int(vmask.size),
    )


def _image_blocks(
    image: Any, valid: Any | None
) -> tuple[Any, Any, list[tuple[tuple[int, int], Window]]]:
    if len(image.chunks[0]) != 1:
        image = image.rechunk({0: -1})
    if valid is not None:
        valid = valid.rechunk(_yx_chunks(image))
    img_blocks = image.to_delayed()[0]
    val_blocks = valid.to_delayed() if valid is not None else None
    return img_blocks, val_blocks, _block_windows(_yx_chunks(image))


def band_moments(image: Any, valid: Any | None = None, *, region: TrainRegion | None = None) -> Any:
    """Per-band count, mean, squared deviations, min, max (and exact histograms for <= 16-bit
    integers) over valid training pixels, plus valid/total pixel counts of the image (lazy).

    ``image`` is a (band, y, x) dask array, ``valid`` a (y, x) bool dask array or None.

    Returns
    -------
    dask.delayed.Delayed
        Computes to a :class:`BandMoments`.
    """
    from dask import delayed

    shape = (int(image.shape[1]), int(image.shape[2]))
    img_blocks, val_blocks, windows = _image_blocks(image, valid)
    parts = [
        delayed(_moments_block, pure=True)(
            img_blocks[i, j], val_blocks[i, j] if val_blocks is not None else None, w, region, shape
        )
        for (i, j), w in windows
    ]
    return _tree(parts, BandMoments.merge)


def _hist_block(
    image: np.ndarray,
    valid: np.ndarray | None,
    window: Window,
    region: TrainRegion | None,
    image_shape: tuple[int, int],
    lo: np.ndarray,
    hi: np.ndarray,
    bins: int,
) -> np.ndarray:
    mask, _ = _train_pixels(image, valid, window, region, image_shape)
    out = np.zeros((image.shape[0], bins), np.int64)
    for b in range(image.shape[0]):
        if not np.isfinite(lo[b]) or hi[b] <= lo[b]:
            continue
        x = image[b][mask].astype(np.float64)
        x = x[np.isfinite(x)]
        idx = np.floor((x - lo[b]) * (bins / (hi[b] - lo[b]))).astype(np.int64)
        np.clip(idx, 0, bins - 1, out=idx)
        out[b] = np.bincount(idx, minlength=bins)
    return out


def band_histograms(
    image: Any,
    valid: Any | None = None,
    *,
    region: TrainRegion | None = None,
    lo: Sequence[float],
    hi: Sequence[float],
    bins: int = FLOAT_HIST_BINS,
) -> Any:
    """Per-band histograms of ``bins`` equal bins over ``[lo, hi]`` of the training pixels (lazy).

    The second pass for non-integer images (the first, :func:`band_moments`, gives lo/hi).
    """
    from dask import delayed

    shape = (int(image.shape[1]), int(image.shape[2]))
    lo_a, hi_a = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    img_blocks, val_blocks, windows = _image_blocks(image, valid)
    parts = [
        delayed(_hist_block, pure=True)(
            img_blocks[i, j],
            val_blocks[i, j] if val_blocks is not None else None,
            w,
            region,
            shape,
            lo_a,
            hi_a,
            bins,
        )
        for (i, j), w in windows
    ]
    return _tree(parts, _sum)


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's interpolation formula for the ``linear`` percentile method."""
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def percentiles(
    hist: np.ndarray,
    qs: Sequence[float],
    *,
    value_of_bin: Callable[[int, float], float],
) -> list[float]:
    """Percentiles ``qs`` (0..100, numpy ``linear``) from a histogram of one band.

    ``value_of_bin(j, frac)`` maps bin ``j`` and a position ``frac`` in ``[0, 1)`` within it
    to a value: exact for one-value-per-bin histograms, approximate otherwise.
    """
    n = int(hist.sum())
    if n == 0:
        return [math.nan for _ in qs]
    cum = np.cumsum(hist)

    def at_rank(k: int) -> float:
        j = int(np.searchsorted(cum, k, side="right"))
        before = int(cum[j - 1]) if j else 0
        return value_of_bin(j, (k - before + 0.5) / int(hist[j]))

    out = []
    for q in qs:
        v = q / 100.0 * (n - 1)
        k = math.floor(v)
        a = at_rank(k)
        b = at_rank(min(k + 1, n - 1))
        out.append(_lerp(a, b, v - k))
    return out


# --------------------------------------------------------------------------- pixel size
def pixel_size(
    georef: Any | None = None, slide: Any | None = None
) -> tuple[tuple[float, float] | None, str | None]:
    """``((size_y, size_x), unit)`` of a level-0 pixel, or ``(None, None)`` if unknown.

    From a map georeference: the lengths of the geotransform's row and column steps in CRS
    units (``"metre"`` for projected CRSs in metres, ``"degree"`` for geographic ones, as
    pyproj names them). From a slide: microns per pixel (unit ``"micron"``).
    """
    if georef is not None:
        _x0, dx, rx, _y0, ry, dy = georef.geotransform
        size = (float(math.hypot(rx, dy)), float(math.hypot(dx, ry)))
        unit: str | None = None
        try:
            from pyproj import CRS

            crs = CRS.from_wkt(georef.crs_wkt)
            unit = crs.axis_info[0].unit_name if crs.axis_info else None
        except Exception:  # an exotic WKT: the size is still right, the unit unknown
            unit = None
        return size, unit
    if slide is not None and slide.mpp_x and slide.mpp_y:
        return (float(slide.mpp_y), float(slide.mpp_x)), "micron"
    return None, None


# --------------------------------------------------------------------------- fingerprint
@dataclass(frozen=True)
class Fingerprint:
    """Per-scene training statistics: the normalization parameters of a model, and more.

    Per-band tuples follow ``bands``. ``class_counts`` are pixels per class id over valid,
    labelled pixels of the training region; ``class_weights`` the weights ``w_c`` used in the
    weight map. ``pixel_size`` is (y, x) in ``pixel_unit``. ``train_region`` is the
    :class:`~segflow.config.TrainRegion` as a dict (None = whole image).

    Examples
    --------
    >>> fp = Fingerprint(bands=("gray",), dtype="uint8", mean=(1.0,), std=(0.5,), min=(0.0,),
    ...                  max=(2.0,), p0_5=(0.0,), p99_5=(2.0,))
    >>> Fingerprint.from_dict(fp.to_dict()) == fp
    True
    """

    bands: tuple[str, ...]
    dtype: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min: tuple[float, ...]
    max: tuple[float, ...]
    p0_5: tuple[float, ...]
    p99_5: tuple[float, ...]
    percentile_method: str = "exact"
    train_pixels: int = 0
    nodata_fraction: float = 0.0
    class_counts: dict[int, int] = field(default_factory=dict)
    class_weights: dict[int, float] = field(default_factory=dict)
    class_weight_mode: str = "none"
    ignore_index: int = 255
    pixel_size: tuple[float, float] | None = None
    pixel_unit: str | None = None
    train_region: dict[str, Any] | None = None
    version: int = FINGERPRINT_VERSION

    def __hash__(self) -> int:
        return hash((self.bands, self.dtype, self.mean, self.std))

    @property
    def class_frequencies(self) -> dict[int, float]:
        """Class counts as fractions of all counted pixels."""
        total = sum(self.class_counts.values())
        return {c: (n / total if total else 0.0) for c, n in self.class_counts.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (class ids become strings)."""
        d = asdict(self)
        for key in ("bands", "mean", "std", "min", "max", "p0_5", "p99_5"):
            d[key] = list(d[key])
        d["pixel_size"] = list(self.pixel_size) if self.pixel_size else None
        d["class_counts"] = {str(k): int(v) for k, v in self.class_counts.items()}
        d["class_weights"] = {str(k): float(v) for k, v in self.class_weights.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fingerprint:
        """Inverse of :meth:`to_dict`; raises :class:`ConfigError` for another version."""
        version = int(d.get("version", 0))
        if version != FINGERPRINT_VERSION:
            raise ConfigError(
                f"fingerprint version {version} is not supported (expected {FINGERPRINT_VERSION}): "
                "re-run flows/prepare.py"
            )
        floats = {
            k: tuple(float(v) for v in d[k]) for k in ("mean", "std", "min", "max", "p0_5", "p99_5")
        }
        ps = d.get("pixel_size")
        return cls(
            bands=tuple(str(b) for b in d["bands"]),
            dtype=str(d["dtype"]),
            **floats,
            percentile_method=str(d.get("percentile_method", "exact")),
            train_pixels=int(d.get("train_pixels", 0)),
            nodata_fraction=float(d.get("nodata_fraction", 0.0)),
            class_counts={int(k): int(v) for k, v in dict(d.get("class_counts", {})).items()},
            class_weights={int(k): float(v) for k, v in dict(d.get("class_weights", {})).items()},
            class_weight_mode=str(d.get("class_weight_mode", "none")),
            ignore_index=int(d.get("ignore_index", 255)),
            pixel_size=(float(ps[0]), float(ps[1])) if ps else None,
            pixel_unit=d.get("pixel_unit"),
            train_region=dict(d["train_region"]) if d.get("train_region") else None,
            version=version,
        )

    def to_json(self, path: str | Path) -> Path:
        """Write the fingerprint as JSON (atomically: a temporary file moved into place)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> Fingerprint:
        """Read a fingerprint written by :meth:`to_json`."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"fingerprint not found: {str(p)!r}: run flows/prepare.py first")
        return cls.from_dict(json.loads(p.read_text()))


def _exact_bin(offset: int) -> Callable[[int, float], float]:
    def value(j: int, frac: float) -> float:
        return float(j - offset)

    return value


def _even_bin(lo: float, hi: float, bins: int) -> Callable[[int, float], float]:
    width = (hi - lo) / bins

    def value(j: int, frac: float) -> float:
        return min(max(lo + (j + frac) * width, lo), hi)

    return value


def fingerprint_from_moments(
    moments: BandMoments,
    *,
    bands: Sequence[str],
    dtype: Any,
    float_hist: np.ndarray | None = None,
    **extra: Any,
) -> Fingerprint:
    """Assemble a :class:`Fingerprint` from merged moments (and, for non-integer images, the
    second-pass histograms of :func:`band_histograms`). ``extra`` are the remaining fields."""
    if moments.n.size == 0 or int(moments.n.min()) == 0:
        raise RegionError(
            "the training region has no valid pixels: choose a region that covers valid data"
        )
    spec = _int_hist_spec(dtype)
    p_lo, p_hi = [], []
    for b in range(len(bands)):
        if spec is not None and moments.hist is not None:
            ps = percentiles(moments.hist[b], PERCENTILES, value_of_bin=_exact_bin(spec[1]))
        else:
            if float_hist is None:
                raise ConfigError(
                    f"{dtype} images need the second-pass histogram (band_histograms)"
                )
            lo, hi = float(moments.min[b]), float(moments.max[b])
            if hi <= lo:
                ps = [lo, lo]
            else:
                ps = percentiles(
                    float_hist[b], PERCENTILES, value_of_bin=_even_bin(lo, hi, float_hist.shape[1])
                )
        p_lo.append(float(ps[0]))
        p_hi.append(float(ps[1]))
    std = np.sqrt(moments.m2 / moments.n)
    nodata = 1.0 - moments.valid_pixels / moments.pixels if moments.pixels else 0.0
    return Fingerprint(
        bands=tuple(bands),
        dtype=str(np.dtype(dtype)),
        mean=tuple(float(v) for v in moments.mean),
        std=tuple(float(v) for v in std),
        min=tuple(float(v) for v in moments.min),
        max=tuple(float(v) for v in moments.max),
        p0_5=tuple(p_lo),
        p99_5=tuple(p_hi),
        percentile_method="exact" if spec is not None else f"histogram-{FLOAT_HIST_BINS}",
        train_pixels=int(moments.n.min()),
        nodata_fraction=float(nodata),
        **extra,
    )
