"""The normalization fingerprint of a scene (DESIGN.md section 4): per-band statistics and
percentiles over the training region, the pixel size, the class counts and weights.

Like :mod:`segflow.stats`, the scans build lazy Dask work (one task per chunk, a tree
reduction) that the caller computes. **Statistics** are in float64: mean, population standard
deviation (``ddof=0``, as numpy), min, max, merged across chunks with Chan's parallel update (no
sum-of-squares cancellation). Percentiles 0.5 and 99.5 use numpy's default ``linear``
definition. For integer images of at most 16 bits they are *exact* (per-band histograms with
one bin per value). For other dtypes (float, 32-bit ints) they come from a second pass with a
65536-bin histogram over ``[min, max]``, assuming values spread evenly inside a bin: the error
is at most one bin width, ``(max - min) / 65536``. A pixel of a float image where any band is
NaN or +/-inf is invalid: it counts in ``nodata_fraction`` and in no band's statistics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segflow.atomic import write_json_atomic
from segflow.config import TrainRegion
from segflow.errors import ConfigError, RegionError
from segflow.geometry import Window
from segflow.stats import (
    block_windows,
    sum_parts,
    train_mask_for_window,
    tree_reduce,
    valid_and_finite,
    yx_chunks,
)

__all__ = [
    "FINGERPRINT_VERSION",
    "FLOAT_HIST_BINS",
    "BandMoments",
    "Fingerprint",
    "band_histograms",
    "band_moments",
    "fingerprint_from_moments",
    "percentiles",
    "pixel_size",
]

#: Bins of the histogram that approximates percentiles of non-integer images.
FLOAT_HIST_BINS = 1 << 16
#: Version of the fingerprint document.
FINGERPRINT_VERSION = 1
#: The percentiles stored in the fingerprint.
PERCENTILES = (0.5, 99.5)


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
        d *= d  # numpy's own sum, not BLAS's dot: its result depends on OpenBLAS's thread
        m2[b] = float(d.sum())  # count, so a cluster's workers and one process disagreed
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
        valid = valid.rechunk(yx_chunks(image))
    img_blocks = image.to_delayed()[0]
    val_blocks = valid.to_delayed() if valid is not None else None
    return img_blocks, val_blocks, block_windows(yx_chunks(image))


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
    return tree_reduce(parts, BandMoments.merge)


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
    return tree_reduce(parts, sum_parts)


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
