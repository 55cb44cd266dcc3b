"""Patch augmentation: pure numpy functions, randomness only from a passed Generator.

Geometric transforms move image, labels and weights together: flips and quarter turns
exactly, the elastic deformation with spline interpolation for the image (``order`` 3 =
bicubic, or 1) and nearest neighbour for labels and weights (a label is never blended, and a
weight stays the weight of its label). Outside the patch the deformation mirrors (numpy
``reflect`` = scipy ``mirror``); callers read the patch with a context margin of about three
``sigma`` and crop afterwards, so the mirror rarely matters.

Elastic deformation as in the U-Net paper (Ronneberger et al. 2015): displacement vectors
drawn from a Gaussian with ``sigma`` pixels standard deviation on a coarse ``grid x grid``
lattice spanning the patch, interpolated to every pixel by bicubic (``order=3``) splines.

Intensity changes act on the normalised image: gamma on the patch's own min-max range (per
band), then contrast (scale about the mean) and brightness (an offset).

Examples
--------
>>> rng = np.random.default_rng(0)
>>> img = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
>>> lab = np.arange(16).reshape(4, 4)
>>> i2, l2, _ = flip_rot90(img, lab, None, k=1, flip=True)
>>> bool((i2[0] == l2).all())
True
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from segflow.config.train import AugmentConfig, ElasticConfig, IntensityConfig

__all__ = [
    "adjust_intensity",
    "augment_patch",
    "elastic_displacement",
    "flip_rot90",
    "warp",
]


def flip_rot90(
    image: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None,
    *,
    k: int,
    flip: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Flip left-right (if ``flip``) and then rotate by ``k`` quarter turns (``np.rot90``).

    ``image`` is (C, H, W); ``labels`` and ``weights`` (H, W).
    """

    def t(a: np.ndarray) -> np.ndarray:
        if flip:
            a = np.flip(a, axis=-1)
        return np.ascontiguousarray(np.rot90(a, k, axes=(-2, -1)))

    return t(image), t(labels), (t(weights) if weights is not None else None)


def elastic_displacement(
    rng: np.random.Generator, shape: tuple[int, int], *, grid: int = 3, sigma: float = 10.0
) -> np.ndarray:
    """A smooth random displacement field (2, H, W) in pixels (rows, cols).

    ``grid x grid`` Gaussian vectors (std ``sigma``) placed evenly over the patch, corners
    included, interpolated bicubically to every pixel.
    """
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
    h, w = shape
    rr = np.linspace(0, grid - 1, h)
    cc = np.linspace(0, grid - 1, w)
    coords = np.stack(np.meshgrid(rr, cc, indexing="ij"))
    out = np.empty((2, h, w))
    for a in range(2):
        out[a] = ndimage.map_coordinates(coarse[a], coords, order=3, mode="reflect")
    return out


def warp(array: np.ndarray, displacement: np.ndarray, *, order: int) -> np.ndarray:
    """Sample ``array`` (…, H, W) at ``identity + displacement`` (mirrored outside)."""
    h, w = array.shape[-2:]
    base = np.mgrid[0:h, 0:w].astype(np.float64)
    coords = base + displacement
    flat = array.reshape(-1, h, w)
    out = np.empty(flat.shape, dtype=np.float32 if order > 0 else array.dtype)
    for i in range(flat.shape[0]):
        src = flat[i].astype(np.float32) if order > 0 else flat[i]
        out[i] = ndimage.map_coordinates(src, coords, order=order, mode="mirror")
    return out.reshape(array.shape)


def adjust_intensity(
    image: np.ndarray, *, gamma: float = 1.0, contrast: float = 1.0, brightness: float = 0.0
) -> np.ndarray:
    """Gamma on each band's min-max range, then contrast about the band mean, then offset."""
    x = image.astype(np.float32, copy=True)
    for b in range(x.shape[0]):
        band = x[b]
        if gamma != 1.0:
            lo, hi = float(band.min()), float(band.max())
            if hi > lo:
                band[...] = ((band - lo) / (hi - lo)) ** gamma * (hi - lo) + lo
        if contrast != 1.0:
            m = float(band.mean())
            band[...] = (band - m) * contrast + m
        if brightness:
            band += np.float32(brightness)
    return x


def _elastic(
    rng: np.random.Generator,
    image: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None,
    cfg: ElasticConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    d = elastic_displacement(rng, image.shape[-2:], grid=cfg.grid, sigma=cfg.sigma)
    return (
        warp(image, d, order=cfg.order),
        warp(labels, d, order=0),
        warp(weights, d, order=0) if weights is not None else None,
    )


def _intensity(rng: np.random.Generator, image: np.ndarray, cfg: IntensityConfig) -> np.ndarray:
    lg0, lg1 = np.log(cfg.gamma[0]), np.log(cfg.gamma[1])
    gamma = float(np.exp(rng.uniform(lg0, lg1)))
    contrast = float(rng.uniform(*cfg.contrast))
    brightness = float(rng.uniform(-cfg.brightness, cfg.brightness))
    return adjust_intensity(image, gamma=gamma, contrast=contrast, brightness=brightness)


def augment_patch(
    rng: np.random.Generator,
    image: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None,
    cfg: AugmentConfig,
    *,
    ignore_value: int = 255,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Apply the configured augmentations in a fixed order (elastic, flip/rot90, intensity).

    Every random choice comes from ``rng``; the same draws happen whatever the data, so the
    generator's state after the call depends only on its state before and ``cfg``.
    """
    if cfg.elastic is not None:
        apply = rng.random() < cfg.elastic.p
        sub = np.random.default_rng(rng.integers(2**63))
        if apply:
            image, labels, weights = _elastic(sub, image, labels, weights, cfg.elastic)
    k = int(rng.integers(4)) if cfg.rot90 else 0
    flip = bool(rng.integers(2)) if cfg.flips else False
    if k or flip:
        image, labels, weights = flip_rot90(image, labels, weights, k=k, flip=flip)
    if cfg.intensity is not None:
        apply = rng.random() < cfg.intensity.p
        sub = np.random.default_rng(rng.integers(2**63))
        if apply:
            image = _intensity(sub, image, cfg.intensity)
    return image, labels, weights
