"""Training data: patch reading with mirror padding, sampling, augmentation, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_scene

from segflow.config import ClassDef
from segflow.config.train import (
    AugmentConfig,
    ElasticConfig,
    SamplingConfig,
    SplitConfig,
    make_train_config,
)
from segflow.errors import ConfigError, LabelError, StoreError
from segflow.fingerprint import Fingerprint
from segflow.geometry import Window
from segflow.io.store import SceneStore
from segflow.tiling import mirror_indices
from segflow.train.augment import (
    adjust_intensity,
    augment_patch,
    elastic_displacement,
    flip_rot90,
    warp,
)
from segflow.train.data import (
    Normalization,
    PatchDataset,
    PatchSampler,
    StepBatchSampler,
    check_store,
    eligible_mask,
    read_window,
    scan_scenes,
)
from segflow.weights import weight_map

CLASSES = (ClassDef(id=0, name="membrane"), ClassDef(id=1, name="cell"))


def make_store(
    path: Path,
    image: np.ndarray,
    labels: np.ndarray,
    *,
    chunk: int = 32,
    valid: np.ndarray | None = None,
    weights: bool = True,
    classes: tuple[ClassDef, ...] = CLASSES,
) -> Path:
    """A complete scene store from in-memory arrays (image (C, H, W) uint8)."""
    c, h, w = image.shape
    s = write_scene(path, image, labels=labels, valid=valid, chunk=chunk, classes=classes)
    assert isinstance(s, SceneStore)
    if weights:
        inst = (labels == 1).astype(np.uint32)  # one "object" id is enough for a test map
        wm = weight_map(inst, labels, valid, ignore_index=s.ignore_index)
        s.create_array("weights", dtype="float32", fill_value=0)
        s.array("weights")[...] = wm
        s.record_array("weights")
    x = image.reshape(c, -1).astype(np.float64)
    fp = Fingerprint(
        bands=tuple(f"b{i}" for i in range(c)),
        dtype=str(image.dtype),
        mean=tuple(x.mean(1)),
        std=tuple(x.std(1)),
        min=tuple(x.min(1)),
        max=tuple(x.max(1)),
        p0_5=tuple(x.min(1)),
        p99_5=tuple(x.max(1)),
        train_pixels=h * w,
    )
    s.update_meta(fingerprint=fp.to_dict())
    return path


def isbi_crop(samples: Path, i: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    img = np.asarray(Image.open(samples / f"isbi2012/train/images/{i}.png"))[:size, :size]
    lab = np.asarray(Image.open(samples / f"isbi2012/train/labels/{i}.png"))[:size, :size]
    return img[None].astype(np.uint8), (lab > 127).astype(np.uint8)


@pytest.fixture
def store(tmp_path: Path, rng: np.random.Generator) -> Path:
    img = rng.integers(0, 255, (2, 50, 70), dtype=np.uint8)
    lab = (rng.random((50, 70)) < 0.2).astype(np.uint8)
    lab[:5, :5] = 255
    return make_store(tmp_path / "s.zarr", img, lab, chunk=16)


# ----------------------------------------------------------------------------- reading
def test_mirror_indices_match_numpy() -> None:
    for n in (1, 2, 5):
        a = np.arange(n)
        padded = np.pad(a, 13, mode="reflect") if n > 1 else np.zeros(n + 26, int)
        assert mirror_indices(np.arange(-13, n + 13), n).tolist() == padded.tolist()


@pytest.mark.parametrize(
    "win",
    [Window(-7, -9, 30, 30), Window(40, 60, 30, 25), Window(3, 4, 10, 10), Window(-20, 30, 60, 12)],
)
def test_read_window_equals_numpy_reflect(store: Path, win: Window) -> None:
    s = SceneStore.open(store)
    full = np.asarray(s.array("image")[...])
    pad = 40
    ref = np.pad(full, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    want = ref[:, win.row_off + pad : win.row_stop + pad, win.col_off + pad : win.col_stop + pad]
    got = read_window(s.array("image"), win, height=s.height, width=s.width)
    np.testing.assert_array_equal(got, want)


def test_patches_equal_store_pixels(store: Path) -> None:
    s = SceneStore.open(store)
    scenes = scan_scenes([store], n_classes=2)
    sampler = PatchSampler(tuple(scenes), SamplingConfig(), seed=3)
    norm = Normalization((10.0, 20.0), (2.0, 4.0))
    ds = PatchDataset(sampler, patch=24, epoch_len=8, normalization=norm, with_weights=True)
    img = np.asarray(s.array("image")[...]).astype(np.float32)
    lab = np.asarray(s.array("labels")[...])
    wts = np.asarray(s.array("weights")[...])
    p = 30
    rimg = np.pad(img, ((0, 0), (p, p), (p, p)), mode="reflect")
    rlab, rw = np.pad(lab, p, mode="reflect"), np.pad(wts, p, mode="reflect")
    for g in range(8):
        _si, r, c = sampler.centre(0, g)
        item = ds[g]
        sl = (slice(r - 12 + p, r + 12 + p), slice(c - 12 + p, c + 12 + p))
        want_img = (
            rimg[(slice(None), *sl)] - np.array([10, 20], np.float32)[:, None, None]
        ) / np.array([2, 4], np.float32)[:, None, None]
        np.testing.assert_allclose(item["image"].numpy(), want_img, rtol=1e-6)
        np.testing.assert_array_equal(item["labels"].numpy(), rlab[sl].astype(np.int64))
        np.testing.assert_array_equal(item["mask"].numpy(), rlab[sl] != 255)
        np.testing.assert_array_equal(item["weights"].numpy(), rw[sl])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # make_store's fingerprint
def test_invalid_and_non_finite_pixels_reach_the_model_as_the_mean(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """Masked pixels and NaN/inf pixels (even ones the store's mask misses) are input 0
    (the normalization mean, as at inference) and never in the loss; the rest is unchanged."""
    img = rng.normal(100, 20, (2, 40, 40)).astype(np.float32)
    img[0, 5:15, 5:15] = np.nan  # NaN in one band makes the whole pixel nodata
    img[1, 30:35, 20:30] = np.inf
    valid = np.ones((40, 40), bool)
    valid[20:25, :] = False  # a finite value under the mask
    lab = (rng.random((40, 40)) < 0.5).astype(np.uint8)
    path = make_store(tmp_path / "nan.zarr", img, lab, chunk=20, valid=valid, weights=False)
    bad = ~valid | ~np.isfinite(img).all(0)
    norm = Normalization((100.0, 90.0), (20.0, 10.0))
    want = (img - np.array([100, 90], np.float32)[:, None, None]) / np.array(
        [20, 10], np.float32
    )[:, None, None]
    want = np.where(bad, np.float32(0), want)
    scenes = tuple(scan_scenes([path], n_classes=2))
    sampler = PatchSampler(scenes, SamplingConfig(), seed=0)
    ds = PatchDataset(sampler, patch=16, epoch_len=40, normalization=norm)
    seen_bad = 0
    for g in range(40):
        _si, r, c = sampler.centre(0, g)
        item = ds[g]
        x = item["image"].numpy()
        assert np.isfinite(x).all()
        if r - 8 >= 0 and c - 8 >= 0 and r + 8 <= 40 and c + 8 <= 40:  # no mirroring
            sl = (slice(r - 8, r + 8), slice(c - 8, c + 8))
            np.testing.assert_allclose(x, want[(slice(None), *sl)], rtol=1e-6)
            assert not item["mask"].numpy()[bad[sl]].any()
            seen_bad += int(bad[sl].sum())
    assert seen_bad > 0  # the patches did cover nodata pixels


@pytest.mark.parametrize("margin", [1, 5])
def test_loss_margin_ignores_the_patch_border(store: Path, margin: int) -> None:
    scenes = tuple(scan_scenes([store], n_classes=2))
    sampler = PatchSampler(scenes, SamplingConfig(), seed=3)
    kw = {"patch": 24, "epoch_len": 8, "normalization": Normalization.identity(2)}
    full = PatchDataset(sampler, **kw, with_weights=True)
    cut = PatchDataset(sampler, **kw, with_weights=True, loss_margin=margin)
    ring = np.ones((24, 24), bool)
    ring[margin:-margin, margin:-margin] = False
    for g in range(8):
        a, b = full[g], cut[g]
        np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())
        np.testing.assert_array_equal(a["weights"].numpy(), b["weights"].numpy())
        want = np.where(ring, 255, a["labels"].numpy())
        np.testing.assert_array_equal(b["labels"].numpy(), want)
        np.testing.assert_array_equal(b["mask"].numpy(), a["mask"].numpy() & ~ring)


def test_sampling_is_deterministic(store: Path) -> None:
    scenes = tuple(scan_scenes([store], n_classes=2))
    a = PatchSampler(scenes, SamplingConfig(), seed=1)
    b = PatchSampler(scenes, SamplingConfig(), seed=1)
    c = PatchSampler(scenes, SamplingConfig(), seed=2)
    ca = [a.centre(e, k) for e in range(2) for k in range(10)]
    # any order of evaluation gives the same centres: a pure function of (seed, e, k)
    cb = [b.centre(e, k) for e in reversed(range(2)) for k in reversed(range(10))][::-1]
    assert ca == cb
    assert ca != [c.centre(e, k) for e in range(2) for k in range(10)]
    ds = PatchDataset(
        a,
        patch=16,
        epoch_len=5,
        normalization=Normalization.identity(2),
        augment=AugmentConfig(elastic=ElasticConfig(p=1.0)),
    )
    np.testing.assert_array_equal(ds[7]["image"].numpy(), ds[7]["image"].numpy())


def test_class_balanced_frequencies(tmp_path: Path, rng: np.random.Generator) -> None:
    lab = np.zeros((64, 64), np.uint8)
    lab[rng.random((64, 64)) < 0.05] = 1  # 5 % foreground
    img = rng.integers(0, 255, (1, 64, 64), dtype=np.uint8)
    path = make_store(tmp_path / "cb.zarr", img, lab, chunk=16, weights=False)
    scenes = tuple(scan_scenes([path], n_classes=2))
    n = 800
    for probs, want in (({0: 0.5, 1: 0.5}, 0.5), ({0: 0.2, 1: 0.8}, 0.8)):
        sampler = PatchSampler(scenes, SamplingConfig(mode="class_balanced", class_probs=probs))
        hits = sum(int(lab[r, c] == 1) for _, r, c in (sampler.centre(0, k) for k in range(n)))
        # binomial: 5 standard deviations
        assert abs(hits / n - want) < 5 * np.sqrt(want * (1 - want) / n)
    rand = PatchSampler(scenes, SamplingConfig())
    hits = sum(int(lab[r, c] == 1) for _, r, c in (rand.centre(0, k) for k in range(n)))
    f = lab.mean()
    assert abs(hits / n - f) < 5 * np.sqrt(f * (1 - f) / n)


def test_split_keeps_margin_from_val_blocks(tmp_path: Path, rng: np.random.Generator) -> None:
    img = rng.integers(0, 255, (1, 96, 96), dtype=np.uint8)
    lab = rng.integers(0, 2, (96, 96), dtype=np.uint8)
    path = make_store(tmp_path / "sp.zarr", img, lab, chunk=32, weights=False)
    split = SplitConfig(block=32, val_every=3)
    scenes = tuple(scan_scenes([path], n_classes=2, split=split, margin=8))
    sampler = PatchSampler(scenes, SamplingConfig())
    # held-out blocks: k % 3 == 2 over a 3 x 3 grid of blocks
    held = np.zeros((96, 96), bool)
    for k in range(9):
        if k % 3 == 2:
            r, c = divmod(k, 3)
            held[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] = True
    for k in range(300):
        _, r, c = sampler.centre(0, k)
        assert not held[max(0, r - 8) : r + 9, max(0, c - 8) : c + 9].any()
    from segflow.config import TrainRegion

    m = eligible_mask(
        TrainRegion(block=32, holdout_every=3), Window(0, 0, 96, 96), image_shape=(96, 96), margin=8
    )
    assert not (m & held).any() and m.any()


def test_step_batch_sampler_shards_the_global_batch() -> None:
    one = list(StepBatchSampler(start=2, stop=4, batch_size=4))
    r0 = list(StepBatchSampler(start=2, stop=4, batch_size=4, rank=0, world_size=2))
    r1 = list(StepBatchSampler(start=2, stop=4, batch_size=4, rank=1, world_size=2))
    assert one == [[8, 9, 10, 11], [12, 13, 14, 15]]
    assert [a + b for a, b in zip(r0, r1, strict=True)] == one
    with pytest.raises(ConfigError, match="divisible"):
        StepBatchSampler(start=0, stop=1, batch_size=3, world_size=2)


# ----------------------------------------------------------------------------- augmentation
def test_flip_rot90_matches_numpy(rng: np.random.Generator) -> None:
    img = rng.random((2, 6, 6)).astype(np.float32)
    lab = rng.integers(0, 3, (6, 6))
    w = rng.random((6, 6)).astype(np.float32)
    for k in range(4):
        for flip in (False, True):
            i2, l2, w2 = flip_rot90(img, lab, w, k=k, flip=flip)
            f = (lambda a: np.flip(a, -1)) if flip else (lambda a: a)
            np.testing.assert_array_equal(i2, np.rot90(f(img), k, axes=(1, 2)))
            np.testing.assert_array_equal(l2, np.rot90(f(lab), k))
            assert w2 is not None
            np.testing.assert_array_equal(w2, np.rot90(f(w), k))


def test_labels_follow_image_under_augmentation(rng: np.random.Generator) -> None:
    # image band 0 == label id: any geometric transform must keep them equal (nearest)
    lab = rng.integers(0, 3, (40, 40))
    img = lab[None].astype(np.float32)
    cfg = AugmentConfig(flips=True, rot90=True, elastic=ElasticConfig(p=1.0, order=1))
    for seed in range(5):
        i2, l2, w2 = augment_patch(
            np.random.default_rng(seed), img, lab, lab.astype(np.float32), cfg
        )
        assert set(np.unique(l2)) <= set(np.unique(lab))
        assert w2 is not None
        np.testing.assert_array_equal(w2, l2.astype(np.float32))
        # where the image is an integer (not blended), it is the label
        exact = np.isclose(i2[0], np.round(i2[0]), atol=1e-4)
        assert (np.round(i2[0][exact]) == l2[exact]).mean() > 0.97


def test_elastic_identity_and_label_set(rng: np.random.Generator) -> None:
    img = rng.random((1, 30, 30)).astype(np.float32)
    lab = rng.integers(0, 4, (30, 30))
    zero = np.zeros((2, 30, 30))
    np.testing.assert_allclose(warp(img, zero, order=3), img, atol=1e-5)
    np.testing.assert_array_equal(warp(lab, zero, order=0), lab)
    d = elastic_displacement(np.random.default_rng(0), (30, 30), grid=3, sigma=10)
    assert d.shape == (2, 30, 30) and 1 < np.abs(d).max() < 80
    assert set(np.unique(warp(lab, d, order=0))) <= set(np.unique(lab))
    assert elastic_displacement(np.random.default_rng(0), (30, 30), sigma=0).max() == 0


def test_intensity() -> None:
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 4, 4)
    np.testing.assert_allclose(adjust_intensity(x), x)
    y = adjust_intensity(x, gamma=2.0)
    assert y.min() == pytest.approx(-1) and y.max() == pytest.approx(1)
    np.testing.assert_allclose(adjust_intensity(x, brightness=0.5), x + 0.5)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs(tmp_path: Path, rng: np.random.Generator) -> None:
    img = rng.integers(0, 255, (1, 32, 32), dtype=np.uint8)
    lab = rng.integers(0, 2, (32, 32), dtype=np.uint8)
    lab[0, 0] = 7
    bad = make_store(tmp_path / "bad.zarr", img, lab, chunk=16, weights=False)
    with pytest.raises(LabelError, match="outside the class table"):
        scan_scenes([bad], n_classes=2)
    s = SceneStore.open(bad)
    with pytest.raises(ConfigError, match="in_channels=3"):
        check_store(s, in_channels=3, classes=None, out_channels=2, need_weights=False)
    with pytest.raises(StoreError, match="no complete 'weights'"):
        check_store(s, in_channels=1, classes=None, out_channels=2, need_weights=True)
    other = (ClassDef(id=0, name="a"), ClassDef(id=1, name="b"), ClassDef(id=2, name="c"))
    with pytest.raises(LabelError, match=r"class ids \[0, 1\] but the config has \[0, 1, 2\]"):
        check_store(s, in_channels=1, classes=other, out_channels=3, need_weights=False)
    with pytest.raises(LabelError, match="out_channels=1"):
        check_store(s, in_channels=1, classes=None, out_channels=1, need_weights=False)


def test_config_errors() -> None:
    base = {
        "stores": {"train": ["a.zarr"]},
        "model": {"arch": "unet", "in_channels": 1, "out_channels": 2, "depth": 2},
        "steps": 5,
        "patch": 64,
    }
    assert make_train_config(base).total_steps == 5
    with pytest.raises(ConfigError, match="unknown key 'lr'"):
        make_train_config({**base, "lr": 1})
    with pytest.raises(ConfigError, match="multiple"):
        make_train_config({**base, "patch": 66})
    with pytest.raises(ConfigError, match="exactly one of steps or epochs"):
        make_train_config({**base, "epochs": 2})
    with pytest.raises(ConfigError, match="select_metric"):
        make_train_config({**base, "select_metric": "mean_iuo"})  # a typo: no best/ ever
    with pytest.raises(
        ConfigError,
        match="select_mode 'min' would keep the worst mean_iou \\(higher is better\\): use 'max'",
    ):
        make_train_config({**base, "select_metric": "mean_iou"})  # select_mode min
    assert make_train_config({**base, "select_metric": "mean_iou", "select_mode": "max"})
    with pytest.raises(
        ConfigError, match=r"early_stopping\.mode 'max' would keep the worst pixel_error"
    ):
        make_train_config({**base, "early_stopping": {"mode": "max"}})
    with pytest.raises(ConfigError, match=r"gamma must be \[low, high\] with 0 < low"):
        make_train_config({**base, "augment": {"intensity": {"gamma": [0, 1.5]}}})
    with pytest.raises(ConfigError, match="contrast must be"):
        make_train_config({**base, "augment": {"intensity": {"contrast": [1.2, 0.8]}}})
    with pytest.raises(ConfigError, match=r"betas must each be in \[0, 1\)"):
        make_train_config({**base, "optimizer": {"betas": [0.9, 1.0]}})
    cfg = make_train_config(
        {
            **base,
            "stores": {
                "train": [{"store": "s/{i}.zarr", "source": "i/{i}.png", "ids": [3, 6]}],
                "val": ["v.zarr"],
            },
        }
    )
    assert [r.store for r in cfg.stores.train] == ["s/3.zarr", "s/4.zarr", "s/5.zarr"]
    assert cfg.stores.train[1].source == "i/4.png" and cfg.stores.val[0].store == "v.zarr"
