"""Segmentation losses with one signature, ignore_index and loss masks.

:func:`build_loss` turns a :class:`LossConfig` into a module called as
``loss(logits, target, pixel_weights=None, *, mask=None)``:

- ``logits``: ``(N, K, H, W)`` float, raw network outputs;
- ``target``: ``(N, H, W)`` integer class ids, or in ``multilabel`` mode ``(N, K, H, W)``
  with values in {0, 1};
- ``pixel_weights``: ``(N, H, W)`` float, the store's ``weights`` array; read by
  ``pixel_weighted_ce`` only (:func:`needs_pixel_weights`), ignored by the others;
- ``mask``: optional ``(N, H, W)`` bool, True where the loss may look (random loss
  masks, the ``valid`` footprint).

Pixels whose target equals ``ignore_index`` or whose mask is False are *not counted*:
they add nothing to sums and are left out of every denominator, so changing the logits
there changes neither the loss nor its gradient. If no pixel is left the loss is 0
(still connected to the graph). In multi-label mode the ignore test is per class.

Losses
------
``ce``
    Mean cross-entropy over counted pixels (multi-label: binary cross-entropy per class).
``weighted_ce``
    Class-weighted CE: ``sum(w[y] * ce) / sum(w[y])`` (PyTorch's convention).
``pixel_weighted_ce``
    ``sum(w * ce) / sum(w)`` over counted pixels with the per-pixel weight map ``w``
    (U-Net border weights; class weights are already in that map).
``focal``
    Lin et al. 2017 focal loss via MONAI's ``FocalLoss`` (``gamma``; optional class
    weights, normalised like ``weighted_ce``); ``gamma = 0`` is CE.
``dice``, ``iou``, ``tversky``
    MONAI's ``DiceLoss`` (``jaccard=True`` for IoU) and ``TverskyLoss`` (``alpha``
    weighs false positives, ``beta`` false negatives) on softmax (sigmoid) probabilities,
    per sample and class (``batch_dice`` pools the batch), smoothed by ``smooth``.
``dice_ce``, ``dice_focal``
    ``lambdas[0] * dice + lambdas[1] * (ce | focal)``, the composition of MONAI's
    ``DiceCELoss``/``DiceFocalLoss``, built here from the same parts so that
    ``ignore_index`` and ``mask`` reach both terms.
``boundary``
    Kervadec et al. 2019 boundary loss, ``mean(phi_k * s_k)`` over counted pixels and
    classes, with ``phi_k`` the signed distance map of class ``k`` (negative inside,
    distances from ``scipy.ndimage.distance_transform_edt`` on the CPU, per batch) and
    ``s_k`` the probabilities; combined as ``lambdas[0] * dice + lambdas[1] * boundary``
    because the paper pairs it with a regional loss (set ``lambdas=(0, 1)`` for the
    boundary term alone; the trainer may rebuild the loss to follow the paper's schedule).

How ignore_index is handled: MONAI's losses (before 1.5) have no ``ignore_index`` and none
takes a loss mask, so we never pass them ignored pixels: ignored targets are replaced by
class 0 before one-hot encoding, and both the probabilities and the one-hot targets are
multiplied by the counted-pixel mask, so those pixels add nothing to Dice/Tversky
intersections or sums; pixel-wise terms (CE, focal) are reduced by masked sums.

Examples
--------
>>> import torch
>>> loss = build_loss(LossConfig(name="dice_ce"))
>>> logits = torch.zeros(1, 2, 4, 4)
>>> target = torch.zeros(1, 4, 4, dtype=torch.long)
>>> target[0, 0, 0] = 255  # unlabelled
>>> round(float(loss(logits, target)), 4)  # mean dice loss (1/3, 1) + ln 2
1.3598
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from scipy import ndimage
from torch import nn

from segflow.config import format_validation_error
from segflow.config.loss import LossConfig, LossName
from segflow.errors import ConfigError, LabelError

__all__ = [
    "LossConfig",
    "LossName",
    "SegmentationLoss",
    "build_loss",
    "needs_pixel_weights",
    "signed_distance_maps",
]

def needs_pixel_weights(cfg: LossConfig) -> bool:
    """Whether the loss reads ``pixel_weights`` (so the trainer must load the weight map).

    >>> needs_pixel_weights(LossConfig(name="pixel_weighted_ce")), needs_pixel_weights(LossConfig())
    (True, False)
    """
    return cfg.name == "pixel_weighted_ce"


def build_loss(cfg: LossConfig | Mapping[str, Any]) -> SegmentationLoss:
    """Build the loss module a config describes (see the module docstring).

    Raises
    ------
    ConfigError
        A mapping that does not validate.
    """
    if not isinstance(cfg, LossConfig):
        try:
            cfg = LossConfig.model_validate(cfg)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, source="loss config")) from err
    return SegmentationLoss(cfg)


def signed_distance_maps(onehot: np.ndarray) -> np.ndarray:
    """Signed distance maps of binary masks, as in Kervadec et al.'s boundary loss.

    For each ``(n, k)`` mask ``g``: outside, the Euclidean distance to the nearest pixel
    of ``g``; inside, minus (the distance to the nearest pixel outside ``g``, minus 1);
    all zeros where ``g`` is empty (or full: no boundary to measure from).

    Parameters
    ----------
    onehot
        ``(N, K, H, W)`` array of {0, 1}.

    Returns
    -------
    numpy.ndarray
        ``(N, K, H, W)`` float32.

    >>> signed_distance_maps(np.array([[[[0, 1, 1, 0, 0]]]]))[0, 0, 0].tolist()
    [1.0, 0.0, 0.0, 1.0, 2.0]
    """
    out = np.zeros(onehot.shape, dtype=np.float32)
    for n in range(onehot.shape[0]):
        for k in range(onehot.shape[1]):
            pos = onehot[n, k].astype(bool)
            if pos.any() and not pos.all():
                neg = ~pos
                out[n, k] = (ndimage.distance_transform_edt(neg) * neg
                             - (ndimage.distance_transform_edt(pos) - 1) * pos)
    return out


class _Prepared(NamedTuple):
    onehot: torch.Tensor  # (N, K, H, W) targets, zero where not counted
    valid: torch.Tensor  # (N, 1, H, W) (multi-label: (N, K, H, W)) {0, 1}: counted
    ids: torch.Tensor | None  # (N, H, W) class ids, 0 where not counted; None multi-label
    labelled: torch.Tensor  # like onehot, zero only where ignore_index (mask not applied)


class SegmentationLoss(nn.Module):
    """A loss built by :func:`build_loss`; call as ``loss(logits, target, weights, *, mask)``."""

    class_weights: torch.Tensor | None

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        from monai.losses import DiceLoss, FocalLoss, TverskyLoss

        self.cfg = cfg
        cw = None if cfg.class_weights is None else torch.tensor(cfg.class_weights)
        self.register_buffer("class_weights", cw, persistent=False)
        region: nn.Module | None = None
        if cfg.name == "tversky":
            region = TverskyLoss(include_background=cfg.include_background, alpha=cfg.alpha,
                                 beta=cfg.beta, smooth_nr=cfg.smooth, smooth_dr=cfg.smooth,
                                 batch=cfg.batch_dice)
        elif cfg.name in ("dice", "iou", "dice_ce", "dice_focal", "boundary"):
            region = DiceLoss(include_background=cfg.include_background,
                              jaccard=cfg.name == "iou", smooth_nr=cfg.smooth,
                              smooth_dr=cfg.smooth, batch=cfg.batch_dice)
        self.region = region
        self.focal = (FocalLoss(gamma=cfg.gamma, use_softmax=not cfg.multilabel, reduction="none")
                      if cfg.name in ("focal", "dice_focal") else None)

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        pixel_weights: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss, a scalar tensor (see the module docstring for shapes)."""
        name = self.cfg.name
        onehot, valid, ids, labelled = self._prepare(logits, target, mask)
        if name == "pixel_weighted_ce" and pixel_weights is None:
            raise ConfigError(
                "loss 'pixel_weighted_ce' needs pixel_weights (the store's 'weights' array): "
                "pass them, or choose another loss"
            )
        if name in ("dice", "iou", "tversky"):
            return self._regional(logits, onehot, valid)
        if name == "boundary":
            pixel = self._boundary(logits, labelled, valid)
        elif name in ("focal", "dice_focal"):
            pixel = self._pixelwise(self._focal(logits, onehot), valid, ids, None)
        else:
            weights = pixel_weights if name == "pixel_weighted_ce" else None
            pixel = self._pixelwise(self._ce(logits, onehot, ids), valid, ids, weights)
        if name in ("ce", "weighted_ce", "pixel_weighted_ce", "focal"):
            return pixel
        lam_region, lam_pixel = self.cfg.lambdas
        return lam_region * self._regional(logits, onehot, valid) + lam_pixel * pixel

    # ---------------------------------------------------------------- pieces

    def _prepare(
        self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
    ) -> _Prepared:
        """Validate shapes and values; one-hot targets and the counted-pixel mask."""
        cfg = self.cfg
        if logits.ndim != 4:
            raise ConfigError(f"logits must be (N, K, H, W), got shape {tuple(logits.shape)}")
        n, k, h, w = logits.shape
        want = (n, k, h, w) if cfg.multilabel else (n, h, w)
        if tuple(target.shape) != want:
            raise ConfigError(
                f"target must have shape {want} for logits {tuple(logits.shape)}"
                f"{' (multilabel)' if cfg.multilabel else ''}, got {tuple(target.shape)}"
            )
        if mask is not None and tuple(mask.shape) != (n, h, w):
            raise ConfigError(f"mask must have shape {(n, h, w)}, got {tuple(mask.shape)}")
        if self.class_weights is not None and len(self.class_weights) != k:
            raise ConfigError(
                f"class_weights has {len(self.class_weights)} entries for {k} classes: "
                "give one weight per class"
            )
        if cfg.ignore_index is None:
            keep = torch.ones_like(target, dtype=torch.bool)
        else:
            keep = target != cfg.ignore_index
        top = 2 if cfg.multilabel else k
        wrong = keep & ((target < 0) | (target >= top))
        if bool(wrong.any()):
            allowed = "0 or 1 (multilabel)" if cfg.multilabel else f"a class id 0..{k - 1}"
            if cfg.ignore_index is not None:
                allowed += f" or ignore_index {cfg.ignore_index}"
            raise LabelError(
                f"target value {target[wrong][0].item()} is not {allowed}: "
                "check the labels and the model's out_channels"
            )
        if cfg.multilabel:
            labelled = torch.where(keep, target, 0).to(logits.dtype)
            keep_f = keep.to(logits.dtype)
            ids = None
        else:
            ids = torch.where(keep, target, 0).long()
            keep_f = keep[:, None].to(logits.dtype)
            labelled = F.one_hot(ids, k).permute(0, 3, 1, 2).to(logits.dtype) * keep_f
        if mask is None:
            return _Prepared(labelled, keep_f, ids, labelled)
        valid = keep_f * mask[:, None].to(logits.dtype)
        return _Prepared(labelled * valid, valid, ids, labelled)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.cfg.multilabel else torch.softmax(logits, dim=1)

    def _ce(self, logits: torch.Tensor, onehot: torch.Tensor, ids: torch.Tensor | None
            ) -> torch.Tensor:
        """Per-pixel (N, 1, H, W) CE, or per-element (N, K, H, W) BCE."""
        if ids is None:
            return F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        return F.cross_entropy(logits, ids, reduction="none")[:, None]

    def _focal(self, logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        assert self.focal is not None
        loss = self.focal(logits, onehot)
        return loss if self.cfg.multilabel else loss.sum(dim=1, keepdim=True)

    def _pixelwise(
        self,
        loss: torch.Tensor,
        valid: torch.Tensor,
        ids: torch.Tensor | None,
        pixel_weights: torch.Tensor | None,
    ) -> torch.Tensor:
        """``sum(w * loss) / sum(w)`` over counted pixels (elements in multi-label mode)."""
        w = valid
        if self.class_weights is not None:
            cw = self.class_weights.to(loss.device, loss.dtype)
            w = w * (cw[ids][:, None] if ids is not None else cw.view(1, -1, 1, 1))
        if pixel_weights is not None:
            if pixel_weights.shape != (loss.shape[0], *loss.shape[2:]):
                raise ConfigError(
                    f"pixel_weights must have shape {(loss.shape[0], *loss.shape[2:])}, "
                    f"got {tuple(pixel_weights.shape)}"
                )
            w = w * pixel_weights[:, None].to(loss.dtype)
        w = w.expand_as(loss)
        # where(): a NaN/inf loss at an uncounted pixel must not leak into the sum
        total = torch.where(w > 0, w * loss, torch.zeros_like(loss)).sum()
        return total / w.sum().clamp_min(torch.finfo(loss.dtype).tiny)

    def _regional(self, logits: torch.Tensor, onehot: torch.Tensor, valid: torch.Tensor
                  ) -> torch.Tensor:
        assert self.region is not None
        return self.region(self._probs(logits) * valid, onehot)

    def _boundary(self, logits: torch.Tensor, labelled: torch.Tensor, valid: torch.Tensor
                  ) -> torch.Tensor:
        # distances from the labels as drawn (ignored pixels belong to no class), not
        # from the masked targets: a random loss mask must not create boundaries
        sdm = torch.from_numpy(signed_distance_maps(labelled.detach().cpu().numpy()))
        prod = self._probs(logits) * sdm.to(logits.device, logits.dtype) * valid
        counted = valid.expand_as(prod)
        if not self.cfg.include_background and logits.shape[1] > 1:
            prod, counted = prod[:, 1:], counted[:, 1:]
        return prod.sum() / counted.sum().clamp_min(1.0)
