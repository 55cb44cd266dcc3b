"""Tile plans, mirroring and blending weights (segflow.tiling): property tests against numpy/MONAI."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segflow.errors import ConfigError
from segflow.geometry import BlockGrid, BlockIndex, Window
from segflow.tiling import (
    crop_layout,
    gaussian_importance_map,
    gaussian_layout,
    mirror_indices,
    mirror_plan,
    round_up,
    schedule,
    strips,
)

FAST = settings(max_examples=100, deadline=None)


@st.composite
def image_and_region(draw: st.DrawFn, max_side: int = 300) -> tuple[int, int, Window]:
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    r0 = draw(st.integers(0, h - 1))
    c0 = draw(st.integers(0, w - 1))
    r1 = draw(st.integers(r0 + 1, h))
    c1 = draw(st.integers(c0 + 1, w))
    return h, w, Window.from_bounds(r0, c0, r1, c1)


def _coverage(cores: list[Window], within: Window) -> np.ndarray:
    count = np.zeros(within.shape, np.int32)
    for core in cores:
        part = core.intersection(within)
        if part.size:
            count[part.relative_to(within).slices] += 1
    return count


# ------------------------------------------------------------------------------- crop layout
@FAST
@given(
    image_and_region(max_side=200),
    st.integers(4, 96),
    st.integers(0, 24),
    st.integers(1, 8),
    st.integers(0, 150),
    st.integers(0, 150),
)
def test_crop_cores_cover_every_pixel_exactly_once(
    geo: tuple[int, int, Window], tile: int, halo: int, multiple: int, orow: int, ocol: int
) -> None:
    h, w, region = geo
    origin = (min(orow, h - 1), min(ocol, w - 1))
    lay = crop_layout(h, w, tile=tile, halo=halo, size_multiple=multiple, origin=origin)
    # the whole image: every pixel in exactly one core (last row/column included)
    assert (_coverage([t.core for t in lay], Window(0, 0, h, w)) == 1).all()
    # any region: the tiles touching it cover it exactly once, and no others touch it
    touching = list(lay.touching(region))
    assert (_coverage([t.core for t in touching], region) == 1).all()
    assert lay.count_touching(region) == len(touching)
    others = {t.index for t in lay} - {t.index for t in touching}
    assert all(lay.tile(i.row, i.col).core.intersection(region).size == 0 for i in others)
    for t in touching:
        # fixed input size, a multiple; the core is the tile's centre, halo context on each side
        assert t.window.shape == (lay.size, lay.size)
        assert lay.size == round_up(tile + 2 * halo, multiple)
        rel = t.core.relative_to(t.window)
        assert rel.row_off >= halo and rel.col_off >= halo
        assert rel.row_stop <= halo + tile and rel.col_stop <= halo + tile
        # tile grid anchored at the origin: interior cores start on it
        assert (t.core.row_off - origin[0]) % tile == 0 or t.core.row_off == 0
        assert (t.core.col_off - origin[1]) % tile == 0 or t.core.col_off == 0
        assert lay.weights(t) is None


def test_crop_layout_last_tile_is_clipped_not_shifted() -> None:
    lay = crop_layout(1000, 700, tile=256, halo=16)
    assert lay.shape == (4, 3)
    last = lay.tile(3, 2)
    assert last.core == Window.from_bounds(768, 512, 1000, 700)
    assert last.window == Window(768 - 16, 512 - 16, 288, 288)  # full size, mirrored beyond


# ------------------------------------------------------------------------------- gaussian layout
@FAST
@given(
    image_and_region(max_side=160),
    st.integers(8, 80),
    st.sampled_from([0.0, 0.25, 0.5, 0.75]),
    st.integers(0, 20),
)
def test_gaussian_windows_cover_every_pixel(
    geo: tuple[int, int, Window], window: int, overlap: float, halo: int
) -> None:
    h, w, region = geo
    lay = gaussian_layout(h, w, window=window, overlap=overlap, halo=halo)
    touching = list(lay.touching(region))
    assert (_coverage([t.core for t in touching], region) >= 1).all()
    assert lay.count_touching(region) == len(touching)
    total = np.zeros(region.shape, np.float64)
    for t in touching:
        assert t.window.shape == (window, window)
        assert t.core == t.window.intersection(Window(0, 0, h, w))
        part = t.core.intersection(region)
        if part.size:
            weights = lay.weights(t, part)
            assert weights is not None and weights.shape == part.shape
            total[part.relative_to(region).slices] += weights
    assert (total > 0).all()


@FAST
@given(
    st.integers(1, 300),
    st.integers(2, 96),
    st.sampled_from([0.0, 0.25, 0.5, 0.6, 0.875]),
    st.integers(0, 24),
)
def test_gaussian_window_starts_match_monai(n: int, window: int, overlap: float, halo: int) -> None:
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    length = n + 2 * halo
    lay = gaussian_layout(n, 1, window=window, overlap=overlap, halo=halo)
    padded = max(length, window)  # MONAI pads a short axis evenly before tiling it
    shift = halo + (padded - length) // 2
    interval = _get_scan_interval((padded,), (window,), 1, (overlap,))
    monai = [s[0].start - shift for s in dense_patch_slices((padded,), (window,), interval)]
    # MONAI also lists windows lying wholly in the padding; they add nothing to the image
    monai = [s for s in monai if s < n and s + window > 0]
    assert list(lay.rows.starts) == monai


@pytest.mark.parametrize("size", [1, 2, 7, 64, 97, 256, 576])
@pytest.mark.parametrize("sigma_scale", [0.125, 0.25])
def test_importance_map_equals_monai(size: int, sigma_scale: float) -> None:
    from monai.data.utils import compute_importance_map

    ours = gaussian_importance_map(size, sigma_scale)
    theirs = compute_importance_map((size, size), mode="gaussian", sigma_scale=sigma_scale)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs.numpy())


# ------------------------------------------------------------------------------- mirroring
@FAST
@given(st.integers(1, 12), st.integers(0, 60), st.integers(0, 60))
def test_mirror_indices_equal_numpy_reflect(n: int, before: int, after: int) -> None:
    expect = np.pad(np.arange(n), (before, after), mode="reflect")
    assert mirror_indices(np.arange(-before, n + after), n).tolist() == expect.tolist()


@FAST
@given(
    image_and_region(max_side=20),
    st.integers(-45, 45),
    st.integers(-45, 45),
    st.integers(1, 45),
    st.integers(1, 45),
)
def test_mirror_plan_reproduces_np_pad(
    geo: tuple[int, int, Window], dr: int, dc: int, wh: int, ww: int
) -> None:
    h, w, _ = geo
    rng = np.random.default_rng(h * 1000 + w)
    image = rng.integers(0, 1000, (2, h, w))
    window = Window(dr, dc, wh, ww)
    plan = mirror_plan(window, h, w)
    assert Window(0, 0, h, w).contains(plan.source)
    got = plan.take(image[(slice(None), *plan.source.slices)])
    pad = 100
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    expect = padded[(slice(None), *window.translate(pad, pad).slices)]
    np.testing.assert_array_equal(got, expect)
    inside = Window(0, 0, h, w).contains(window)
    assert plan.mirrored != inside
    if inside:  # real pixels only, read exactly the window
        assert plan.source == window


def test_mirror_plan_reads_real_context_outside_the_region() -> None:
    image = np.arange(100).reshape(1, 10, 10)
    plan = mirror_plan(Window(-2, 3, 4, 4), 10, 10)
    got = plan.take(image[(slice(None), *plan.source.slices)])[0]
    # rows -2, -1 are mirrored rows 2, 1; columns 3..6 are real pixels
    np.testing.assert_array_equal(got[:, 0], [23, 13, 3, 13])
    np.testing.assert_array_equal(got[2], [3, 4, 5, 6])


# ------------------------------------------------------------------------------- schedule
@FAST
@given(
    st.integers(1, 160),
    st.integers(1, 160),
    st.sampled_from([8, 16, 32]),
    st.sampled_from(["crop", "gaussian"]),
    st.integers(1, 40),
    st.integers(0, 8),
    st.integers(0, 2**16),
    st.integers(0, 30),
    st.integers(0, 30),
)
def test_schedule_gives_each_unit_exactly_its_tiles(
    h: int, w: int, unit: int, mode: str, tile: int, halo: int, seed: int, orow: int, ocol: int
) -> None:
    origin = (min(orow, h - 1), min(ocol, w - 1))
    gh, gw = h - origin[0], w - origin[1]
    grid = BlockGrid(gh, gw, unit)
    if mode == "crop":
        lay = crop_layout(h, w, tile=tile, halo=halo, origin=origin)
    else:
        lay = gaussian_layout(h, w, window=tile + 2 * halo, overlap=0.5, halo=halo)
    rng = np.random.default_rng(seed)
    units = [idx for idx, _ in grid if rng.random() < 0.6]
    steps = schedule(lay, grid, units, origin=origin)
    assert len({s.tile.index for s in steps}) == len(steps)  # each tile once
    order = [(s.tile.index.row, s.tile.index.col) for s in steps]
    assert order == sorted(order)  # row-major
    got: dict[BlockIndex, int] = {}
    for s in steps:
        assert s.units
        for u in s.units:
            assert u in units
            uw = grid.window(u.row, u.col).translate(*origin)
            assert s.tile.core.intersection(uw).size > 0
            got[u] = got.get(u, 0) + 1
    for u in units:
        uw = grid.window(u.row, u.col).translate(*origin)
        assert got.get(u, 0) == lay.count_touching(uw) > 0


def test_strips_group_columns() -> None:
    assert strips([0, 1, 2, 3, 5, 9], 4) == [[0, 1, 2, 3], [5], [9]]
    assert strips([4, 3], 1) == [[3], [4]]
    with pytest.raises(ConfigError):
        strips([0], 0)


# ------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: crop_layout(0, 10, tile=8, halo=1), "positive size"),
        (lambda: crop_layout(10, 10, tile=0, halo=1), "tile must be > 0"),
        (lambda: crop_layout(10, 10, tile=8, halo=-1), "halo must be >= 0"),
        (lambda: gaussian_layout(10, 10, window=8, overlap=1.0), "overlap"),
        (lambda: gaussian_layout(10, 10, window=30, size_multiple=16), "multiple"),
        (lambda: mirror_plan(Window(0, 0, 0, 3), 5, 5), "empty window"),
    ],
)
def test_bad_values_fail_clearly(call: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()  # type: ignore[operator]
