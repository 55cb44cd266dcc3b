"""Border-weight maps against an independent naive reference, on real instance labels.

The naive reference below is the textbook method: one Euclidean distance transform per object
over the whole image, the two smallest distances per pixel, no cut-off. segflow's result may
differ from it only where the term is below eps (there segflow gives 0), so the bound is eps.
"""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from segflow.errors import ConfigError
from segflow.weights import (
    apply_class_weights,
    border_halo,
    border_radius,
    border_term,
    border_term_dask,
    class_weight_lut,
    instances_from_labels,
    weight_map,
)

W0, SIGMA, EPS = 10.0, 5.0, 1e-3
DSB_FILES = [
    "1962d0c5faf3.png",
    "3c4c675825f7.png",
    "432f367a4c5b.png",
    "472b1c5ff988.png",
    "697a05c6fe4a.png",
    "fe9adb627a6f.png",
]


# --------------------------------------------------------------------------- references
def naive_distances(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d1, d2 by one whole-image distance transform per object (inf if fewer objects)."""
    d1 = np.full(inst.shape, np.inf)
    d2 = np.full(inst.shape, np.inf)
    for obj in np.unique(inst):
        if obj == 0:
            continue
        d = ndimage.distance_transform_edt(inst != obj)
        d2 = np.minimum(d2, np.maximum(d1, d))
        d1 = np.minimum(d1, d)
    return d1, d2


def naive_term(
    inst: np.ndarray, w0: float = W0, sigma: float = SIGMA
) -> tuple[np.ndarray, np.ndarray]:
    """(border term without cut-off, d1 + d2), float64."""
    d1, d2 = naive_distances(inst)
    s = d1 + d2
    return np.where(inst == 0, w0 * np.exp(-(s**2) / (2 * sigma**2)), 0.0), s


def naive_cut_term(inst: np.ndarray, w0: float = W0, sigma: float = SIGMA) -> np.ndarray:
    """The naive term with segflow's cut-off, in the same float64 operations, as float32."""
    d1, d2 = naive_distances(inst)
    s = d1 + d2
    keep = (s <= border_radius(w0, sigma, EPS)) & (inst == 0)
    out = np.zeros(inst.shape, np.float32)
    out[keep] = w0 * np.exp(-(s[keep] * s[keep]) / (2.0 * sigma * sigma))
    return out


def check_against_naive(inst: np.ndarray) -> float:
    ours = border_term(inst, w0=W0, sigma=SIGMA, eps=EPS)
    ref, _ = naive_term(inst)
    diff = float(np.abs(ours - ref).max())
    assert diff <= 1e-3
    # with the same cut-off the two are identical: the distances are square roots of the same
    # integers, whatever the algorithm
    assert np.array_equal(ours, naive_cut_term(inst))
    return diff


def check_chunking(inst: np.ndarray) -> None:
    whole = border_term(inst, w0=W0, sigma=SIGMA, eps=EPS)
    for chunks in (64, 256, inst.shape, 37):  # 37 < halo: Dask needs merged chunks
        got = border_term_dask(da.from_array(inst, chunks=chunks), w0=W0, sigma=SIGMA, eps=EPS)
        assert np.array_equal(got.compute(scheduler="threads"), whole), chunks


# --------------------------------------------------------------------------- data
def dsb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.uint32)


def spacenet_instances(samples: Path) -> np.ndarray:
    """The 43 Atlanta building polygons rasterized onto the chip's grid, ids 1..43."""
    import rasterio
    from rasterio.features import rasterize

    folder = samples / "spacenet_atlanta"
    with rasterio.open(folder / "sample_geotiff.tif") as src:
        shape, transform = (src.height, src.width), src.transform
    features = json.loads((folder / "geotiff_labels.geojson").read_text())["features"]
    shapes = [(f["geometry"], i) for i, f in enumerate(features, start=1)]
    return rasterize(shapes, out_shape=shape, transform=transform, fill=0, dtype="uint32")


# --------------------------------------------------------------------------- tests
def test_radius_and_halo() -> None:
    r = border_radius(W0, SIGMA, EPS)
    assert r == pytest.approx(5 * np.sqrt(2 * np.log(1e4)))
    assert W0 * np.exp(-(r**2) / (2 * SIGMA**2)) == pytest.approx(EPS)
    assert border_halo(W0, SIGMA, EPS) == 22
    assert border_radius(1e-3, 5, 1e-3) == 0.0 and border_halo(0, 5, 1e-3) == 0


def test_bundled_dsb_matches_naive(samples: Path) -> None:
    inst = dsb(samples / "dsb2018" / "labels_697a05c6fe4a.png")
    assert len(np.unique(inst)) - 1 == 60
    diff = check_against_naive(inst)
    assert diff > 0  # the cut-off is visible, and bounded by eps
    check_chunking(inst)


@pytest.mark.shared
@pytest.mark.parametrize("name", DSB_FILES)
def test_shared_dsb_matches_naive(shared_data: Path, name: str) -> None:
    inst = dsb(shared_data / "dsb2018_nuclei_instances" / "labels" / name)
    check_against_naive(inst)
    check_chunking(inst)


def test_chunks_smaller_than_the_halo_are_merged(samples: Path) -> None:
    inst = dsb(samples / "dsb2018" / "labels_697a05c6fe4a.png")
    whole = border_term(inst)
    for chunks in (10, (7, 100)):
        got = border_term_dask(da.from_array(inst, chunks=chunks))
        assert min(min(c) for c in got.chunks) >= border_halo(W0, SIGMA, EPS)
        assert np.array_equal(got.compute(), whole)


def test_internal_tiling_is_exact(samples: Path) -> None:
    inst = spacenet_instances(samples)
    whole = border_term(inst, tile=900)  # one tile
    for tile in (97, 512, 23):  # 23 < the halo
        assert np.array_equal(border_term(inst, tile=tile), whole), tile


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.uint64])
def test_any_integer_ids_match_naive(dtype: type) -> None:
    """Ids of any integer type, negative or near the type's limits, partition the same way."""
    rng = np.random.default_rng(7)
    small = np.zeros((70, 80), np.int64)
    for k in range(1, 13):
        r, c = rng.integers(0, 64), rng.integers(0, 74)
        small[r : r + rng.integers(1, 7), c : c + rng.integers(1, 7)] = k
    info = np.iinfo(dtype)
    low = [info.min, info.min + 1, -1] if info.min < 0 else [1, 2, 3]
    ids = np.array([0, info.max, info.max - 1, *low, 4, 5, 6, 7, 8, 9, 10], dtype=dtype)
    assert len(set(ids.tolist())) == 13
    inst = ids[small]
    assert np.array_equal(border_term(inst), naive_cut_term(small))
    assert np.array_equal(border_term(inst, tile=17), naive_cut_term(small))


def test_spacenet_buildings_match_naive(samples: Path) -> None:
    inst = spacenet_instances(samples)
    assert inst.shape == (900, 900) and set(np.unique(inst)) == set(range(44))
    check_against_naive(inst)
    check_chunking(inst)


@pytest.mark.parametrize("seed", range(6))
def test_random_rectangles_match_naive(seed: int) -> None:
    rng = np.random.default_rng(seed)
    inst = np.zeros((90, 130), np.uint32)
    for k in range(1, 25):
        r, c = rng.integers(0, 85), rng.integers(0, 125)
        inst[r : r + rng.integers(1, 8), c : c + rng.integers(1, 8)] = k * 7919  # sparse large ids
    check_against_naive(inst)
    check_chunking(inst)


def test_huge_sparse_ids_give_the_same_result() -> None:
    rng = np.random.default_rng(3)
    small = np.zeros((60, 60), np.uint32)
    for k in range(1, 15):
        r, c = rng.integers(0, 55, 2)
        small[r : r + 4, c : c + 4] = k
    ids = np.array([0, *rng.choice(2**32 - 1, size=14, replace=False) + 1], np.uint32)
    assert np.array_equal(border_term(ids[small]), border_term(small))


def test_fewer_than_two_objects_and_object_pixels() -> None:
    one = np.zeros((40, 40), np.uint32)
    one[10:20, 10:20] = 5
    assert not border_term(one).any()  # no second object: term 0 (objects outside don't exist)
    assert not border_term(np.zeros((8, 8), np.uint16)).any()
    two = one.copy()
    two[10:20, 22:30] = 6
    t = border_term(two)
    assert not t[two > 0].any() and t[15, 21] == pytest.approx(
        W0 * np.exp(-9 / 50), rel=1e-6
    )  # d1 = 1, d2 = 2


def test_a_cut_off_radius_beyond_int32_squared() -> None:
    """sigma = 1e5 px: r^2 is past 2^31, the squared distances still compare right."""
    inst = np.zeros((1, 7), np.uint32)
    inst[0, 0], inst[0, 6] = 1, 2
    assert border_radius(W0, 1e5, EPS) ** 2 > 2**31
    assert np.array_equal(border_term(inst, sigma=1e5), naive_cut_term(inst, sigma=1e5))
    assert border_term(inst, sigma=1e5)[0, 3] > 9.99


def test_w0_zero_or_below_eps_gives_no_term() -> None:
    inst = np.zeros((30, 30), np.uint32)
    inst[5, 5], inst[5, 8] = 1, 2
    assert not border_term(inst, w0=0).any()
    assert not border_term(inst, w0=1e-4, eps=1e-3).any()
    assert not border_term_dask(da.from_array(inst, chunks=8), w0=0).compute().any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": 0}, "sigma must be"),
        ({"sigma": -1.0}, "sigma must be"),
        ({"w0": -0.5}, "w0 must be"),
        ({"eps": 0}, "eps must be"),
        ({"w0": float("nan")}, "w0 must be"),
    ],
)
def test_bad_parameters(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        border_term(np.zeros((4, 4), np.uint32), **kwargs)
    with pytest.raises(ConfigError, match=match):
        border_term_dask(da.zeros((4, 4), dtype=np.uint32), **kwargs)


def test_bad_instance_arrays() -> None:
    with pytest.raises(ConfigError, match="2-D integer"):
        border_term(np.zeros((4, 4), np.float32))
    with pytest.raises(ConfigError, match="2-D integer"):
        border_term(np.zeros((2, 4, 4), np.uint32))


def test_weight_map_class_weights_unlabelled_and_invalid(samples: Path) -> None:
    inst = dsb(samples / "dsb2018" / "labels_697a05c6fe4a.png")
    labels = (inst > 0).astype(np.uint8)
    labels[:20] = 255
    valid = np.ones(inst.shape, bool)
    valid[:, -7:] = False
    w = weight_map(inst, labels, valid, class_weights={0: 0.5, 1: 2.0}, ignore_index=255)
    term = border_term(inst)
    keep = (labels != 255) & valid
    expect = np.where(labels == 1, 2.0, 0.5) + term
    assert np.allclose(w[keep], expect[keep], rtol=0, atol=1e-6)
    assert not w[~keep].any()
    # without labels the class weight is 1
    assert np.array_equal(apply_class_weights(term, None, None, None), term + np.float32(1))
    lut = class_weight_lut({1: 3.0}, dtype="uint16", ignore_index=65535)
    assert lut.shape == (65536,) and lut[1] == 3 and lut[0] == 1 and lut[65535] == 0
    with pytest.raises(ConfigError, match="uint8 or uint16"):
        class_weight_lut({}, dtype="int32", ignore_index=255)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images split the pixels into the same objects (ids may differ)."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def test_instances_from_labels_merge_across_chunks() -> None:
    rng = np.random.default_rng(7)
    smooth = ndimage.gaussian_filter(rng.random((150, 170)), 3)
    labels = np.where(smooth > np.quantile(smooth, 0.6), 1, 0).astype(np.uint8)
    labels[smooth > np.quantile(smooth, 0.9)] = 2
    labels[:5] = 255
    valid = np.ones(labels.shape, bool)
    valid[:, :4] = False
    ids, n = instances_from_labels(
        da.from_array(labels, chunks=64), da.from_array(valid, chunks=64), ignore_index=255
    )
    got = ids.compute()
    ref, n_ref = ndimage.label((labels != 0) & (labels != 255) & valid)
    assert got.dtype == np.uint32 and int(n.compute()) == n_ref > 10
    assert same_partition(got, ref)
    # objects crossing chunk edges are one object
    assert len(np.unique(got)) - 1 == n_ref


def test_the_kernel_imports_where_numba_cannot_cache() -> None:
    """A read-only install with no writable cache folder compiles per process instead of
    failing at import (numba raises "no locator available" for cache=True)."""
    import subprocess
    import sys

    code = (
        "import numba.core.caching as c; c.CacheImpl._locator_classes = []\n"
        "import segflow.border_kernel as k; print(type(k._kept_sums).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "CPUDispatcher"
