"""The network schema: which architecture, how wide, deep and normalised (no torch here).

:mod:`segflow.train.models` builds the network a :class:`ModelConfig` describes; this module
only declares and validates the options, so the pipeline schema (and its reference) load
without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ARCH_DEFAULTS",
    "NORM_CHOICES",
    "UPSAMPLE_CHOICES",
    "Arch",
    "Backbone",
    "ModelConfig",
    "Norm",
    "UpsampleMode",
]

Arch = Literal[
    "unet",
    "basic_unet",
    "basic_unet_pp",
    "attention_unet",
    "segresnet",
    "dynunet",
    "flexible_unet",
    "fcn32s",
    "fcn16s",
    "fcn8s",
    "fc_densenet56",
    "fc_densenet67",
    "fc_densenet103",
    "segnet",
]
Norm = Literal["batch", "instance", "group", "none"]
UpsampleMode = Literal["transpose", "nearest", "bilinear", "subpixel", "unpool"]
Backbone = Literal["resnet10", "resnet18", "resnet34", "resnet50"]

_ALL_NORMS: frozenset[str] = frozenset({"batch", "instance", "group", "none"})
_INTERP_UPSAMPLE: frozenset[str] = frozenset({"transpose", "nearest", "bilinear", "subpixel"})

#: Upsampling modes each architecture accepts.
UPSAMPLE_CHOICES: dict[str, frozenset[str]] = {
    "unet": frozenset({"transpose"}),
    "attention_unet": frozenset({"transpose"}),
    "dynunet": frozenset({"transpose"}),
    "basic_unet": _INTERP_UPSAMPLE,
    "basic_unet_pp": _INTERP_UPSAMPLE,
    "segresnet": _INTERP_UPSAMPLE,
    "flexible_unet": _INTERP_UPSAMPLE,
    "fcn32s": _INTERP_UPSAMPLE,
    "fcn16s": _INTERP_UPSAMPLE,
    "fcn8s": _INTERP_UPSAMPLE,
    "fc_densenet56": _INTERP_UPSAMPLE,
    "fc_densenet67": _INTERP_UPSAMPLE,
    "fc_densenet103": _INTERP_UPSAMPLE,
    "segnet": frozenset({"unpool"}),
}

#: Normalisations each architecture accepts (MONAI's AttentionUnet hard-codes BatchNorm,
#: DynUNet has no "no norm" option).
NORM_CHOICES: dict[str, frozenset[str]] = {
    arch: _ALL_NORMS for arch in UPSAMPLE_CHOICES
} | {"attention_unet": frozenset({"batch"}), "dynunet": frozenset({"batch", "instance", "group"})}

#: Defaults filled in per architecture for every option not given (or given as None).
#: Options not listed for an architecture do not apply to it and must stay unset.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "unet": dict(depth=4, features=32, upsample="transpose", dropout=0.0,
                 up_kernel_size=3, num_res_units=2),
    "basic_unet": dict(depth=4, features=32, upsample="transpose", dropout=0.0),
    "basic_unet_pp": dict(depth=4, features=32, upsample="transpose", dropout=0.0),
    "attention_unet": dict(depth=4, features=32, upsample="transpose", dropout=0.0,
                           up_kernel_size=3),
    "segresnet": dict(depth=3, features=8, upsample="bilinear", dropout=0.0, blocks_down=None),
    "dynunet": dict(depth=4, features=32, upsample="transpose", dropout=0.0,
                    up_kernel_size=2, residual=False),
    "flexible_unet": dict(depth=5, features=16, upsample="nearest", dropout=0.0,
                          backbone="resnet18"),
    "fcn32s": dict(depth=5, features=64, upsample="transpose", dropout=0.5),
    "fcn16s": dict(depth=5, features=64, upsample="transpose", dropout=0.5),
    "fcn8s": dict(depth=5, features=64, upsample="transpose", dropout=0.5),
    "fc_densenet56": dict(depth=5, features=48, upsample="transpose", dropout=0.2,
                          growth_rate=12),
    "fc_densenet67": dict(depth=5, features=48, upsample="transpose", dropout=0.2,
                          growth_rate=16),
    "fc_densenet103": dict(depth=5, features=48, upsample="transpose", dropout=0.2,
                           growth_rate=16),
    "segnet": dict(depth=5, features=64, upsample="unpool", dropout=0.0),
}
_SPECIFIC = ("up_kernel_size", "num_res_units", "residual", "blocks_down", "backbone",
             "growth_rate")
#: Architectures whose depth is fixed by their design.
_FIXED_DEPTH = {"basic_unet": 4, "basic_unet_pp": 4, "flexible_unet": 5, "fc_densenet56": 5,
                "fc_densenet67": 5, "fc_densenet103": 5}


class ModelConfig(BaseModel):
    """Which network to build and how wide, deep and normalised it is.

    Options left out take the architecture's default from :data:`ARCH_DEFAULTS`, so a
    validated config (and its ``model_dump()``, stored in checkpoints) spells out every
    value that shapes the network.

    Parameters
    ----------
    arch
        The architecture (see the module docstring).
    in_channels, out_channels
        Input bands and output classes (logit channels).
    features
        Width of the first level; each level down doubles it (VGG-like encoders of FCN
        and SegNet stop doubling after the fourth stage). For ``segresnet`` this is
        ``init_filters``; for ``flexible_unet`` the decoder widths are
        ``features * (16, 8, 4, 2, 1)``; for FC-DenseNet the first convolution's width.
    depth
        Number of 2x down-samplings (fixed for ``basic_unet*`` (4), ``flexible_unet`` and
        FC-DenseNet (5)).
    norm
        ``batch`` (default; tile-independent in eval mode), ``instance``, ``group`` (with
        ``num_groups``) or ``none``.
    dropout
        Dropout probability (FCN's head and FC-DenseNet's layers have paper defaults).
    upsample
        Decoder upsampling: ``transpose``, ``nearest``, ``bilinear``, ``subpixel``, or
        ``unpool`` (SegNet).
    up_kernel_size
        ``unet``/``attention_unet``: kernel of the transposed convolutions; ``dynunet``:
        its ``upsample_kernel_size``.
    num_res_units
        ``unet``: residual units per level (0 = plain convolutions).
    residual
        ``dynunet``: residual blocks.
    blocks_down
        ``segresnet``: residual blocks per level (``depth + 1`` entries; default
        ``(1, 2, ..., 2, 4)``); one up block per level.
    backbone
        ``flexible_unet``: the ResNet encoder, always built without pretrained weights.
        (EfficientNet encoders are not offered: their squeeze-and-excitation blocks pool
        over the whole tile, so no halo makes tiling seamless.)
    growth_rate
        FC-DenseNet: feature maps added by each dense layer.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Arch
    in_channels: Annotated[int, Field(ge=1)]
    out_channels: Annotated[int, Field(ge=1)]
    features: Annotated[int, Field(ge=1)] = 32
    depth: Annotated[int, Field(ge=1, le=8)] = 4
    norm: Norm = "batch"
    num_groups: Annotated[int, Field(ge=1)] = 8
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    upsample: UpsampleMode = "transpose"
    up_kernel_size: Annotated[int, Field(ge=1)] | None = None
    num_res_units: Annotated[int, Field(ge=0)] | None = None
    residual: bool | None = None
    blocks_down: tuple[Annotated[int, Field(ge=1)], ...] | None = None
    backbone: Backbone | None = None
    growth_rate: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_arch_defaults(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or data.get("arch") not in ARCH_DEFAULTS:
            return data  # let field validation report the problem
        arch = data["arch"]
        defaults = ARCH_DEFAULTS[arch]
        for key in _SPECIFIC:
            if data.get(key) is not None and key not in defaults:
                raise ValueError(f"option '{key}' does not apply to arch {arch!r}: remove it")
        filled = dict(data)
        for key, value in defaults.items():
            if filled.get(key) is None:
                filled[key] = value
        if arch == "segresnet" and filled["blocks_down"] is None:
            depth = filled["depth"]
            if isinstance(depth, int) and depth >= 1:
                filled["blocks_down"] = (1, *([2] * (depth - 1)), 4)
        return filled

    @model_validator(mode="after")
    def _check_arch(self) -> ModelConfig:
        arch = self.arch
        if self.upsample not in UPSAMPLE_CHOICES[arch]:
            raise ValueError(
                f"upsample {self.upsample!r} is not available for arch {arch!r}: "
                f"use one of {sorted(UPSAMPLE_CHOICES[arch])}"
            )
        if self.norm not in NORM_CHOICES[arch]:
            raise ValueError(
                f"norm {self.norm!r} is not available for arch {arch!r}: "
                f"use one of {sorted(NORM_CHOICES[arch])}"
            )
        fixed = _FIXED_DEPTH.get(arch)
        if fixed is not None and self.depth != fixed:
            raise ValueError(f"arch {arch!r} has a fixed depth of {fixed}, got {self.depth}")
        if (arch == "fcn16s" and self.depth < 2) or (arch == "fcn8s" and self.depth < 3):
            raise ValueError(f"arch {arch!r} needs depth >= {2 if arch == 'fcn16s' else 3}")
        if self.blocks_down is not None and len(self.blocks_down) != self.depth + 1:
            raise ValueError(
                f"blocks_down needs depth + 1 = {self.depth + 1} entries, got {self.blocks_down}"
            )
        return self

    @property
    def size_multiple(self) -> int:
        """What input heights and widths must be divisible by: ``2 ** depth``."""
        return int(2**self.depth)
