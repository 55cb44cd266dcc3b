"""The tissue rule of slides: a pixel is tissue when its HSV saturation exceeds one per-slide
threshold (Otsu's, clipped), and it is not transparent. Pure numpy: the slide readers
(:mod:`segflow.io.sources`) compute the threshold at open time and apply the rule per window.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TISSUE_MAX_SATURATION", "TISSUE_MIN_SATURATION", "saturation", "tissue_mask"]


#: Lower and upper clip of the per-slide saturation threshold (0..255 scale). The floor keeps
#: white/grey glass and noise out when Otsu splits a nearly empty slide; the ceiling keeps
#: pale (eosin) tissue in, which Otsu alone puts near 60 on H&E (CMU-1: 60; 33.7 % of the
#: thumbnail is above 20, 31.3 % above 40, 28.2 % above 60).
TISSUE_MIN_SATURATION = 15
TISSUE_MAX_SATURATION = 40


def saturation(rgb: np.ndarray) -> np.ndarray:
    """Integer HSV saturation (0..255) of a ``(3, rows, cols)`` uint8 array."""
    c = rgb[:3].astype(np.int32)
    mx = c.max(axis=0)
    mn = c.min(axis=0)
    return np.where(mx > 0, (mx - mn) * 255 // np.maximum(mx, 1), 0)


def tissue_mask(rgb: np.ndarray, threshold: int, alpha: np.ndarray | None = None) -> np.ndarray:
    """The tissue rule: ``saturation > threshold`` and ``alpha > 0`` (see the module notes).

    Parameters
    ----------
    rgb : ``(3, rows, cols)`` uint8.
    threshold : the slide's saturation threshold (0..255).
    alpha : ``(rows, cols)`` alpha, or None when the image has none.

    Examples
    --------
    >>> rgb = np.array([[[250, 200]], [[250, 100]], [[250, 200]]], dtype=np.uint8)
    >>> tissue_mask(rgb, 20).tolist()
    [[False, True]]
    """
    mask = saturation(rgb) > threshold
    if alpha is not None:
        mask &= alpha > 0
    return mask


def _otsu(values: np.ndarray) -> int:
    """Otsu's threshold of integer values in 0..255 (class 0 is ``<= t``)."""
    hist = np.bincount(values.ravel().astype(np.int64), minlength=256)[:256].astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0 * total) ** 2 / (w0 * w1)
    between[(w0 == 0) | (w1 == 0)] = -1.0
    return int(np.argmax(between))


def _slide_threshold(thumb_rgb: np.ndarray, thumb_alpha: np.ndarray | None) -> int:
    sat = saturation(thumb_rgb)
    if thumb_alpha is not None:
        sat = sat[thumb_alpha > 0]
    t = _otsu(np.asarray(sat))
    return int(min(max(t, TISSUE_MIN_SATURATION), TISSUE_MAX_SATURATION))
