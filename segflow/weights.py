"""U-Net border-weight maps and class-weight lookup (DESIGN.md section 4).

The weight of pixel ``x`` is

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

where ``w_c`` is the weight of the pixel's class, and the second (border) term is applied to
background pixels only (instance id 0). ``d1``/``d2`` are the Euclidean distances from the
pixel centre to the nearest pixel of the nearest / second-nearest object. Objects outside
the array do not exist: with fewer than two objects around a pixel its border term is 0
(the convention of the usual whole-image implementations, which need two objects).

**Cut-off.** The border term is below ``eps`` exactly when ``d1 + d2 > r`` with
``r = sigma * sqrt(2 ln(w0 / eps))`` (about 21.46 px for the defaults w0 = 10, sigma = 5,
eps = 1e-3). This module *defines* the term as 0 there, so the result differs from the
untruncated formula by less than ``eps`` everywhere, and only objects within ``r`` of a pixel
matter. Hence:

* :func:`border_term` computes the term exactly (with the cut-off) on any array by one
  Euclidean distance transform per object, restricted to the object's bounding box grown
  by ``r``, keeping a running minimum and second minimum (compiled:
  :mod:`segflow.border_kernel`). Cost ~ objects x (bbox + 2r)^2 instead of objects x pixels.
* :func:`border_term_dask` runs it with ``dask.array.map_overlap`` and a halo of
  ``ceil(r)`` pixels (every pixel within Euclidean distance ``r`` of a chunk lies within
  ``floor(r)`` rows and columns of it), ``boundary="none"``: every pixel sees all object
  pixels within ``r`` of it whatever the chunking, so the result is *identical* for any
  chunk size (no approximation at chunk edges).

Examples
--------
>>> import numpy as np
>>> inst = np.zeros((1, 7), np.uint32)
>>> inst[0, 0], inst[0, 6] = 1, 2
>>> term = border_term(inst, w0=10, sigma=5)
>>> round(float(term[0, 3]), 4)      # d1 = d2 = 3
4.8675
>>> float(term[0, 0])                # object pixels get no border term
0.0
>>> border_halo(10, 5, 1e-3)
22
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from segflow.border_kernel import kept_sums
from segflow.errors import ConfigError, option

__all__ = [
    "BACKGROUND_CLASS",
    "apply_class_weights",
    "border_halo",
    "border_radius",
    "border_term",
    "border_term_dask",
    "class_weight_lut",
    "instances_from_labels",
    "validate_border_params",
    "weight_map",
]

log = logging.getLogger(__name__)

#: The class id that is not an object when instances come from connected components.
BACKGROUND_CLASS = 0
#: :func:`border_term` works through larger arrays in tiles of this side (plus the halo).
TILE = 512


# --------------------------------------------------------------------------- parameters
def validate_border_params(w0: float, sigma: float, eps: float) -> None:
    """Raise :class:`ConfigError` unless ``w0 >= 0``, ``sigma > 0`` and ``0 < eps < 1``."""
    if not (isinstance(w0, int | float) and math.isfinite(w0) and w0 >= 0):
        raise ConfigError(
            f"w0 must be a number >= 0, got {w0!r}: use e.g. {option('w0', 10)} (0 = no border term)"
        )
    if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
        raise ConfigError(
            f"sigma must be a number > 0 (pixels), got {sigma!r}: use e.g. {option('sigma', 5)}"
        )
    if not (isinstance(eps, int | float) and 0 < eps < 1):
        raise ConfigError(f"eps must be in (0, 1), got {eps!r}: use e.g. {option('eps', 1e-3)}")


def border_radius(w0: float, sigma: float, eps: float = 1e-3) -> float:
    """``r`` such that the border term is ``>= eps`` only where ``d1 + d2 <= r``.

    ``r = sigma * sqrt(2 ln(w0 / eps))``; 0 when ``w0 <= eps`` (the term never reaches eps).

    >>> round(border_radius(10, 5, 1e-3), 3)
    21.46
    """
    validate_border_params(w0, sigma, eps)
    if w0 <= eps:
        return 0.0
    return float(sigma * math.sqrt(2.0 * math.log(w0 / eps)))


def border_halo(w0: float, sigma: float, eps: float = 1e-3) -> int:
    """The Dask halo (pixels) that makes chunked border weights exact: ``ceil(r)``."""
    return math.ceil(border_radius(w0, sigma, eps))


# --------------------------------------------------------------------------- pure core
def border_term(
    instances: np.ndarray,
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    eps: float = 1e-3,
    tile: int = TILE,
) -> np.ndarray:
    """The U-Net border term of an instance array, float32, exact with the ``eps`` cut-off.

    Parameters
    ----------
    instances
        2-D integer array of object ids, 0 = no object. Ids need not be contiguous.
    w0, sigma, eps
        Weight, width (pixels) and cut-off of the term; ``sigma > 0``, ``w0 >= 0``.
    tile
        Larger arrays are computed in tiles of this side, each grown by the halo; the result
        does not depend on it.

    Returns
    -------
    numpy.ndarray
        ``w0 * exp(-(d1 + d2)**2 / (2 sigma**2))`` on background pixels where that is
        ``>= eps`` (i.e. ``d1 + d2 <= r``), else 0.
    """
    validate_border_params(w0, sigma, eps)
    inst = np.asarray(instances)
    if inst.ndim != 2 or not np.issubdtype(inst.dtype, np.integer):
        raise ConfigError(
            f"instances must be a 2-D integer array, got {inst.ndim}-D {inst.dtype}: "
            "pass the store's (y, x) instances"
        )
    out = np.zeros(inst.shape, np.float32)
    r = border_radius(w0, sigma, eps)
    if r == 0.0 or inst.size == 0:
        return out
    # Large arrays go tile by tile (each grown by the halo): exact for the same reason chunks
    # are, and it keeps the distance arrays cache-sized, so the cost stays linear in pixels.
    index, s = kept_sums(inst, r=r, tile=tile)
    # w0 * exp(-s^2 / (2 sigma^2)) in place, with numpy's exp (the same values as before)
    np.multiply(s, s, out=s)
    np.negative(s, out=s)
    np.divide(s, 2.0 * sigma * sigma, out=s)
    np.exp(s, out=s)
    np.multiply(w0, s, out=s)
    out.reshape(-1)[index] = s
    return out


def class_weight_lut(
    class_weights: Mapping[int, float], *, dtype: Any, ignore_index: int, default: float = 1.0
) -> np.ndarray:
    """A float32 lookup table ``lut[class_id] -> w_c`` covering every value of ``dtype``.

    Ids not in ``class_weights`` get ``default``; ``ignore_index`` gets 0.
    """
    dt = np.dtype(dtype)
    if dt.kind != "u" or dt.itemsize > 2:
        raise ConfigError(f"labels must be uint8 or uint16, got {dt}: re-run ingest")
    lut = np.full(1 << (8 * dt.itemsize), default, np.float32)
    for cid, wc in class_weights.items():
        cid = int(cid)
        if not 0 <= cid < lut.size:
            raise ConfigError(
                f"class id {cid} does not fit labels of dtype {dt}: fix the class weights"
            )
        lut[cid] = wc
    if 0 <= ignore_index < lut.size:
        lut[ignore_index] = 0.0
    return lut


def apply_class_weights(
    term: np.ndarray,
    labels: np.ndarray | None,
    valid: np.ndarray | None,
    lut: np.ndarray | None,
) -> np.ndarray:
    """``w_c + term``, with 0 on unlabelled (``lut`` gives 0 at ignore_index) and invalid pixels.

    Without ``labels`` the class weight is 1 everywhere.
    """
    w = term.astype(np.float32, copy=True)
    if labels is None or lut is None:
        w += np.float32(1.0)
    else:
        wc = lut[labels]
        w += wc
        w[wc == 0] = 0.0  # unlabelled (and classes explicitly weighted 0): no loss at all
    if valid is not None:
        w[~valid] = 0.0
    return w


def weight_map(
    instances: np.ndarray,
    labels: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    *,
    class_weights: Mapping[int, float] | None = None,
    ignore_index: int = 255,
    w0: float = 10.0,
    sigma: float = 5.0,
    eps: float = 1e-3,
) -> np.ndarray:
    """The full per-pixel loss weight ``w_c + border term`` of an in-memory scene (float32).

    ``class_weights=None`` means ``w_c = 1`` for every labelled class.
    """
    term = border_term(instances, w0=w0, sigma=sigma, eps=eps)
    lut = None
    if labels is not None:
        lut = class_weight_lut(class_weights or {}, dtype=labels.dtype, ignore_index=ignore_index)
    return apply_class_weights(term, labels, valid, lut)


# --------------------------------------------------------------------------- dask
def _term_block(
    block: np.ndarray,
    *,
    w0: float,
    sigma: float,
    eps: float,
    skip: frozenset[tuple[int, int]] = frozenset(),
    block_info: dict[Any, Any] | None = None,
) -> np.ndarray:
    if skip and block_info is not None and tuple(block_info[0]["chunk-location"]) in skip:
        return np.zeros(block.shape, np.float32)  # trimmed by map_overlap: shape must match
    return border_term(block, w0=w0, sigma=sigma, eps=eps)


def border_term_dask(
    instances: Any,
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    eps: float = 1e-3,
    skip_blocks: frozenset[tuple[int, int]] = frozenset(),
) -> Any:
    """:func:`border_term` over a chunked ``dask.array`` with ``map_overlap`` (lazy).

    The halo is :func:`border_halo`; ``boundary="none"``. The result is identical to
    :func:`border_term` on the whole array for any chunking. Chunks narrower than the halo
    are merged into their neighbour first (Dask requires chunks >= depth), so output chunks
    can differ from input chunks at the array's end.

    ``skip_blocks``: chunk locations (after that merge) whose result is not needed (already
    written by an interrupted run); they come back as zeros without being computed.
    """
    import dask.array as da

    validate_border_params(w0, sigma, eps)
    x = da.asarray(instances)
    if x.ndim != 2:
        raise ConfigError(f"instances must be 2-D (y, x), got shape {x.shape}")
    h = border_halo(w0, sigma, eps)
    if h == 0:
        return da.zeros(x.shape, dtype=np.float32, chunks=x.chunks)
    x = x.rechunk(merge_small_chunks(x.chunks, h))
    # an axis that is one chunk needs no halo (and Dask refuses a halo wider than the array)
    depth = {axis: (h if len(c) > 1 else 0) for axis, c in enumerate(x.chunks)}
    return da.map_overlap(
        _term_block,
        x,
        depth=depth,
        boundary="none",
        trim=True,
        dtype=np.float32,
        meta=np.empty((0, 0), np.float32),
        w0=w0,
        sigma=sigma,
        eps=eps,
        skip=skip_blocks,
    )


def merge_small_chunks(
    chunks: tuple[tuple[int, ...], ...], minimum: int
) -> tuple[tuple[int, ...], ...]:
    """Chunks of at least ``minimum`` (unless the axis is shorter): small ones are merged.

    >>> merge_small_chunks(((10, 10, 10, 10, 5), (64, 64, 3)), 22)
    ((45,), (64, 67))
    """
    out = []
    for axis in chunks:
        merged: list[int] = []
        for c in axis:
            if merged and merged[-1] < minimum:
                merged[-1] += c
            else:
                merged.append(c)
        if len(merged) > 1 and merged[-1] < minimum:
            last = merged.pop()
            merged[-1] += last
        out.append(tuple(merged))
    return tuple(out)


def instances_from_labels(
    labels: Any,
    valid: Any | None = None,
    *,
    ignore_index: int = 255,
    background: int = BACKGROUND_CLASS,
) -> tuple[Any, Any]:
    """Object ids from connected components of the class mask, merged across chunks (lazy).

    Objects are the 4-connected components of the pixels whose class is neither
    ``background`` (0) nor ``ignore_index``, and that are valid: all foreground classes
    together, so touching objects of different classes merge into one. Components are found
    per chunk and merged across chunk edges by ``dask_image.ndmeasure.label``.

    Returns
    -------
    (instances, count)
        uint32 dask array of ids (0 = none, unique across the array) and a dask scalar.
    """
    import dask.array as da
    from dask_image.ndmeasure import label

    lab = da.asarray(labels)
    mask = (lab != background) & (lab != ignore_index)
    if valid is not None:
        mask = mask & da.asarray(valid)
    ids, count = label(mask)
    return ids.astype(np.uint32), count
