"""Class frequencies, class weights, training regions and the fingerprint vs plain numpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from segflow.config import TrainRegion
from segflow.errors import ConfigError, RegionError
from segflow.fingerprint import (
    FLOAT_HIST_BINS,
    Fingerprint,
    band_histograms,
    band_moments,
    fingerprint_from_moments,
    pixel_size,
)
from segflow.geometry import Window
from segflow.io.store import GeoRef, SlideInfo
from segflow.stats import (
    check_train_region,
    class_counts,
    class_weights,
    counts_to_dict,
    train_mask_for_window,
)

H, W = 203, 317  # not multiples of the chunks
REGIONS = [
    None,
    TrainRegion(bbox=(20, 30, 150, 300)),
    TrainRegion(block=40, holdout_every=3),
    TrainRegion(bbox=(-50, 100, 120, 10_000)),
]  # partly outside: clipped


def full_mask(region: TrainRegion | None, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    return train_mask_for_window(region, Window(0, 0, *shape), image_shape=shape)


# --------------------------------------------------------------------------- regions
def test_train_mask_bbox_and_blocks() -> None:
    m = full_mask(TrainRegion(bbox=(20, 30, 150, 300)))
    assert m.sum() == 130 * 270 and m[20, 30] and not m[19, 30] and not m[20, 300]
    b = full_mask(TrainRegion(block=40, holdout_every=3))
    cols = -(-W // 40)
    k = (np.arange(H) // 40)[:, None] * cols + (np.arange(W) // 40)[None, :]
    assert np.array_equal(b, k % 3 != 2)
    assert full_mask(None).all()


@pytest.mark.parametrize("region", REGIONS[1:3])
def test_train_mask_of_any_window_is_a_slice_of_the_whole(region: TrainRegion) -> None:
    whole = full_mask(region)
    rng = np.random.default_rng(0)
    for _ in range(20):
        r0, c0 = rng.integers(0, H - 1), rng.integers(0, W - 1)
        win = Window.from_bounds(r0, c0, rng.integers(r0 + 1, H + 1), rng.integers(c0 + 1, W + 1))
        assert np.array_equal(
            train_mask_for_window(region, win, image_shape=(H, W)), whole[win.slices]
        )


def test_region_outside_the_image_is_one_clear_error() -> None:
    with pytest.raises(RegionError, match=r"does not overlap the image of 203 x 317") as err:
        check_train_region(TrainRegion(bbox=(300, 0, 400, 50)), H, W)
    assert "\n" not in str(err.value)
    with pytest.raises(RegionError):
        check_train_region(TrainRegion(bbox=(0, -90, 10, 0)), H, W)
    check_train_region(TrainRegion(bbox=(-5, -5, 1, 1)), H, W)  # overlaps one pixel: fine
    check_train_region(None, H, W)


# --------------------------------------------------------------------------- class counts
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
@pytest.mark.parametrize("region", REGIONS)
def test_class_counts_equal_numpy_bincount(
    dtype: str, region: TrainRegion | None, rng: np.random.Generator
) -> None:
    ignore = 255 if dtype == "uint8" else 65535
    labels = rng.choice(
        np.array([0, 1, 2, 7, ignore], dtype), size=(H, W), p=[0.5, 0.2, 0.1, 0.05, 0.15]
    )
    valid = rng.random((H, W)) > 0.1
    keep = valid & (labels != ignore) & full_mask(region)
    ref = np.bincount(labels[keep].astype(np.int64), minlength=1 << (8 * np.dtype(dtype).itemsize))
    got = class_counts(
        da.from_array(labels, chunks=(64, 100)),
        da.from_array(valid, chunks=50),
        ignore_index=ignore,
        region=region,
    ).compute()
    assert got.dtype == np.int64 and np.array_equal(got, ref)
    d = counts_to_dict(got, class_ids=[0, 1, 2, 3], ignore_index=ignore)
    assert d == {0: ref[0], 1: ref[1], 2: ref[2], 3: 0, 7: ref[7]}


# --------------------------------------------------------------------------- class weights
def test_class_weight_modes() -> None:
    counts = {0: 700, 1: 200, 2: 100, 3: 0}
    assert class_weights(counts, "none") == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}
    inv = class_weights(counts, "inverse")
    f = np.array([0.7, 0.2, 0.1])
    expect = (1 / f) / np.mean(1 / f)
    assert np.allclose([inv[0], inv[1], inv[2]], expect, rtol=1e-10)
    assert np.mean([inv[0], inv[1], inv[2]]) == pytest.approx(1.0) and inv[3] == 1.0
    med = class_weights(counts, "median")
    assert (
        np.allclose([med[0], med[1], med[2]], 0.2 / f, rtol=1e-10)
        and med[1] == 1.0
        and med[3] == 1.0
    )
    ex = class_weights(counts, "explicit", explicit={0: 1.0, 1: 4.0, 2: 9.0})
    assert ex == {0: 1.0, 1: 4.0, 2: 9.0, 3: 1.0}


def test_class_weight_errors() -> None:
    with pytest.raises(ConfigError, match="lack classes present"):
        class_weights({0: 5, 1: 5}, "explicit", explicit={0: 1.0})
    with pytest.raises(ConfigError, match=">= 0"):
        class_weights({0: 5}, "explicit", explicit={0: -1.0})
    with pytest.raises(RegionError, match="no labelled valid pixels"):
        class_weights({0: 0, 1: 0}, "median")


# --------------------------------------------------------------------------- statistics
def make_image(dtype: str, rng: np.random.Generator) -> np.ndarray:
    if np.dtype(dtype).kind == "f":
        img = rng.normal(300.0, 80.0, (3, H, W)).astype(dtype)
        img[1] = rng.lognormal(2.0, 1.0, (H, W))  # skewed
        return img
    info = np.iinfo(dtype)
    img = rng.integers(info.min, info.max, (3, H, W), endpoint=True).astype(dtype)
    img[2] = np.clip(rng.normal(100, 20, (H, W)), info.min, info.max).astype(dtype)
    return img


def fingerprint_of(img: np.ndarray, valid: np.ndarray, region: TrainRegion | None) -> Fingerprint:
    dimg, dval = da.from_array(img, chunks=(3, 70, 90)), da.from_array(valid, chunks=(70, 90))
    mom = band_moments(dimg, dval, region=region).compute()
    hist = None
    if img.dtype.kind == "f":
        hist = band_histograms(dimg, dval, region=region, lo=mom.min, hi=mom.max).compute()
    return fingerprint_from_moments(mom, bands=("a", "b", "c"), dtype=img.dtype, float_hist=hist)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
@pytest.mark.parametrize("region", REGIONS)
def test_statistics_equal_float64_numpy(
    dtype: str, region: TrainRegion | None, rng: np.random.Generator
) -> None:
    img = make_image(dtype, rng)
    valid = rng.random((H, W)) > 0.25
    fp = fingerprint_of(img, valid, region)
    mask = valid & full_mask(region)
    assert fp.train_pixels == mask.sum()
    assert fp.nodata_fraction == pytest.approx(1 - valid.mean(), rel=1e-12)
    for b in range(3):
        x = img[b][mask].astype(np.float64)
        for got, ref in (
            (fp.mean[b], x.mean()),
            (fp.std[b], x.std()),
            (fp.min[b], x.min()),
            (fp.max[b], x.max()),
        ):
            assert got == pytest.approx(ref, rel=1e-6)
        p_ref = np.percentile(x, [0.5, 99.5])
        if img.dtype.kind in "ui":
            # exact histogram: numpy's linear percentiles to rounding
            assert fp.percentile_method == "exact"
            assert [fp.p0_5[b], fp.p99_5[b]] == pytest.approx(list(p_ref), rel=1e-12, abs=1e-9)
        else:
            # documented approximation: within one bin of a 65536-bin histogram over [min, max]
            tol = (x.max() - x.min()) / FLOAT_HIST_BINS
            assert fp.percentile_method == f"histogram-{FLOAT_HIST_BINS}"
            assert abs(fp.p0_5[b] - p_ref[0]) <= tol and abs(fp.p99_5[b] - p_ref[1]) <= tol


def test_float_nan_counts_as_invalid_and_constant_band(rng: np.random.Generator) -> None:
    img = make_image("float32", rng)
    img[0, :10] = np.nan
    img[2] = 4.25
    valid = np.ones((H, W), bool)
    fp = fingerprint_of(img, valid, None)
    x = img[0][np.isfinite(img[0])].astype(np.float64)
    assert fp.mean[0] == pytest.approx(x.mean(), rel=1e-6)
    assert fp.p0_5[2] == fp.p99_5[2] == fp.min[2] == 4.25 and fp.std[2] == 0


def test_region_without_valid_pixels_is_an_error(rng: np.random.Generator) -> None:
    img = make_image("uint8", rng)
    valid = np.ones((H, W), bool)
    valid[:50] = False
    with pytest.raises(RegionError, match="no valid pixels"):
        fingerprint_of(img, valid, TrainRegion(bbox=(0, 0, 50, 50)))


# --------------------------------------------------------------------------- fingerprint
def test_fingerprint_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    img = make_image("uint16", rng)
    fp = fingerprint_of(img, np.ones((H, W), bool), TrainRegion(block=64, holdout_every=4))
    fp = Fingerprint(
        **{
            **fp.__dict__,
            "class_counts": {0: 10, 1: 30},
            "class_weights": {0: 2.0, 1: 0.5},
            "pixel_size": (0.5, 0.5),
            "pixel_unit": "metre",
            "train_region": {"block": 64, "holdout_every": 4, "bbox": None},
        }
    )
    assert Fingerprint.from_dict(json.loads(json.dumps(fp.to_dict()))) == fp
    path = fp.to_json(tmp_path / "sub" / "fp.json")
    back = Fingerprint.from_json(path)
    assert back == fp and back.class_frequencies == {0: 0.25, 1: 0.75}
    assert json.loads(path.read_text())["class_counts"] == {"0": 10, "1": 30}
    with pytest.raises(ConfigError, match="version"):
        Fingerprint.from_dict({**fp.to_dict(), "version": 99})
    with pytest.raises(ConfigError, match="not found"):
        Fingerprint.from_json(tmp_path / "missing.json")


def test_pixel_size_from_georef_and_slide() -> None:
    from pyproj import CRS

    utm = GeoRef(CRS.from_epsg(32616).to_wkt(), 32616, (733601.0, 0.5, 0.0, 3725139.0, 0.0, -0.5))
    assert pixel_size(utm) == ((0.5, 0.5), "metre")
    geo = GeoRef(CRS.from_epsg(4326).to_wkt(), 4326, (-115.23, 2.7e-6, 0.0, 36.14, 0.0, -2.7e-6))
    assert pixel_size(geo) == ((2.7e-6, 2.7e-6), "degree")
    slide = SlideInfo(mpp_x=0.499, mpp_y=0.5, objective_power=20)
    assert pixel_size(None, slide) == ((0.5, 0.499), "micron")
    assert pixel_size() == (None, None)


_MOMENTS = """
import dask.array as da
import numpy as np
from segflow.fingerprint import band_moments
img = np.random.default_rng(0).normal(300, 263, (1, 2048, 2048))
m = band_moments(da.from_array(img, chunks=(1, 2048, 2048)), None).compute(scheduler="sync")
print(repr(float(m.mean[0])), repr(float(m.m2[0])))
"""


def test_statistics_do_not_depend_on_the_blas_thread_count() -> None:
    """A process with BLAS on two threads and a cluster's worker on one compute the same
    moments, bit for bit (BLAS's dot sums in per-thread parts: it did not)."""
    runs = {
        subprocess.run(
            [sys.executable, "-c", _MOMENTS],
            env={**os.environ, "OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n},
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout
        for n in ("1", "2")
    }  # fmt: skip
    assert len(runs) == 1, runs
