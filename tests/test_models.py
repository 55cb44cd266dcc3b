"""Networks from config: shapes, a training step, upsampling, ICNR, receptive fields."""

from __future__ import annotations

import math
import typing

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from segflow.errors import ConfigError
from segflow.train.models import (
    ARCH_DEFAULTS,
    UPSAMPLE_CHOICES,
    Arch,
    ModelConfig,
    Upsample2d,
    build_model,
    halo,
    icnr_,
    receptive_field,
    size_multiple,
    tile_independent,
)

ARCHS: tuple[str, ...] = typing.get_args(Arch)

#: Small widths so that every network trains a step in well under a second.
SMALL: dict[str, dict[str, typing.Any]] = {
    "unet": dict(features=4, num_res_units=1),
    "basic_unet": dict(features=4),
    "basic_unet_pp": dict(features=4),
    "attention_unet": dict(features=4),
    "segresnet": dict(features=4),
    "dynunet": dict(features=4),
    "flexible_unet": dict(features=1, backbone="resnet10"),
    "fcn32s": dict(features=4),
    "fcn16s": dict(features=4),
    "fcn8s": dict(features=4),
    "fc_densenet56": dict(features=4, growth_rate=1, dropout=0.0),
    "fc_densenet67": dict(features=4, growth_rate=1, dropout=0.0),
    "fc_densenet103": dict(features=4, growth_rate=1, dropout=0.0),
    "segnet": dict(features=4),
}


def small(arch: str, in_channels: int = 3, out_channels: int = 2, **kw: typing.Any) -> ModelConfig:
    return ModelConfig(arch=arch, in_channels=in_channels, out_channels=out_channels,
                       **{**SMALL[arch], **kw})


def test_every_arch_is_covered() -> None:
    assert set(SMALL) == set(ARCHS) == set(ARCH_DEFAULTS) == set(UPSAMPLE_CHOICES)


def _train_step(model: nn.Module, x: torch.Tensor, out_channels: int) -> torch.Tensor:
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y = model(x)
    assert isinstance(y, torch.Tensor)
    assert y.shape == (x.shape[0], out_channels, *x.shape[2:])
    target = torch.randint(0, out_channels, (x.shape[0], *x.shape[2:]))
    nn.functional.cross_entropy(y, target).backward()
    opt.step()
    changed = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert changed > 0
    return y


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_maps_256_and_trains(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    cfg = small(arch)
    model = build_model(cfg)
    if arch.startswith("fc_densenet"):
        # oneDNN compiles a kernel per new convolution shape: FC-DenseNet's ~100 distinct
        # widths cost seconds of compilation for one step, the plain kernels do not
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    _train_step(model, torch.randn(1, 3, 256, 256), 2)
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 2, 64, 64)
    assert torch.isfinite(y).all()
    assert 256 % size_multiple(cfg) == 0


@pytest.mark.parametrize("arch", ["unet", "fcn8s", "segnet"])
def test_one_band_three_classes(arch: str) -> None:
    torch.manual_seed(1)
    model = build_model(small(arch, in_channels=1, out_channels=3))
    _train_step(model, torch.randn(1, 1, 256, 256), 3)


def test_batch_of_two_and_eval_output_is_one_tensor() -> None:
    torch.manual_seed(2)
    model = build_model(small("basic_unet_pp")).eval()  # MONAI returns a list: we unwrap it
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert isinstance(y, torch.Tensor) and y.shape == (2, 2, 64, 64)


def _upsample_cases() -> list[tuple[str, str]]:
    return [(arch, mode) for arch in ("fcn8s", "fc_densenet56", "basic_unet", "segresnet",
                                      "flexible_unet")
            for mode in ("transpose", "nearest", "bilinear", "subpixel")]


@pytest.mark.parametrize(("arch", "mode"), _upsample_cases())
def test_upsampling_variants_build_and_run(arch: str, mode: str) -> None:
    torch.manual_seed(3)
    cfg = small(arch, upsample=mode)
    model = build_model(cfg).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 2, 64, 64)
    if mode in ("nearest", "bilinear"):
        modes = {m.mode for m in model.modules() if isinstance(m, nn.Upsample)}
        assert modes == {mode}


def test_upsample_choices_are_enforced() -> None:
    with pytest.raises(ValidationError, match="not available for arch 'unet'"):
        ModelConfig(arch="unet", in_channels=1, out_channels=2, upsample="bilinear")
    with pytest.raises(ValidationError, match="not available"):
        ModelConfig(arch="segnet", in_channels=1, out_channels=2, upsample="transpose")
    assert ModelConfig(arch="segnet", in_channels=1, out_channels=2).upsample == "unpool"


def test_segnet_uses_max_unpooling() -> None:
    model = build_model(small("segnet"))
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools and all(p.return_indices for p in pools)
    assert any(isinstance(m, nn.MaxUnpool2d) for m in model.modules())


def test_fc_densenet103_follows_the_paper() -> None:
    """Growth 16, 48 first maps: the last dense block outputs 256 maps (Jegou et al.)."""
    model = build_model(ModelConfig(arch="fc_densenet103", in_channels=3, out_channels=11))
    assert model.classifier.in_channels == 256
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)
             and m.kernel_size == (3, 3)]
    # 103 layers = first conv + 4+5+7+10+12 + 15 + 12+10+7+5+4 dense layers + 5 TD + 5 TU
    # + classifier; the 3x3 convolutions are the first conv and the 91 dense layers
    assert len(convs) == 1 + 91
    grown = {m.out_channels for m in convs[1:]}
    assert grown == {16}


def test_fc_densenet_growth_defaults() -> None:
    for arch, growth in (("fc_densenet56", 12), ("fc_densenet67", 16), ("fc_densenet103", 16)):
        assert ModelConfig(arch=arch, in_channels=1, out_channels=2).growth_rate == growth


def test_icnr_property() -> None:
    """ICNR: the initial subpixel output equals nearest upsampling of the sub-conv."""
    torch.manual_seed(4)
    scale, cin, cout = 2, 3, 4
    conv = nn.Conv2d(cin, cout * scale**2, 3, padding=1, bias=False)
    icnr_(conv.weight, scale)
    sub = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        sub.weight.copy_(conv.weight[::scale**2])
    x = torch.randn(2, cin, 8, 8)
    shuffled = nn.PixelShuffle(scale)(conv(x))
    nearest = nn.functional.interpolate(sub(x), scale_factor=scale, mode="nearest")
    torch.testing.assert_close(shuffled, nearest)


def test_subpixel_upsampler_starts_as_nearest() -> None:
    torch.manual_seed(5)
    up = Upsample2d(4, 3, 4, "subpixel")
    y = up(torch.randn(1, 4, 5, 5))
    assert y.shape == (1, 3, 20, 20)
    blocks = y.reshape(1, 3, 5, 4, 5, 4)
    torch.testing.assert_close(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))


def test_icnr_rejects_indivisible_channels() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        icnr_(torch.empty(6, 1, 3, 3), 2)


def test_transpose_upsampler_starts_bilinear() -> None:
    """FCN's transposed convolutions start as bilinear interpolation."""
    up = Upsample2d(2, 2, 2, "transpose")
    x = torch.ones(1, 2, 6, 6)
    y = up(x)
    assert y.shape == (1, 2, 12, 12)
    torch.testing.assert_close(y[..., 1:-1, 1:-1], torch.ones(1, 2, 10, 10))


# ---------------------------------------------------------------- config handling


def test_defaults_are_filled_per_arch_and_round_trip() -> None:
    cfg = ModelConfig(arch="segresnet", in_channels=4, out_channels=3)
    assert (cfg.depth, cfg.features, cfg.upsample) == (3, 8, "bilinear")
    assert cfg.blocks_down == (1, 2, 2, 4)
    assert cfg.backbone is None and cfg.growth_rate is None
    again = ModelConfig.model_validate(cfg.model_dump())
    assert again == cfg
    assert ModelConfig.model_validate_json(cfg.model_dump_json()) == cfg
    deeper = ModelConfig(arch="segresnet", in_channels=1, out_channels=2, depth=4)
    assert deeper.blocks_down == (1, 2, 2, 2, 4)


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        ModelConfig(arch="unet", in_channels=1, out_channels=2, colour="red")
    with pytest.raises(ValidationError, match="does not apply to arch 'unet'"):
        ModelConfig(arch="unet", in_channels=1, out_channels=2, backbone="resnet18")
    with pytest.raises(ValidationError, match="fixed depth"):
        ModelConfig(arch="basic_unet", in_channels=1, out_channels=2, depth=3)
    with pytest.raises(ValidationError, match="norm 'instance' is not available"):
        ModelConfig(arch="attention_unet", in_channels=1, out_channels=2, norm="instance")
    with pytest.raises(ValidationError, match="blocks_down"):
        ModelConfig(arch="segresnet", in_channels=1, out_channels=2, blocks_down=(1, 2))
    with pytest.raises(ValidationError):
        ModelConfig(arch="resnet", in_channels=1, out_channels=2)
    cfg = ModelConfig(arch="unet", in_channels=1, out_channels=2)
    with pytest.raises(ValidationError):
        cfg.depth = 3  # type: ignore[misc]  # frozen


def test_build_model_validates_mappings_with_one_line() -> None:
    model = build_model({"arch": "fcn32s", "in_channels": 1, "out_channels": 2, "features": 2})
    assert isinstance(model, nn.Module)
    with pytest.raises(ConfigError, match="model config: 'in_channels' = 0 is invalid"):
        build_model({"arch": "unet", "in_channels": 0, "out_channels": 2})
    with pytest.raises(ConfigError, match="cannot build arch 'fcn8s'"):
        build_model(ModelConfig(arch="fcn8s", in_channels=1, out_channels=2, features=4,
                                norm="group", num_groups=3))


def test_size_multiple_and_tile_independence() -> None:
    assert size_multiple(small("unet")) == 16
    assert size_multiple(small("segresnet")) == 8
    assert size_multiple(small("fc_densenet56")) == 32
    assert size_multiple(small("flexible_unet")) == 32
    assert tile_independent(small("unet"))
    assert tile_independent(small("unet", norm="none"))
    assert not tile_independent(small("unet", norm="instance"))
    assert not tile_independent(small("fcn8s", norm="group", num_groups=2))


# ---------------------------------------------------------------- receptive field


def test_receptive_field_of_three_3x3_convs_is_3() -> None:
    net = nn.Sequential(*[nn.Conv2d(2, 2, 3, padding=1) for _ in range(3)])
    assert receptive_field(net, in_channels=2, size=32) == 3
    dilated = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(1, 1, 5, padding=4, dilation=2))
    assert receptive_field(dilated, in_channels=1, size=32) == 1 + 4


def test_receptive_field_doubles_the_input_until_it_fits() -> None:
    net = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1) for _ in range(20)])
    assert receptive_field(net, in_channels=1, size=16) == 20
    with pytest.raises(ConfigError, match="larger max_size"):
        receptive_field(net, in_channels=1, size=16, max_size=32)


def test_receptive_field_sees_through_pooling_and_relu() -> None:
    # output pixels 2j, 2j+1 <- pooled j-1..j+1 <- inputs 2j-2..2j+3 <- conv: 2j-3..2j+4
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(2, 1, 3, padding=1), nn.Upsample(scale_factor=2))
    assert receptive_field(net, in_channels=1, size=32, block=2) == 3


def test_unet_halo_grows_with_depth() -> None:
    halos = [halo(ModelConfig(arch="unet", in_channels=1, out_channels=2, depth=d,
                              num_res_units=0)) for d in (1, 2, 3)]
    assert halos[0] < halos[1] < halos[2]


def _full_support_radius(model: nn.Module, size: int, block: int) -> int:
    """Brute force: the 2-D gradient support of a central block on a square input."""
    from segflow.train.models import _structural_copy

    net = _structural_copy(model)
    x = torch.randn(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    c0 = (size - block) // 2 // block * block
    net(x)[..., c0 : c0 + block, c0 : c0 + block].sum().backward()
    assert x.grad is not None
    nz = torch.nonzero(x.grad[0, 0].abs() > 0)
    lo, hi = int(nz.min()), int(nz.max())
    assert lo > 0 and hi < size - 1
    return max(c0 - lo, hi - (c0 + block - 1))


@pytest.mark.parametrize("arch", ["unet", "attention_unet", "fcn16s"])
def test_strip_measurement_equals_full_2d_support(arch: str) -> None:
    cfg = ModelConfig(arch=arch, in_channels=1, out_channels=1, features=2,
                      depth=3 if arch == "fcn16s" else 2)
    torch.manual_seed(6)
    model = build_model(cfg)
    m = size_multiple(cfg)
    assert receptive_field(model, in_channels=1, block=m, size=128) == _full_support_radius(
        model, 192, m)


def test_crop_tiling_with_the_halo_equals_whole_image_inference() -> None:
    """BatchNorm in eval mode: a tile predicted from its halo'd window is exact."""
    torch.manual_seed(7)
    cfg = ModelConfig(arch="unet", in_channels=1, out_channels=2, features=4, depth=2,
                      num_res_units=1)
    model = build_model(cfg)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    model.eval()
    m = size_multiple(cfg)
    h = math.ceil(halo(cfg) / m) * m  # keep the window on the down-sampling grid
    tile = 16
    image = torch.randn(1, 1, tile + 2 * h + 2 * m, tile + 2 * h + 2 * m)
    r0 = h + m
    with torch.no_grad():
        whole = model(image)
        window = image[..., r0 - h : r0 + tile + h, r0 - h : r0 + tile + h]
        part = model(window)[..., h : h + tile, h : h + tile]
    torch.testing.assert_close(part, whole[..., r0 : r0 + tile, r0 : r0 + tile])
    # a halo one grid step short is not enough
    short = h - m
    with torch.no_grad():
        window = image[..., r0 - short : r0 + tile + short, r0 - short : r0 + tile + short]
        part = model(window)[..., short : short + tile, short : short + tile]
    assert not torch.allclose(part, whole[..., r0 : r0 + tile, r0 : r0 + tile])


def test_halo_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(8)
    expected = torch.rand(3)
    torch.manual_seed(8)
    halo(ModelConfig(arch="fcn32s", in_channels=1, out_channels=2, depth=2))
    torch.testing.assert_close(torch.rand(3), expected)


def test_receptive_field_does_not_modify_the_model() -> None:
    model = build_model(small("segnet", depth=2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    receptive_field(model, in_channels=3, block=4, size=64, trials=2)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
