"""The model's input normalization: one value object for training, checkpoints and inference.

``(x - mean) * (1 / std)`` per band, in float32; every invalid pixel (nodata by value or by
mask, NaN, +/-inf) becomes 0, the normalization mean, so the model never sees NaN and a pixel's
neighbours are predicted the same however the pixel was marked nodata. Training patches,
training validation and overlap-tile inference all call :meth:`Normalization.apply`, so a
model sees the same numbers when trained and when used.

Examples
--------
>>> import numpy as np
>>> norm = Normalization(mean=(10.0,), std=(2.0,))
>>> x = np.array([[[10.0, 14.0, np.nan]]])
>>> norm.apply(x, np.isfinite(x[0])).tolist()
[[[0.0, 2.0, 0.0]]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import ConfigDict

__all__ = ["MIN_STD", "Normalization"]

#: A band whose pooled standard deviation is below this is constant: it is scaled by 1.
MIN_STD = 1e-8


@dataclass(frozen=True)
class Normalization:
    """Per-band mean and standard deviation (finite; ``std > 0``), one value per band.

    Also the schema of ``normalization`` in ``checkpoint.json`` (pydantic validates the
    dataclass, unknown keys refused).
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"mean ({len(self.mean)}) and std ({len(self.std)}) need one value per band"
            )
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError(f"mean and std must be finite, got {self.mean} and {self.std}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std must be > 0 in every band, got {self.std}")

    @property
    def bands(self) -> int:
        return len(self.mean)

    def scale(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, 1 / std)`` as float32 arrays of shape ``(bands, 1, 1)``."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        inv_std = (1.0 / np.asarray(self.std, dtype=np.float32)).reshape(-1, 1, 1)
        return mean, inv_std

    def apply(self, image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """``(bands, rows, cols)`` pixels, normalized as float32; pixels not ``valid`` are 0."""
        mean, inv_std = self.scale()
        x = np.array(image, dtype=np.float32)  # a copy: the caller's pixels stay as they are
        x -= mean
        x *= inv_std
        if valid is not None and not valid.all():
            x[:, ~np.asarray(valid, dtype=bool)] = 0.0
        return x

    @classmethod
    def pooled(cls, parts: Sequence[tuple[int, Sequence[float], Sequence[float]]]) -> Normalization:
        """Exact mean and (population) std of the union of parts ``(pixels, mean, std)``.

        A band that is constant over all parts (std below :data:`MIN_STD`) gets std 1.
        """
        n = np.array([p[0] for p in parts], np.float64)
        means = np.array([p[1] for p in parts], np.float64)
        stds = np.array([p[2] for p in parts], np.float64)
        if n.sum() <= 0:
            n = np.ones_like(n)
        mean = (n[:, None] * means).sum(0) / n.sum()
        var = (n[:, None] * (stds**2 + (means - mean) ** 2)).sum(0) / n.sum()
        std = np.sqrt(var)
        return cls(tuple(mean.tolist()), tuple(np.where(std < MIN_STD, 1.0, std).tolist()))

    @classmethod
    def identity(cls, bands: int) -> Normalization:
        """Mean 0 and std 1 in every band: the pixels as they are."""
        return cls((0.0,) * bands, (1.0,) * bands)
