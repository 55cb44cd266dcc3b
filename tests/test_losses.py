"""Every loss against a plain numpy reference on tiny arrays; ignore_index and masks."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from segflow.errors import ConfigError, LabelError
from segflow.train.losses import (
    LossConfig,
    LossName,
    build_loss,
    needs_pixel_weights,
    signed_distance_maps,
)

NAMES: tuple[str, ...] = typing.get_args(LossName)
K = 3


def _cfg(name: str, **kw: typing.Any) -> LossConfig:
    if name == "weighted_ce" and "class_weights" not in kw:
        kw["class_weights"] = (0.5, 2.0, 1.0)
    return LossConfig(name=name, **kw)


@pytest.fixture
def batch(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(2, 3, 3, 4) float64 logits, targets with every class in every sample, weights."""
    logits = torch.from_numpy(rng.normal(size=(2, K, 3, 4)) * 2)
    target = torch.from_numpy(rng.integers(0, K, size=(2, 3, 4)))
    target[:, 0, :3] = torch.arange(K)
    weights = torch.from_numpy(rng.uniform(0.5, 3.0, size=(2, 3, 4)))
    return logits, target, weights


# ------------------------------------------------------------- numpy references


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def np_onehot(t: np.ndarray, k: int) -> np.ndarray:
    return (t[:, None] == np.arange(k)[None, :, None, None]).astype(float)


def np_ce_pixels(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    return -(np_log_softmax(logits) * np_onehot(target, logits.shape[1])).sum(axis=1)


def np_tversky(p: np.ndarray, g: np.ndarray, alpha: float, beta: float, smooth: float,
               batch: bool = False) -> float:
    axes = (0, 2, 3) if batch else (2, 3)
    tp = (p * g).sum(axis=axes)
    fp = (p * (1 - g)).sum(axis=axes)
    fn = ((1 - p) * g).sum(axis=axes)
    return float(np.mean(1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)))


def np_dice(p: np.ndarray, g: np.ndarray, smooth: float, batch: bool = False) -> float:
    axes = (0, 2, 3) if batch else (2, 3)
    inter = (p * g).sum(axis=axes)
    return float(np.mean(1 - (2 * inter + smooth) / (p.sum(axis=axes) + g.sum(axis=axes)
                                                     + smooth)))


def np_iou(p: np.ndarray, g: np.ndarray, smooth: float) -> float:
    # MONAI's jaccard: (2 I + s) / (2 U + s), U = sum p + sum g - I
    inter = (p * g).sum(axis=(2, 3))
    union = p.sum(axis=(2, 3)) + g.sum(axis=(2, 3)) - inter
    return float(np.mean(1 - (2 * inter + smooth) / (2 * union + smooth)))


def np_softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(x))


def np_sdm(mask: np.ndarray) -> np.ndarray:
    """Brute-force signed distance map of one 2-D mask (Kervadec's convention)."""
    pos = mask.astype(bool)
    if not pos.any() or pos.all():
        return np.zeros(mask.shape)
    coords = np.stack(np.meshgrid(*map(np.arange, mask.shape), indexing="ij"), -1).reshape(-1, 2)
    d = np.sqrt(((coords[:, None] - coords[None]) ** 2).sum(-1))
    flat = pos.reshape(-1)
    to_pos = d[:, flat].min(axis=1)
    to_neg = d[:, ~flat].min(axis=1)
    out = np.where(flat, -(to_neg - 1), to_pos)
    return out.reshape(mask.shape)


# ------------------------------------------------------------- values


def test_ce_matches_numpy(batch: tuple) -> None:
    logits, target, _ = batch
    got = build_loss(LossConfig(name="ce"))(logits, target)
    ref = np_ce_pixels(logits.numpy(), target.numpy()).mean()
    assert float(got) == pytest.approx(ref, rel=1e-12)


def test_weighted_ce_matches_numpy(batch: tuple) -> None:
    logits, target, _ = batch
    w = np.array([0.5, 2.0, 1.0])
    got = build_loss(_cfg("weighted_ce", class_weights=tuple(w)))(logits, target)
    wt = w[target.numpy()]
    ref = (wt * np_ce_pixels(logits.numpy(), target.numpy())).sum() / wt.sum()
    assert float(got) == pytest.approx(ref, rel=1e-12)
    torch_ref = torch.nn.functional.cross_entropy(logits, target, weight=torch.from_numpy(w))
    assert float(got) == pytest.approx(float(torch_ref), rel=1e-12)


def test_pixel_weighted_ce(batch: tuple) -> None:
    logits, target, weights = batch
    loss = build_loss(LossConfig(name="pixel_weighted_ce"))
    ce = build_loss(LossConfig(name="ce"))(logits, target)
    ones = torch.ones_like(weights)
    assert float(loss(logits, target, ones)) == pytest.approx(float(ce), rel=1e-12)
    w = weights.numpy()
    ref = (w * np_ce_pixels(logits.numpy(), target.numpy())).sum() / w.sum()
    assert float(loss(logits, target, weights)) == pytest.approx(ref, rel=1e-12)
    # ignored pixels leave the denominator too
    t2 = target.clone()
    t2[0, 1, 1] = 255
    keep = t2.numpy() != 255
    ref2 = ((w * np_ce_pixels(logits.numpy(), target.numpy()))[keep].sum() / w[keep].sum())
    assert float(loss(logits, t2, weights)) == pytest.approx(ref2, rel=1e-12)


def test_focal_with_gamma_0_is_ce(batch: tuple) -> None:
    logits, target, _ = batch
    ce = build_loss(LossConfig(name="ce"))(logits, target)
    focal = build_loss(LossConfig(name="focal", gamma=0.0))(logits, target)
    # MONAI's FocalLoss computes in float32
    assert float(focal) == pytest.approx(float(ce), rel=1e-6)
    w = (0.5, 2.0, 1.0)
    wce = build_loss(_cfg("weighted_ce", class_weights=w))(logits, target)
    wfocal = build_loss(LossConfig(name="focal", gamma=0.0, class_weights=w))(logits, target)
    assert float(wfocal) == pytest.approx(float(wce), rel=1e-6)


def test_focal_matches_numpy(batch: tuple) -> None:
    logits, target, _ = batch
    gamma = 2.0
    logp = np_log_softmax(logits.numpy())
    g = np_onehot(target.numpy(), K)
    pt = (np.exp(logp) * g).sum(axis=1)
    ref = (-((1 - pt) ** gamma) * (logp * g).sum(axis=1)).mean()
    got = build_loss(LossConfig(name="focal", gamma=gamma))(logits, target)
    assert float(got) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("smooth", [0.0, 1e-5, 1.0])
def test_dice_iou_tversky_match_numpy(batch: tuple, smooth: float) -> None:
    logits, target, _ = batch
    p = np_softmax(logits.numpy())
    g = np_onehot(target.numpy(), K)
    dice = build_loss(LossConfig(name="dice", smooth=smooth))(logits, target)
    assert float(dice) == pytest.approx(np_dice(p, g, smooth), rel=1e-10)
    iou = build_loss(LossConfig(name="iou", smooth=smooth))(logits, target)
    assert float(iou) == pytest.approx(np_iou(p, g, smooth), rel=1e-10)
    tv = build_loss(LossConfig(name="tversky", alpha=0.3, beta=0.7, smooth=smooth))(logits, target)
    assert float(tv) == pytest.approx(np_tversky(p, g, 0.3, 0.7, smooth), rel=1e-10)
    bd = build_loss(LossConfig(name="dice", smooth=smooth, batch_dice=True))(logits, target)
    assert float(bd) == pytest.approx(np_dice(p, g, smooth, batch=True), rel=1e-10)
    bt = build_loss(LossConfig(name="tversky", alpha=0.2, beta=0.8, smooth=smooth,
                               batch_dice=True))(logits, target)
    assert float(bt) == pytest.approx(np_tversky(p, g, 0.2, 0.8, smooth, batch=True), rel=1e-10)


def test_dice_without_background(batch: tuple) -> None:
    logits, target, _ = batch
    p = np_softmax(logits.numpy())[:, 1:]
    g = np_onehot(target.numpy(), K)[:, 1:]
    got = build_loss(LossConfig(name="dice", include_background=False))(logits, target)
    assert float(got) == pytest.approx(np_dice(p, g, 1e-5), rel=1e-10)


def test_tversky_half_half_is_dice(batch: tuple) -> None:
    logits, target, _ = batch
    dice = build_loss(LossConfig(name="dice", smooth=0.0))(logits, target)
    tv = build_loss(LossConfig(name="tversky", alpha=0.5, beta=0.5, smooth=0.0))(logits, target)
    assert float(tv) == pytest.approx(float(dice), rel=1e-12)


def test_compound_losses(batch: tuple) -> None:
    logits, target, _ = batch
    dice = float(build_loss(LossConfig(name="dice"))(logits, target))
    ce = float(build_loss(LossConfig(name="ce"))(logits, target))
    focal = float(build_loss(LossConfig(name="focal", gamma=1.5))(logits, target))
    dice_ce = build_loss(LossConfig(name="dice_ce", lambdas=(0.3, 2.0)))(logits, target)
    assert float(dice_ce) == pytest.approx(0.3 * dice + 2.0 * ce, rel=1e-12)
    got = build_loss(LossConfig(name="dice_focal", gamma=1.5, lambdas=(1.0, 0.5)))(logits, target)
    assert float(got) == pytest.approx(dice + 0.5 * focal, rel=1e-7)
    # MONAI's own DiceCELoss agrees where there is nothing to ignore
    from monai.losses import DiceCELoss

    monai_loss = DiceCELoss(softmax=True, to_onehot_y=True, lambda_dice=0.3, lambda_ce=2.0)
    assert float(dice_ce) == pytest.approx(float(monai_loss(logits, target[:, None])), rel=1e-10)


def test_signed_distance_maps_match_brute_force(rng: np.random.Generator) -> None:
    masks = (rng.uniform(size=(2, 3, 7, 9)) < 0.3).astype(np.uint8)
    masks[1, 2] = 0  # empty class
    masks[0, 1, 2:5, 3:7] = 1
    got = signed_distance_maps(masks)
    for n in range(2):
        for k in range(3):
            np.testing.assert_allclose(got[n, k], np_sdm(masks[n, k]), atol=1e-6)


def test_boundary_matches_numpy(batch: tuple) -> None:
    logits, target, _ = batch
    p = np_softmax(logits.numpy())
    g = np_onehot(target.numpy(), K)
    phi = np.stack([np.stack([np_sdm(g[n, k]) for k in range(K)]) for n in range(2)])
    term = float((p * phi).mean())
    got = build_loss(LossConfig(name="boundary", lambdas=(0.0, 1.0)))(logits, target)
    assert float(got) == pytest.approx(term, rel=1e-6)
    fg = build_loss(LossConfig(name="boundary", lambdas=(0.0, 1.0), include_background=False))
    assert float(fg(logits, target)) == pytest.approx(float((p * phi)[:, 1:].mean()), rel=1e-6)
    both = build_loss(LossConfig(name="boundary", lambdas=(0.5, 2.0)))(logits, target)
    assert float(both) == pytest.approx(0.5 * np_dice(p, g, 1e-5) + 2.0 * term, rel=1e-6)


def test_boundary_distances_ignore_the_random_mask(batch: tuple) -> None:
    """The mask hides pixels from the sum; it does not move class boundaries."""
    logits, target, _ = batch
    mask = torch.ones(target.shape, dtype=torch.bool)
    mask[:, :, :2] = False
    p = np_softmax(logits.numpy())
    g = np_onehot(target.numpy(), K)
    phi = np.stack([np.stack([np_sdm(g[n, k]) for k in range(K)]) for n in range(2)])
    m = mask.numpy()[:, None]
    ref = float((p * phi * m).sum() / (m.sum() * K))
    got = build_loss(LossConfig(name="boundary", lambdas=(0.0, 1.0)))(logits, target, mask=mask)
    assert float(got) == pytest.approx(ref, rel=1e-6)


# ------------------------------------------------------------- ignore_index, masks


@pytest.mark.parametrize("name", NAMES)
def test_ignored_pixels_change_nothing(batch: tuple, name: str) -> None:
    logits, target, weights = batch
    loss = build_loss(_cfg(name))
    t = target.clone()
    t[0, 2, 1:3] = 255
    t[1, 1, 0] = 255
    before = loss(logits, t, weights)
    changed = logits.clone()
    changed[0][:, t[0] == 255] = torch.tensor([50.0, -20.0, 3.0], dtype=logits.dtype)[:, None]
    changed[1][:, t[1] == 255] = -7.0
    w2 = weights.clone()
    w2[t == 255] = 1000.0
    after = loss(changed, t, w2)
    assert float(after) == pytest.approx(float(before), rel=1e-9)
    x = logits.clone().requires_grad_(True)
    loss(x, t, weights).backward()
    assert x.grad is not None
    assert float(x.grad.permute(0, 2, 3, 1)[t == 255].abs().max()) == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_masked_pixels_change_nothing(batch: tuple, name: str) -> None:
    logits, target, weights = batch
    loss = build_loss(_cfg(name))
    mask = torch.ones(target.shape, dtype=torch.bool)
    mask[:, 0, 3] = False
    mask[1, 2, :] = False
    before = loss(logits, target, weights, mask=mask)
    changed = logits.clone()
    changed.permute(0, 2, 3, 1)[~mask] = torch.tensor([9.0, -9.0, 0.0], dtype=logits.dtype)
    after = loss(changed, target, weights, mask=mask)
    assert float(after) == pytest.approx(float(before), rel=1e-9)
    full = loss(logits, target, weights)
    assert float(full) != pytest.approx(float(before), rel=1e-6)


def test_masked_ce_is_ce_over_the_kept_pixels(batch: tuple) -> None:
    logits, target, _ = batch
    mask = torch.zeros(target.shape, dtype=torch.bool)
    mask[:, 1:, 1:] = True
    got = build_loss(LossConfig(name="ce"))(logits, target, mask=mask)
    ref = np_ce_pixels(logits.numpy(), target.numpy())[mask.numpy()].mean()
    assert float(got) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_all_ignored_gives_zero_and_a_finite_gradient(batch: tuple, name: str) -> None:
    logits, target, weights = batch
    x = logits.clone().requires_grad_(True)
    out = build_loss(_cfg(name))(x, torch.full_like(target, 255), weights)
    out.backward()
    assert float(out.detach()) == 0.0
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_loss_trains(name: str) -> None:
    """float32, a gradient step lowers the loss on a fixed batch."""
    torch.manual_seed(0)
    logits = torch.randn(2, K, 8, 8, requires_grad=True)
    target = torch.randint(0, K, (2, 8, 8))
    weights = torch.rand(2, 8, 8) + 0.5
    loss = build_loss(_cfg(name, lambdas=(1.0, 0.1)) if name == "boundary" else _cfg(name))
    opt = torch.optim.SGD([logits], lr=1.0)
    first = loss(logits, target, weights)
    first.backward()
    opt.step()
    with torch.no_grad():
        assert float(loss(logits, target, weights)) < float(first.detach())


def test_ignore_index_none_counts_every_pixel(batch: tuple) -> None:
    logits, target, _ = batch
    a = build_loss(LossConfig(name="ce", ignore_index=None))(logits, target)
    b = build_loss(LossConfig(name="ce"))(logits, target)
    assert float(a) == float(b)
    with pytest.raises(LabelError, match="255"):
        build_loss(LossConfig(name="ce", ignore_index=None))(logits, torch.full_like(target, 255))


# ------------------------------------------------------------- multi-label


def test_multilabel_bce_and_dice_match_numpy(rng: np.random.Generator) -> None:
    logits = torch.from_numpy(rng.normal(size=(2, 2, 3, 3)))
    target = torch.from_numpy(rng.integers(0, 2, size=(2, 2, 3, 3)))
    target[0, 1, 0, 0] = 255
    x = logits.numpy()
    t = target.numpy().astype(float)
    keep = target.numpy() != 255
    p = 1 / (1 + np.exp(-x))
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    got = build_loss(LossConfig(name="ce", multilabel=True))(logits, target)
    assert float(got) == pytest.approx(bce[keep].mean(), rel=1e-10)
    w = (2.0, 0.5)
    got = build_loss(LossConfig(name="weighted_ce", class_weights=w, multilabel=True))(
        logits, target)
    wa = np.broadcast_to(np.array(w)[None, :, None, None], bce.shape)
    assert float(got) == pytest.approx((wa * bce)[keep].sum() / wa[keep].sum(), rel=1e-10)
    got = build_loss(LossConfig(name="dice", multilabel=True))(logits, target)
    assert float(got) == pytest.approx(np_dice(p * keep, t * keep, 1e-5), rel=1e-10)
    focal0 = build_loss(LossConfig(name="focal", gamma=0.0, multilabel=True))(logits, target)
    assert float(focal0) == pytest.approx(bce[keep].mean(), rel=1e-6)


def test_multilabel_rejects_non_binary_targets() -> None:
    loss = build_loss(LossConfig(name="dice", multilabel=True))
    with pytest.raises(LabelError, match="0 or 1"):
        loss(torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2, 2), 2))


# ------------------------------------------------------------- config and errors


def test_needs_pixel_weights() -> None:
    assert needs_pixel_weights(LossConfig(name="pixel_weighted_ce"))
    assert not any(needs_pixel_weights(_cfg(n)) for n in NAMES if n != "pixel_weighted_ce")


def test_config_rules() -> None:
    with pytest.raises(ValidationError, match="weighted_ce needs class_weights"):
        LossConfig(name="weighted_ce")
    with pytest.raises(ValidationError, match="do not apply to loss 'dice'"):
        LossConfig(name="dice", class_weights=(1.0, 2.0))
    with pytest.raises(ValidationError, match="extra"):
        LossConfig(name="ce", weight=3)
    with pytest.raises(ConfigError, match="loss config: 'name' = 'l2'"):
        build_loss({"name": "l2"})
    assert isinstance(build_loss({"name": "focal", "gamma": 1}), torch.nn.Module)


def test_bad_inputs_fail_with_one_clear_line(batch: tuple) -> None:
    logits, target, _ = batch
    ce = build_loss(LossConfig(name="ce"))
    with pytest.raises(ConfigError, match=r"target must have shape \(2, 3, 4\)"):
        ce(logits, target[:, :2])
    with pytest.raises(ConfigError, match="logits must be"):
        ce(logits[0], target)
    with pytest.raises(ConfigError, match="mask must have shape"):
        ce(logits, target, mask=torch.ones(2, 3, dtype=torch.bool))
    bad = target.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(LabelError, match=r"target value 7 is not a class id 0..2"):
        ce(logits, bad)
    with pytest.raises(ConfigError, match="needs pixel_weights"):
        build_loss(LossConfig(name="pixel_weighted_ce"))(logits, target)
    with pytest.raises(ConfigError, match="pixel_weights must have shape"):
        build_loss(LossConfig(name="pixel_weighted_ce"))(logits, target, torch.ones(2, 3))
    with pytest.raises(ConfigError, match="class_weights has 2 entries for 3 classes"):
        build_loss(LossConfig(name="weighted_ce", class_weights=(1.0, 2.0)))(logits, target)


def test_loss_module_moves_with_to() -> None:
    loss = build_loss(_cfg("weighted_ce")).to(torch.float64)
    assert loss.class_weights is not None and loss.class_weights.dtype == torch.float64
    assert "class_weights" not in loss.state_dict()  # not a learnable or saved state
