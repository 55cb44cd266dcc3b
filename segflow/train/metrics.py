"""Segmentation metrics from one confusion matrix accumulated over tiles.

:class:`ConfusionMatrix` counts ``(target, prediction)`` pairs in an ``int64`` matrix
(rows: target class, columns: predicted class), skipping ``ignore_index`` and pixels
outside an optional ``valid`` mask. Every metric is a pure function of that matrix
(or of the :class:`ConfusionMatrix`), so tiles, batches and DDP ranks combine by adding
matrices: under DDP, ``all_reduce`` (sum) ``torch.from_numpy(cm.counts)`` and wrap the
result with :meth:`ConfusionMatrix.from_counts`.

Absent classes: a class with no pixel in the target *and* none in the prediction has an
undefined IoU and Dice (0 / 0): it is NaN in the per-class results and left out of the
means (``numpy.nanmean``), rather than counted as 0 or 1. Likewise a class absent from
the target has an undefined accuracy (recall) and is left out of
:func:`mean_class_accuracy`. A mean over no defined class is NaN.

Definitions (Long et al. 2015, with ``n[i, j]`` pixels of class ``i`` predicted ``j``,
``t_i = sum_j n[i, j]``):

- pixel accuracy ``sum_i n[i, i] / sum_i t_i``; ``pixel_error = 1 - pixel accuracy``
  (the ISBI 2012 pixel error we report);
- mean class accuracy ``mean_i n[i, i] / t_i``;
- IoU ``n[i, i] / (t_i + sum_j n[j, i] - n[i, i])``, mean IoU;
- frequency-weighted IoU ``sum_i t_i IoU_i / sum_i t_i``;
- Dice ``2 n[i, i] / (t_i + sum_j n[j, i])``.

Examples
--------
>>> import numpy as np
>>> cm = ConfusionMatrix(2)
>>> cm.update(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 255]]))
>>> cm.counts.tolist()
[[1, 1], [0, 1]]
>>> pixel_accuracy(cm), mean_iou(cm)
(0.6666666666666666, 0.5)
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from segflow.errors import ConfigError, LabelError

__all__ = [
    "ConfusionMatrix",
    "dice",
    "frequency_weighted_iou",
    "mean_class_accuracy",
    "mean_dice",
    "mean_iou",
    "per_class_accuracy",
    "per_class_iou",
    "pixel_accuracy",
    "pixel_error",
    "summary",
]

ArrayLike = np.ndarray | torch.Tensor


class ConfusionMatrix:
    """A ``(K, K)`` int64 confusion matrix, rows = target, columns = prediction.

    Parameters
    ----------
    num_classes
        ``K``; class ids are ``0 .. K-1``.
    ignore_index
        Target value that is not counted (None: every target must be a class id).
    """

    def __init__(self, num_classes: int, *, ignore_index: int | None = 255) -> None:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = np.zeros((num_classes, num_classes), dtype=np.int64)

    @classmethod
    def from_counts(cls, counts: ArrayLike, *, ignore_index: int | None = 255) -> ConfusionMatrix:
        """Wrap a ``(K, K)`` count matrix (for example after a DDP ``all_reduce``)."""
        arr = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else counts
        arr = np.asarray(arr)
        if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
            raise ConfigError(f"counts must be a square (K, K) matrix, got shape {arr.shape}")
        cm = cls(arr.shape[0], ignore_index=ignore_index)
        cm.counts = arr.astype(np.int64, copy=True)
        return cm

    def update(self, pred: ArrayLike, target: ArrayLike, *, valid: ArrayLike | None = None
               ) -> None:
        """Count one tile or batch.

        Parameters
        ----------
        pred
            Predicted class ids (any shape; e.g. ``logits.argmax(1)``).
        target
            Target class ids, same shape; ``ignore_index`` pixels are skipped.
        valid
            Optional bool mask, same shape; False pixels are skipped.

        Torch tensors are counted on their device (only the ``K x K`` result moves).

        Raises
        ------
        LabelError
            Shapes differ, or a counted value is not a class id.
        """
        if tuple(pred.shape) != tuple(target.shape) or (
            valid is not None and tuple(valid.shape) != tuple(target.shape)
        ):
            raise LabelError(
                f"pred {tuple(pred.shape)}, target {tuple(target.shape)}"
                f"{'' if valid is None else f' and valid {tuple(valid.shape)}'} "
                "must have the same shape"
            )
        k = self.num_classes
        if isinstance(pred, torch.Tensor) or isinstance(target, torch.Tensor):
            t = torch.as_tensor(target).reshape(-1).long()
            p = torch.as_tensor(pred, device=t.device).reshape(-1).long()
            keep = torch.ones_like(t, dtype=torch.bool)
            if self.ignore_index is not None:
                keep &= t != self.ignore_index
            if valid is not None:
                keep &= torch.as_tensor(valid, device=t.device).reshape(-1).bool()
            t, p = t[keep], p[keep]
            self._check(int(t.min()) if len(t) else 0, int(t.max()) if len(t) else 0, "target")
            self._check(int(p.min()) if len(p) else 0, int(p.max()) if len(p) else 0, "pred")
            flat = torch.bincount(t * k + p, minlength=k * k).cpu().numpy()
        else:
            tn = np.asarray(target).reshape(-1).astype(np.int64)
            pn = np.asarray(pred).reshape(-1).astype(np.int64)
            keepn = np.ones(tn.shape, dtype=bool)
            if self.ignore_index is not None:
                keepn &= tn != self.ignore_index
            if valid is not None:
                keepn &= np.asarray(valid).reshape(-1).astype(bool)
            tn, pn = tn[keepn], pn[keepn]
            self._check(int(tn.min(initial=0)), int(tn.max(initial=0)), "target")
            self._check(int(pn.min(initial=0)), int(pn.max(initial=0)), "pred")
            flat = np.bincount(tn * k + pn, minlength=k * k)
        self.counts += flat.reshape(k, k).astype(np.int64)

    def _check(self, lo: int, hi: int, what: str) -> None:
        if lo < 0 or hi >= self.num_classes:
            bad = lo if lo < 0 else hi
            extra = "" if what == "pred" or self.ignore_index is None else (
                f" or ignore_index {self.ignore_index}")
            raise LabelError(
                f"{what} value {bad} is not a class id 0..{self.num_classes - 1}{extra}: "
                "check the labels and num_classes"
            )

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts into this one (in place); returns self."""
        if other.num_classes != self.num_classes:
            raise ConfigError(
                f"cannot merge a {other.num_classes}-class matrix into a "
                f"{self.num_classes}-class one"
            )
        self.counts += other.counts
        return self

    def reset(self) -> None:
        """Set every count to 0."""
        self.counts[...] = 0

    @property
    def total(self) -> int:
        """Number of counted pixels."""
        return int(self.counts.sum())

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, total={self.total})"


def _counts(cm: ConfusionMatrix | ArrayLike) -> np.ndarray:
    if isinstance(cm, ConfusionMatrix):
        return cm.counts.astype(np.float64)
    if isinstance(cm, torch.Tensor):
        return cm.detach().cpu().numpy().astype(np.float64)
    return np.asarray(cm, dtype=np.float64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(x)) if x.size else float("nan")


def pixel_accuracy(cm: ConfusionMatrix | ArrayLike) -> float:
    """Correct pixels / counted pixels (NaN if none were counted)."""
    n = _counts(cm)
    total = n.sum()
    return float(np.trace(n) / total) if total > 0 else float("nan")


def pixel_error(cm: ConfusionMatrix | ArrayLike) -> float:
    """``1 - pixel_accuracy``: the ISBI 2012 pixel error."""
    return 1.0 - pixel_accuracy(cm)


def per_class_accuracy(cm: ConfusionMatrix | ArrayLike) -> np.ndarray:
    """Recall per class, ``n[i, i] / t_i``; NaN for classes absent from the target."""
    n = _counts(cm)
    return _ratio(np.diag(n), n.sum(axis=1))


def mean_class_accuracy(cm: ConfusionMatrix | ArrayLike) -> float:
    """Mean of :func:`per_class_accuracy` over classes present in the target."""
    return _nanmean(per_class_accuracy(cm))


def per_class_iou(cm: ConfusionMatrix | ArrayLike) -> np.ndarray:
    """Intersection over union per class; NaN for classes absent from target and prediction."""
    n = _counts(cm)
    tp = np.diag(n)
    return _ratio(tp, n.sum(axis=1) + n.sum(axis=0) - tp)


def mean_iou(cm: ConfusionMatrix | ArrayLike) -> float:
    """Mean of :func:`per_class_iou`, leaving out classes absent from both."""
    return _nanmean(per_class_iou(cm))


def frequency_weighted_iou(cm: ConfusionMatrix | ArrayLike) -> float:
    """``sum_i t_i IoU_i / sum_i t_i`` (classes weighted by their target frequency)."""
    n = _counts(cm)
    freq = n.sum(axis=1)
    total = freq.sum()
    if total <= 0:
        return float("nan")
    iou = per_class_iou(n)
    present = freq > 0  # a class with t_i > 0 always has a defined IoU
    return float((freq[present] * iou[present]).sum() / total)


def dice(cm: ConfusionMatrix | ArrayLike) -> np.ndarray:
    """Dice (F1) per class, ``2 n[i, i] / (t_i + p_i)``; NaN for classes absent from both."""
    n = _counts(cm)
    return _ratio(2 * np.diag(n), n.sum(axis=1) + n.sum(axis=0))


def mean_dice(cm: ConfusionMatrix | ArrayLike) -> float:
    """Mean of :func:`dice`, leaving out classes absent from both."""
    return _nanmean(dice(cm))


def summary(cm: ConfusionMatrix | ArrayLike) -> dict[str, Any]:
    """Every metric as a JSON-ready dict (NaN becomes None), for logs and checkpoints.

    >>> summary(np.array([[3, 1], [0, 4]]))["mean_iou"]
    0.775
    """

    def clean(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    return {
        "pixels": int(_counts(cm).sum()),
        "pixel_accuracy": clean(pixel_accuracy(cm)),
        "pixel_error": clean(pixel_error(cm)),
        "mean_class_accuracy": clean(mean_class_accuracy(cm)),
        "mean_iou": clean(mean_iou(cm)),
        "frequency_weighted_iou": clean(frequency_weighted_iou(cm)),
        "mean_dice": clean(mean_dice(cm)),
        "per_class_iou": [clean(v) for v in per_class_iou(cm)],
        "per_class_dice": [clean(v) for v in dice(cm)],
        "per_class_accuracy": [clean(v) for v in per_class_accuracy(cm)],
    }
