"""The loss schema: which loss and its options (no torch here; :mod:`segflow.train.losses`
builds it)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["LossConfig", "LossName"]

LossName = Literal[
    "ce", "weighted_ce", "pixel_weighted_ce", "focal", "dice", "iou", "tversky", "dice_ce",
    "dice_focal", "boundary",
]
#: Losses that read ``class_weights`` (required by ``weighted_ce``).
_CLASS_WEIGHTED = frozenset({"weighted_ce", "focal", "dice_ce", "dice_focal"})


class LossConfig(BaseModel):
    """Which loss, and its options.

    Parameters
    ----------
    name
        The loss (see the module docstring).
    ignore_index
        Target value of unlabelled pixels (None: every pixel is labelled).
    class_weights
        One weight per class for the CE/focal terms of ``weighted_ce`` (required),
        ``focal``, ``dice_ce``, ``dice_focal``.
    gamma
        Focal exponent.
    alpha, beta
        Tversky weights of false positives and false negatives (0.5, 0.5 is Dice).
    smooth
        Added to numerator and denominator of Dice / IoU / Tversky.
    lambdas
        Weights of the (regional, pixel-wise) terms of ``dice_ce``, ``dice_focal`` and
        ``boundary``.
    include_background
        Whether class 0 takes part in Dice / IoU / Tversky / boundary terms.
    batch_dice
        Pool intersections over the batch instead of averaging per-sample scores.
    multilabel
        Sigmoid per class and targets ``(N, K, H, W)`` in {0, 1}.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: LossName = "ce"
    ignore_index: Annotated[int, Field(ge=0)] | None = 255
    class_weights: tuple[Annotated[float, Field(ge=0)], ...] | None = None
    gamma: Annotated[float, Field(ge=0)] = 2.0
    alpha: Annotated[float, Field(ge=0)] = 0.5
    beta: Annotated[float, Field(ge=0)] = 0.5
    smooth: Annotated[float, Field(ge=0)] = 1e-5
    lambdas: tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(ge=0)]] = (1.0, 1.0)
    include_background: bool = True
    batch_dice: bool = False
    multilabel: bool = False

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        if self.name == "weighted_ce" and self.class_weights is None:
            raise ValueError("weighted_ce needs class_weights (one per class)")
        if self.class_weights is not None and self.name not in _CLASS_WEIGHTED:
            raise ValueError(
                f"class_weights do not apply to loss {self.name!r}: use one of "
                f"{sorted(_CLASS_WEIGHTED)} or remove them"
            )
        if self.class_weights is not None and sum(self.class_weights) <= 0:
            raise ValueError(f"class_weights must not all be 0, got {self.class_weights}")
        return self
