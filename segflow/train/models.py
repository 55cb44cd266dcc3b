"""Segmentation networks built from a typed config.

One entry point, :func:`build_model`, maps a :class:`ModelConfig` to a 2-D
``torch.nn.Module`` that takes ``(N, in_channels, H, W)`` and returns logits
``(N, out_channels, H, W)`` (one tensor, in train and eval mode alike) for every ``H, W``
divisible by :func:`size_multiple`.

Architectures
-------------
MONAI's networks: ``unet`` (``monai.networks.nets.UNet``), ``basic_unet``,
``basic_unet_pp`` (UNet++; only the final output is returned), ``attention_unet``,
``segresnet``, ``dynunet`` and ``flexible_unet`` (a ResNet encoder built with
``pretrained=False``: nothing is downloaded).

The seeds' classics MONAI lacks, written here in torch:

- ``fcn32s`` / ``fcn16s`` / ``fcn8s``: Long et al. 2015 skip decoders on a small VGG-like
  encoder (2, 2, 3, 3, 3 convolutions per stage, no pretrained weights, "same" padding
  instead of the paper's 100-pixel pad and crop).
- ``fc_densenet56`` / ``fc_densenet67`` / ``fc_densenet103``: the "One Hundred Layers
  Tiramisu" (Jegou et al. 2017): dense blocks, transition down (BN, ReLU, 1x1 conv,
  dropout, max-pool) and transition up on the new feature maps only; growth rate 12 / 16 /
  16 and 4 / 5 / (4, 5, 7, 10, 12, 15) layers per block as in the paper's Table 2.
- ``segnet``: a SegNet-style (Badrinarayanan et al. 2017) encoder-decoder whose decoder
  upsamples with the encoder's max-pooling indices
  (``MaxPool2d(return_indices=True)`` + ``MaxUnpool2d``).

Upsampling choices (``upsample``) for the decoders that allow them: ``transpose``
(transposed convolution), ``nearest`` and ``bilinear`` (interpolation plus a 1x1
convolution where the width changes), ``subpixel`` (a convolution and ``PixelShuffle``
initialised with ICNR, :func:`icnr_`), and ``unpool`` (SegNet only). MONAI's options are
mapped: ``transpose`` -> ``"deconv"``, ``subpixel`` -> ``"pixelshuffle"`` (MONAI applies
ICNR itself), ``nearest`` / ``bilinear`` -> ``"nontrainable"`` with that interpolation
(``bilinear`` always with ``align_corners=False``). The combinations each architecture
accepts are in :data:`UPSAMPLE_CHOICES` and :data:`NORM_CHOICES`.

Tiling
------
Overlap-tile inference with ``crop`` merging equals whole-image inference only if every
output pixel depends on a bounded neighbourhood of the input. That holds with
``norm="batch"`` (in eval mode, where BatchNorm is a fixed affine map) or ``norm="none"``.
``instance`` and ``group`` normalisation compute statistics over the whole tile, so every
output depends on every input pixel of the tile: such models are not tile-independent
(:func:`tile_independent`) and tiles merge only approximately (use Gaussian blending).
BatchNorm in *train* mode also uses batch statistics. :func:`receptive_field` measures the
context radius (the halo) numerically; input windows must also start on multiples of
:func:`size_multiple` for the down-sampling grid to line up.

Examples
--------
>>> import torch
>>> cfg = ModelConfig(arch="unet", in_channels=3, out_channels=2, features=4, depth=2)
>>> model = build_model(cfg).eval()
>>> model(torch.zeros(1, 3, 64, 64)).shape
torch.Size([1, 2, 64, 64])
>>> size_multiple(cfg), tile_independent(cfg)
(4, True)
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from segflow.config import format_validation_error
from segflow.config.model import ARCH_DEFAULTS, NORM_CHOICES, UPSAMPLE_CHOICES, Arch, ModelConfig
from segflow.errors import ConfigError
from segflow.train.architectures import (
    _DENSE_LAYERS,
    FCN,
    FCDenseNet,
    SegNet,
    Upsample2d,
    _widths,
    icnr_,
)

__all__ = [
    "ARCH_DEFAULTS",
    "NORM_CHOICES",
    "UPSAMPLE_CHOICES",
    "Arch",
    "ModelConfig",
    "Upsample2d",
    "build_model",
    "halo",
    "icnr_",
    "receptive_field",
    "size_multiple",
    "tile_independent",
]



# --------------------------------------------------------------------------- building


def build_model(cfg: ModelConfig | Mapping[str, Any]) -> nn.Module:
    """Build the network a config describes (weights freshly initialised, train mode).

    Parameters
    ----------
    cfg
        A :class:`ModelConfig`, or a mapping validated into one.

    Returns
    -------
    torch.nn.Module
        Maps ``(N, in_channels, H, W)`` to logits ``(N, out_channels, H, W)`` for ``H`` and
        ``W`` divisible by :func:`size_multiple`.

    Raises
    ------
    ConfigError
        The mapping does not validate, or the architecture cannot be built with these
        widths (for example group normalisation over a width not divisible by
        ``num_groups``).
    """
    cfg = _as_config(cfg)
    try:
        return _BUILDERS[cfg.arch](cfg)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(
            f"cannot build arch {cfg.arch!r} from this config ({err}): "
            "change the widths, norm or depth"
        ) from err


def _as_config(cfg: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    if isinstance(cfg, ModelConfig):
        return cfg
    try:
        return ModelConfig.model_validate(cfg)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source="model config")) from err


def size_multiple(cfg: ModelConfig | Mapping[str, Any]) -> int:
    """The number input heights and widths must be divisible by (``2 ** depth``).

    >>> size_multiple(ModelConfig(arch="fc_densenet56", in_channels=1, out_channels=2))
    32
    """
    return _as_config(cfg).size_multiple


def tile_independent(cfg: ModelConfig | Mapping[str, Any]) -> bool:
    """Whether, in eval mode, each output pixel depends only on a bounded neighbourhood.

    True for ``norm`` ``batch`` or ``none``; instance and group normalisation use
    statistics of the whole tile, so crop-tiling does not reproduce whole-image inference.

    >>> tile_independent(ModelConfig(arch="unet", in_channels=1, out_channels=2, norm="instance"))
    False
    """
    return _as_config(cfg).norm in ("batch", "none")


def _monai_norm(cfg: ModelConfig) -> str | tuple[str, dict[str, Any]]:
    if cfg.norm == "group":
        return ("group", {"num_groups": cfg.num_groups})
    if cfg.norm == "instance":
        return ("instance", {"affine": True})
    return "" if cfg.norm == "none" else "batch"


_MONAI_UPSAMPLE = {"transpose": "deconv", "subpixel": "pixelshuffle", "nearest": "nontrainable",
                   "bilinear": "nontrainable"}


def _set_interpolation(model: nn.Module, mode: str) -> nn.Module:
    """Make every ``nn.Upsample`` of a MONAI network interpolate with ``mode``.

    MONAI's BasicUNet and SegResNet do not expose their "nontrainable" interpolation mode;
    we set it on the modules so ``nearest``/``bilinear`` mean the same in every network.
    """
    for module in model.modules():
        if isinstance(module, nn.Upsample):
            module.mode = mode
            module.align_corners = None if mode == "nearest" else False
    return model


class _LastOutput(nn.Module):
    """Return only the final output of a network that returns a list (UNet++)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out[-1] if isinstance(out, list | tuple) else out


def _build_unet(cfg: ModelConfig) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        channels=_widths(cfg), strides=(2,) * cfg.depth, up_kernel_size=cfg.up_kernel_size or 3,
        num_res_units=cfg.num_res_units or 0, norm=_monai_norm(cfg), dropout=cfg.dropout,
    )


def _build_basic_unet(cfg: ModelConfig) -> nn.Module:
    from monai.networks.nets import BasicUNet, BasicUNetPlusPlus

    w = _widths(cfg)
    kwargs: dict[str, Any] = dict(
        spatial_dims=2, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        features=(*w, w[0]), norm=_monai_norm(cfg), dropout=cfg.dropout,
        upsample=_MONAI_UPSAMPLE[cfg.upsample],
    )
    net: nn.Module
    if cfg.arch == "basic_unet_pp":
        net = _LastOutput(BasicUNetPlusPlus(deep_supervision=False, **kwargs))
    else:
        net = BasicUNet(**kwargs)
    if cfg.upsample in ("nearest", "bilinear"):
        _set_interpolation(net, cfg.upsample)
    return net


def _build_attention_unet(cfg: ModelConfig) -> nn.Module:
    from monai.networks.nets import AttentionUnet

    return AttentionUnet(
        spatial_dims=2, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        channels=_widths(cfg), strides=(2,) * cfg.depth, up_kernel_size=cfg.up_kernel_size or 3,
        dropout=cfg.dropout,
    )


def _build_segresnet(cfg: ModelConfig) -> nn.Module:
    from monai.networks.nets import SegResNet

    blocks_down = cfg.blocks_down or (1, *([2] * (cfg.depth - 1)), 4)
    net = SegResNet(
        spatial_dims=2, init_filters=cfg.features, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, dropout_prob=cfg.dropout or None, norm=_monai_norm(cfg),
        blocks_down=tuple(blocks_down), blocks_up=(1,) * cfg.depth,
        upsample_mode=_MONAI_UPSAMPLE[cfg.upsample],
    )
    if cfg.upsample in ("nearest", "bilinear"):
        _set_interpolation(net, cfg.upsample)
    return net


def _build_dynunet(cfg: ModelConfig) -> nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(
        spatial_dims=2, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        kernel_size=[3] * (cfg.depth + 1), strides=[1] + [2] * cfg.depth,
        upsample_kernel_size=[cfg.up_kernel_size or 2] * cfg.depth, filters=_widths(cfg),
        dropout=cfg.dropout or None, norm_name=_monai_norm(cfg), res_block=bool(cfg.residual),
    )


def _build_flexible_unet(cfg: ModelConfig) -> nn.Module:
    from monai.networks.nets import FlexibleUNet

    mode = cfg.upsample
    return FlexibleUNet(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        backbone=cfg.backbone or "resnet18", pretrained=False,
        decoder_channels=tuple(cfg.features * m for m in (16, 8, 4, 2, 1)), spatial_dims=2,
        norm=_monai_norm(cfg), dropout=cfg.dropout, upsample=_MONAI_UPSAMPLE[mode],
        interp_mode=mode if mode in ("nearest", "bilinear") else "nearest",
    )


_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "unet": _build_unet,
    "basic_unet": _build_basic_unet,
    "basic_unet_pp": _build_basic_unet,
    "attention_unet": _build_attention_unet,
    "segresnet": _build_segresnet,
    "dynunet": _build_dynunet,
    "flexible_unet": _build_flexible_unet,
    "fcn32s": lambda cfg: FCN(cfg, 0),
    "fcn16s": lambda cfg: FCN(cfg, 1),
    "fcn8s": lambda cfg: FCN(cfg, 2),
    "fc_densenet56": lambda cfg: FCDenseNet(cfg, _DENSE_LAYERS[cfg.arch], cfg.growth_rate or 12),
    "fc_densenet67": lambda cfg: FCDenseNet(cfg, _DENSE_LAYERS[cfg.arch], cfg.growth_rate or 16),
    "fc_densenet103": lambda cfg: FCDenseNet(cfg, _DENSE_LAYERS[cfg.arch], cfg.growth_rate or 16),
    "segnet": SegNet,
}


# ------------------------------------------------------------------ receptive field

#: Normalisations over the whole tile (or sample); see :func:`receptive_field`.
_GLOBAL_NORMS = (nn.InstanceNorm2d, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _structural_copy(model: nn.Module) -> nn.Module:
    """A float64 eval copy whose gradient support is the network's dependency structure.

    ``ReLU`` becomes ``LeakyReLU`` (a unit that happens to be off does not hide a path),
    index-free max-pooling becomes average pooling over the same window (max-pooling
    depends on every pixel of its window, not only the current argmax), and whole-tile
    normalisations become identities (their tile-wide dependence is reported by
    :func:`tile_independent`; what is measured is the convolutional context).
    """
    net = copy.deepcopy(model).double().eval()

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            new: nn.Module | None = None
            if isinstance(child, nn.ReLU | nn.ReLU6):
                new = nn.LeakyReLU(0.1)
            elif isinstance(child, nn.MaxPool2d) and not child.return_indices:
                new = nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                   ceil_mode=child.ceil_mode)
            elif isinstance(child, _GLOBAL_NORMS):
                new = nn.Identity()
            if new is not None:
                setattr(parent, name, new)
            else:
                swap(child)

    swap(net)
    return net


def receptive_field(
    model: nn.Module,
    *,
    in_channels: int,
    size: int = 256,
    block: int = 1,
    max_size: int = 4096,
    trials: int = 1,
    seed: int = 0,
) -> int:
    """Measure the context radius (halo) a network needs, numerically.

    Sums the outputs of a ``block x block`` group of pixels, back-propagates in float64
    to a random input and finds the extent of the input pixels with a non-zero
    gradient (``abs > 0``); the radius is the largest distance from the block to the edge
    of that extent. Inputs of ``halo`` pixels beyond a tile on every side are then enough
    for its outputs to equal whole-image inference. With ``block = size_multiple`` every
    phase of the down-sampling grid is covered.

    Each axis is measured on a strip (``size`` long, ``4 * block`` wide) rather than a
    ``size x size`` square: square kernels always have a path that stays in the block's
    columns, so the extent along the strip is the same, at a fraction of the cost. The
    gradient is taken through a structural copy of the network (ReLU -> LeakyReLU,
    index-free max-pool -> average pool, instance/group/layer norm -> identity) so
    units that happen to be off cannot hide a dependence; max-unpooling (SegNet) depends
    on the input through its indices, which the union over ``trials`` random inputs
    covers. Where the dependence reaches the end of the strip, ``size`` doubles, up to
    ``max_size``.

    Parameters
    ----------
    model
        The network (not modified: a copy is measured).
    in_channels
        Input channels of the network.
    size
        First strip length tried (rounded up to a multiple of ``2 * block``).
    block
        Side of the group of output pixels measured together; pass the network's
        :func:`size_multiple` (the strips are ``4 * block`` wide, a size the network
        must accept).
    max_size, trials, seed
        Longest strip tried, random inputs per length, and their seed (a private
        generator: the global RNG is not touched).

    Returns
    -------
    int
        The halo in pixels.

    Raises
    ------
    ConfigError
        The dependence still reaches the end of a ``max_size`` strip (a global operation,
        or a receptive field larger than ``max_size / 2``).

    Examples
    --------
    >>> net = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1) for _ in range(3)])
    >>> receptive_field(net, in_channels=1, size=32)
    3
    """
    net = _structural_copy(model)
    gen = torch.Generator().manual_seed(seed)
    size = max(size, 8 * block)
    size += -size % (2 * block)
    while True:
        radius = _strip_radius(net, in_channels, size, block, trials, gen)
        if radius is not None:
            return radius
        if size * 2 > max_size:
            raise ConfigError(
                f"the output depends on input pixels {size // 2} px away or more: the network "
                "has a global operation or a receptive field that large; pass a larger "
                f"max_size (got {max_size}) or use a local network"
            )
        size *= 2


def _strip_radius(
    net: nn.Module, in_channels: int, size: int, block: int, trials: int, gen: torch.Generator
) -> int | None:
    """The halo measured on strips of length ``size``, or ``None`` if that is too short.

    Too short: the dependence reaches an end of a strip (the other axis is then not
    measured, so ``gen`` draws exactly the inputs it always did).
    """
    radius = 0
    for axis in (0, 1):
        extent = _support_extent(net, in_channels, size, block, axis, trials, gen)
        if extent is None:
            continue
        lo, hi, c0 = extent
        if lo == 0 or hi == size - 1:
            return None
        radius = max(radius, c0 - lo, hi - (c0 + block - 1))
    return radius


def _support_extent(
    net: nn.Module, in_channels: int, size: int, block: int, axis: int, trials: int,
    gen: torch.Generator,
) -> tuple[int, int, int] | None:
    """First and last input index along ``axis`` that the central block depends on."""
    width = 4 * block
    shape = (size, width) if axis == 0 else (width, size)
    c0 = (size - block) // 2 // block * block  # on the down-sampling grid
    s0 = block
    rows = slice(c0, c0 + block) if axis == 0 else slice(s0, s0 + block)
    cols = slice(s0, s0 + block) if axis == 0 else slice(c0, c0 + block)
    param = next(iter(net.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    support = torch.zeros(size, dtype=torch.bool)
    for _ in range(trials):
        x = torch.randn(1, in_channels, *shape, generator=gen, dtype=torch.float64)
        x = x.to(device).requires_grad_(True)
        net(x)[..., rows, cols].sum().backward()
        assert x.grad is not None
        nonzero = (x.grad[0].abs() > 0).any(dim=0)
        support |= nonzero.any(dim=1 - axis).cpu()
    hits = torch.nonzero(support).flatten()
    if len(hits) == 0:
        return None
    return int(hits[0]), int(hits[-1]), c0


def halo(cfg: ModelConfig | Mapping[str, Any], *, max_size: int = 4096) -> int:
    """The receptive-field radius of the architecture a config describes.

    The dependence structure does not depend on the widths, so this measures a slim
    copy of the architecture (``features`` 2, ``growth_rate`` 1, one input and output
    channel, BatchNorm: whole-tile norms are replaced by identities in the measurement
    anyway), built with a private seed (the global RNG is untouched), over a
    ``size_multiple`` block so the halo covers every phase of the down-sampling grid.
    Results are cached per config (deep networks take a while: FC-DenseNet103 needs a
    4096-pixel strip).

    >>> halo(ModelConfig(arch="unet", in_channels=1, out_channels=2, depth=1,
    ...                  num_res_units=0))
    4
    """
    return _halo(_as_config(cfg), max_size)


@functools.lru_cache(maxsize=64)
def _halo(cfg: ModelConfig, max_size: int) -> int:
    slim = {**cfg.model_dump(), "in_channels": 1, "out_channels": 1, "features": 2,
            "norm": "batch"}
    if cfg.growth_rate is not None:
        slim["growth_rate"] = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(ModelConfig.model_validate(slim))
    m = size_multiple(cfg)
    return receptive_field(model, in_channels=1, block=m, size=max(256, 8 * m),
                           max_size=max_size, trials=3 if cfg.arch == "segnet" else 1)
