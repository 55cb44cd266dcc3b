"""The architectures MONAI lacks, in torch: FCN-32s/16s/8s (Long et al. 2015), FC-DenseNet
56/67/103 (Jegou et al. 2017), a SegNet-style encoder-decoder (Badrinarayanan et al. 2017),
and the decoders' upsampling (:class:`Upsample2d`, ICNR-initialised sub-pixel convolution).

:func:`segflow.train.models.build_model` builds them from a
:class:`~segflow.config.model.ModelConfig`; see its module notes for the choices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from segflow.config.model import ModelConfig
from segflow.errors import ConfigError

__all__ = ["FCN", "FCDenseNet", "SegNet", "Upsample2d", "icnr_"]


def _widths(cfg: ModelConfig, *, vgg: bool = False) -> list[int]:
    """Widths of levels 0..depth: doubling, or VGG-like (x1, x2, x4, x8, x8, ...)."""
    return [cfg.features * 2 ** (min(i, 3) if vgg else i) for i in range(cfg.depth + 1)]


#: FC-DenseNet layers per dense block: 5 down, the bottleneck, 5 up (Jegou et al., Table 2).
_DENSE_LAYERS = {
    "fc_densenet56": (4,) * 11,
    "fc_densenet67": (5,) * 11,
    "fc_densenet103": (4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4),
}


# ------------------------------------------------------------------ our own decoders


def icnr_(
    weight: torch.Tensor,
    scale: int = 2,
    init: Callable[[torch.Tensor], Any] = nn.init.kaiming_normal_,
) -> torch.Tensor:
    """ICNR initialisation of a sub-pixel convolution, in place.

    Aitken et al. 2017, "Checkerboard artifact free sub-pixel convolution"
    (arXiv:1707.02937): initialise one sub-kernel per output channel and repeat it for the
    ``scale**2`` channels that ``PixelShuffle(scale)`` spreads over one output pixel's
    neighbourhood, so the initial subpixel upsampling equals nearest-neighbour upsampling
    of a convolution (no checkerboard at initialisation).

    Parameters
    ----------
    weight
        Convolution weight ``(out * scale**2, in, kh, kw)``.
    scale
        The ``PixelShuffle`` factor.
    init
        Initialiser of the ``(out, in, kh, kw)`` sub-kernel.

    >>> w = torch.empty(8, 3, 3, 3)
    >>> _ = icnr_(w, 2)
    >>> bool((w[0] == w[3]).all() and (w[4] == w[7]).all())
    True
    """
    out_ch = weight.shape[0]
    groups = scale**2
    if out_ch % groups:
        raise ConfigError(
            f"ICNR needs output channels divisible by scale**2 = {groups}, got {out_ch}"
        )
    sub = torch.empty((out_ch // groups, *weight.shape[1:]), dtype=weight.dtype)
    init(sub)
    with torch.no_grad():
        weight.copy_(sub.repeat_interleave(groups, dim=0))
    return weight


def _bilinear_kernel(channels: int, size: int) -> torch.Tensor:
    """A diagonal (channels, channels, size, size) bilinear upsampling kernel (FCN)."""
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float32)
    filt1 = 1 - (og - centre).abs() / factor
    weight = torch.zeros(channels, channels, size, size)
    weight[range(channels), range(channels)] = filt1[:, None] * filt1[None, :]
    return weight


class Upsample2d(nn.Module):
    """Upsample by ``scale`` and change the width from ``in_ch`` to ``out_ch``.

    ``transpose``: ``ConvTranspose2d`` with kernel ``2 * scale``, stride ``scale``
    (initialised to bilinear interpolation where the width does not change, as in FCN);
    ``nearest`` / ``bilinear``: a 1x1 convolution (where the width changes; it commutes
    with the interpolation) then interpolation (``align_corners=False``); ``subpixel``:
    a 3x3 convolution to ``out_ch * scale**2`` channels, ICNR-initialised, then
    ``PixelShuffle(scale)``.

    >>> up = Upsample2d(4, 2, 4, "subpixel")
    >>> up(torch.zeros(1, 4, 8, 8)).shape
    torch.Size([1, 2, 32, 32])
    """

    def __init__(self, in_ch: int, out_ch: int, scale: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.scale = scale
        self.body: nn.Module
        if mode == "transpose":
            conv = nn.ConvTranspose2d(in_ch, out_ch, 2 * scale, stride=scale, padding=scale // 2)
            if in_ch == out_ch:
                with torch.no_grad():
                    conv.weight.copy_(_bilinear_kernel(in_ch, 2 * scale))
                    assert conv.bias is not None
                    conv.bias.zero_()
            self.body = conv
        elif mode in ("nearest", "bilinear"):
            proj: nn.Module = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
            interp = nn.Upsample(
                scale_factor=scale, mode=mode, align_corners=None if mode == "nearest" else False
            )
            self.body = nn.Sequential(proj, interp)
        elif mode == "subpixel":
            sub = nn.Conv2d(in_ch, out_ch * scale**2, 3, padding=1)
            icnr_(sub.weight, scale)
            with torch.no_grad():
                assert sub.bias is not None
                sub.bias.zero_()
            self.body = nn.Sequential(sub, nn.PixelShuffle(scale))
        else:
            raise ConfigError(
                f"unknown upsample mode {mode!r}: use transpose, nearest, bilinear or subpixel"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _norm_layer(cfg: ModelConfig, channels: int) -> nn.Module:
    if cfg.norm == "batch":
        return nn.BatchNorm2d(channels)
    if cfg.norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if cfg.norm == "group":
        return nn.GroupNorm(cfg.num_groups, channels)
    return nn.Identity()


def _conv_bn_relu(cfg: ModelConfig, cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=cfg.norm == "none"),
        _norm_layer(cfg, cout),
        nn.ReLU(inplace=True),
    )


def _vgg_stage(cfg: ModelConfig, level: int, cin: int, cout: int) -> nn.Sequential:
    """VGG-style stage: 2 convolutions in the first two stages, 3 below."""
    n = 2 if level < 2 else 3
    return nn.Sequential(*[_conv_bn_relu(cfg, cin if i == 0 else cout, cout) for i in range(n)])


class FCN(nn.Module):
    """FCN-32s/16s/8s (Long, Shelhamer & Darrell 2015) on a small VGG-like encoder.

    The encoder has ``depth`` stages, each ending with a 2x max-pool; a 3x3 + 1x1
    convolutional head (the paper's fc6/fc7) and a 1x1 classifier score the coarsest map.
    ``skips`` (0, 1 or 2 for 32s, 16s, 8s) adds scores from the pools one and two levels
    up, fused after 2x upsampling; the fused scores are upsampled to the input size.
    """

    def __init__(self, cfg: ModelConfig, skips: int) -> None:
        super().__init__()
        w = _widths(cfg, vgg=True)
        k = cfg.out_channels
        self.stages = nn.ModuleList(
            _vgg_stage(cfg, i, cfg.in_channels if i == 0 else w[i - 1], w[i])
            for i in range(cfg.depth)
        )
        self.pool = nn.MaxPool2d(2, 2)
        top, head = w[cfg.depth - 1], 2 * w[cfg.depth - 1]
        self.head = nn.Sequential(
            nn.Conv2d(top, head, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Conv2d(head, head, 1),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Conv2d(head, k, 1),
        )
        # score layers for pool(depth-1), pool(depth-2) and the 2x fusing upsamplers
        self.skip_scores = nn.ModuleList(
            nn.Conv2d(w[cfg.depth - 2 - i], k, 1) for i in range(skips)
        )
        self.skip_ups = nn.ModuleList(Upsample2d(k, k, 2, cfg.upsample) for _ in range(skips))
        self.final_up = Upsample2d(k, k, 2 ** (cfg.depth - skips), cfg.upsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pools = []
        for stage in self.stages:
            x = self.pool(stage(x))
            pools.append(x)
        score = self.head(x)
        for i, (score_layer, up) in enumerate(zip(self.skip_scores, self.skip_ups, strict=True)):
            score = up(score) + score_layer(pools[-2 - i])
        return self.final_up(score)


class _DenseLayer(nn.Sequential):
    def __init__(self, cfg: ModelConfig, cin: int, growth: int) -> None:
        super().__init__(
            _norm_layer(cfg, cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, growth, 3, padding=1),
            nn.Dropout(cfg.dropout),
        )


class _DenseBlock(nn.Module):
    """``n`` dense layers; returns the new feature maps only (``n * growth`` channels)."""

    def __init__(self, cfg: ModelConfig, cin: int, n: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_DenseLayer(cfg, cin + i * growth, growth) for i in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = []
        for layer in self.layers:
            out = layer(x)
            x = torch.cat([x, out], dim=1)
            new.append(out)
        return torch.cat(new, dim=1)


class FCDenseNet(nn.Module):
    """FC-DenseNet ("The One Hundred Layers Tiramisu", Jegou et al. 2017).

    First 3x3 convolution to ``features`` (48) maps; 5 dense blocks each followed by a
    transition down (norm, ReLU, 1x1 conv, dropout, 2x max-pool); a bottleneck block; 5
    transitions up (``Upsample2d`` of the previous block's *new* maps only, the paper's
    3x3 stride-2 transposed convolution by default), each concatenated with the skip and
    followed by a dense block; the last block's full concatenation goes to a 1x1
    classifier. With growth 16 and the 103-layer plan the last block has 256 maps, as in
    the paper.
    """

    def __init__(self, cfg: ModelConfig, layers: tuple[int, ...], growth: int) -> None:
        super().__init__()
        n_down = cfg.depth
        self.first = nn.Conv2d(cfg.in_channels, cfg.features, 3, padding=1)
        m = cfg.features
        self.down_blocks = nn.ModuleList()
        self.transitions_down = nn.ModuleList()
        skips = []
        for i in range(n_down):
            self.down_blocks.append(_DenseBlock(cfg, m, layers[i], growth))
            m += layers[i] * growth
            skips.append(m)
            self.transitions_down.append(
                nn.Sequential(
                    _norm_layer(cfg, m),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(m, m, 1),
                    nn.Dropout(cfg.dropout),
                    nn.MaxPool2d(2, 2),
                )
            )
        self.bottleneck = _DenseBlock(cfg, m, layers[n_down], growth)
        up_in = layers[n_down] * growth
        self.transitions_up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for j, skip in enumerate(reversed(skips)):
            n = layers[n_down + 1 + j]
            self.transitions_up.append(Upsample2d(up_in, up_in, 2, cfg.upsample))
            self.up_blocks.append(_DenseBlock(cfg, up_in + skip, n, growth))
            last_in = up_in + skip
            up_in = n * growth
        self.classifier = nn.Conv2d(last_in + up_in, cfg.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        skips = []
        for block, down in zip(self.down_blocks, self.transitions_down, strict=True):
            x = torch.cat([x, block(x)], dim=1)
            skips.append(x)
            x = down(x)
        new = self.bottleneck(x)
        for up, block, skip in zip(
            self.transitions_up, self.up_blocks, reversed(skips), strict=True
        ):
            x = torch.cat([up(new), skip], dim=1)
            new = block(x)
        return self.classifier(torch.cat([x, new], dim=1))


class SegNet(nn.Module):
    """SegNet-style encoder-decoder (Badrinarayanan, Kendall & Cipolla 2017).

    VGG-like encoder stages (conv-norm-ReLU x 2 or 3) each ending with a 2x max-pool that
    keeps its indices; the mirrored decoder upsamples with ``MaxUnpool2d`` at those
    indices (no learned upsampling), then convolves; a 1x1 classifier gives the logits.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w = _widths(cfg, vgg=True)[: cfg.depth]
        self.encoders = nn.ModuleList(
            _vgg_stage(cfg, i, cfg.in_channels if i == 0 else w[i - 1], w[i])
            for i in range(cfg.depth)
        )
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.decoders = nn.ModuleList()
        for i in reversed(range(cfg.depth)):
            n = 2 if i < 2 else 3
            cout = w[i - 1] if i > 0 else w[0]
            convs = [_conv_bn_relu(cfg, w[i], w[i]) for _ in range(n - 1)]
            self.decoders.append(nn.Sequential(*convs, _conv_bn_relu(cfg, w[i], cout)))
        self.classifier = nn.Conv2d(w[0], cfg.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        saved = []
        for enc in self.encoders:
            x = enc(x)
            size = x.shape[-2:]
            x, idx = self.pool(x)
            saved.append((idx, size))
        for dec, (idx, size) in zip(self.decoders, reversed(saved), strict=True):
            x = dec(self.unpool(x, idx, output_size=size))
        return self.classifier(x)
