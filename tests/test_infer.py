"""The streaming inference engine (segflow.infer): seamless stitching, MONAI parity, resume.

The reference for ``crop`` is whole-image inference on the image reflect-padded by the halo;
for ``gaussian`` it is ``monai.inferers.sliding_window_inference`` on that same padded image.
Models are tiny fully convolutional nets with a known receptive field, seeded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from segflow.errors import ConfigError, RegionError, StoreError
from segflow.geometry import Window
from segflow.infer import (
    ArrayReader,
    InferenceOptions,
    StoreReader,
    WindowReader,
    build_layout,
    open_prediction_store,
    predict_array,
    predict_region,
)
from segflow.infer.engine import reader_band
from segflow.infer.store import UNIT_BUDGET_BYTES, prediction_unit
from segflow.io.store import GeoRef, SceneStore

MEAN = [0.5, 0.4, 0.3]
STD = [0.25, 0.2, 0.3]
TOL = 1e-5  # max abs probability difference for float32 results


def conv_net(classes: int = 3, bands: int = 3, seed: int = 0) -> torch.nn.Module:
    """3x3, dilated 3x3 (dilation 2), 3x3: receptive-field radius 1 + 2 + 1 = 4 pixels."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(bands, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, classes, 3, padding=1),
    ).eval()


class PoolNet(torch.nn.Module):
    """A U-Net-like net with one 2x down/up-sampling: input side must be even.

    Receptive-field radius: 1 (conv) + 1 (pool) + 2 (conv at half scale) + 1 (upsample) + 1 = 6.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.b = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.c = torch.nn.Conv2d(12, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.a(x))
        b = torch.relu(self.b(torch.nn.functional.max_pool2d(a, 2)))
        up = torch.nn.functional.interpolate(b, scale_factor=2, mode="nearest")
        return self.c(torch.cat([a, up], dim=1))


class Counting(torch.nn.Module):
    """Counts the tiles a model sees."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.tiles = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tiles += x.shape[0]
        return self.inner(x)


def reference(
    model: torch.nn.Module, image: np.ndarray, halo: int, valid: np.ndarray | None = None
) -> np.ndarray:
    """Whole-image inference on the image reflect-padded by ``halo``, cropped back.

    Pixels outside ``valid`` are 0 after normalization (the engine's fill for nodata).
    """
    pad = ((0, 0), (halo, halo), (halo, halo))
    x = np.pad(image, pad, mode="reflect").astype(np.float32)
    x = (x - np.reshape(MEAN, (-1, 1, 1))) / np.reshape(STD, (-1, 1, 1))
    if valid is not None:
        x[:, ~np.pad(valid, pad[1:], mode="reflect")] = 0.0
    with torch.inference_mode():
        p = torch.softmax(model(torch.from_numpy(x.astype(np.float32))[None]), 1)[0].numpy()
    h, w = image.shape[1:]
    return p[:, halo : halo + h, halo : halo + w]


def opts(**kw: object) -> InferenceOptions:
    kw.setdefault("device", "cpu")
    kw.setdefault("batch_size", 4)
    return InferenceOptions(**kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def big_image() -> np.ndarray:
    return np.random.default_rng(7).random((3, 1024, 1024), dtype=np.float32)


@pytest.fixture
def image(rng: np.random.Generator) -> np.ndarray:
    return rng.random((3, 200, 168), dtype=np.float32)


def scene(
    tmp_path: Path,
    image: np.ndarray,
    chunk: int,
    valid: np.ndarray | None = None,
    shard: int | None = None,
    name: str = "s.zarr",
) -> SceneStore:
    s = SceneStore.create(
        tmp_path / name,
        bands=("r", "g", "b"),
        height=image.shape[1],
        width=image.shape[2],
        dtype=image.dtype,
        chunk=chunk,
        shard=shard,
    )
    s.array("image")[...] = image
    s.array("valid")[...] = np.ones(image.shape[1:], bool) if valid is None else valid
    return s


# ------------------------------------------------------------------------------- seamless
def test_crop_1024_equals_whole_image_inference(big_image: np.ndarray, tmp_path: Path) -> None:
    model = conv_net()
    ref = reference(model, big_image, halo=6)
    got = predict_array(
        ArrayReader(big_image),
        model,
        Window(0, 0, 1024, 1024),
        options=opts(tile=256, halo=6),
        mean=MEAN,
        std=STD,
    )
    diff = float(np.abs(got - ref).max())
    print(f"crop 1024x1024, 256 tiles, halo 6: max |p - p_whole| = {diff:.2e}")
    assert diff <= TOL
    # the same through the store: uint8 probabilities within rounding, labels = argmax
    store = scene(tmp_path, big_image, chunk=256)
    rep = predict_region(
        StoreReader(store),
        model,
        Window(0, 0, 1024, 1024),
        store,
        options=opts(tile=256, halo=6),
        mean=MEAN,
        std=STD,
    )
    assert (rep.tiles, rep.units, rep.pixels, rep.skipped_units) == (16, 16, 1024 * 1024, 0)
    probs = store.array("prediction/probabilities")[...]
    assert probs.dtype == np.uint8
    assert np.abs(probs / 255.0 - ref).max() <= 0.5 / 255 + 1e-6
    labels = store.array("prediction/labels")[...]
    np.testing.assert_array_equal(labels, ref.argmax(0))
    assert store.has("prediction/labels") and store.has("prediction/probabilities")


def test_crop_with_halo_smaller_than_receptive_field_shows_seams(big_image: np.ndarray) -> None:
    """The check above is not vacuous: too small a halo changes pixels near tile edges."""
    model = conv_net()
    img = big_image[:, :256, :256]
    got = predict_array(
        ArrayReader(img),
        model,
        Window(0, 0, 256, 256),
        options=opts(tile=64, halo=1),
        mean=MEAN,
        std=STD,
    )
    assert np.abs(got - reference(model, img, halo=1)).max() > 1e-3


def test_results_do_not_depend_on_tile_size(image: np.ndarray) -> None:
    model = conv_net()
    ref = reference(model, image, halo=8)
    for tile in (128, 256, 512):
        got = predict_array(
            ArrayReader(image),
            model,
            Window(0, 0, *image.shape[1:]),
            options=opts(tile=tile, halo=8),
            mean=MEAN,
            std=STD,
        )
        assert np.abs(got - ref).max() <= TOL, tile


def test_window_inside_image_equals_that_part_of_whole_run(
    image: np.ndarray, tmp_path: Path
) -> None:
    model = conv_net()
    ref = reference(model, image, halo=5)
    region = Window(37, 51, 101, 90)
    got = predict_array(
        ArrayReader(image), model, region, options=opts(tile=32, halo=5), mean=MEAN, std=STD
    )
    assert np.abs(got - ref[(slice(None), *region.slices)]).max() <= TOL
    # a standalone prediction store for the region: same labels, store pixel grid = region
    rep = predict_region(
        ArrayReader(image),
        model,
        region,
        tmp_path / "pred.zarr",
        options=opts(tile=32, halo=5),
        mean=MEAN,
        std=STD,
    )
    out = SceneStore.open(rep.store_path)
    assert rep.store_path == str(tmp_path / "pred.zarr")
    assert not (tmp_path / "pred.zarr.partial").exists()
    assert out.array("prediction/labels").shape == region.shape
    np.testing.assert_array_equal(
        out.array("prediction/labels")[...], ref[(slice(None), *region.slices)].argmax(0)
    )
    assert out.meta["prediction_store"]["source_window"] == {
        "row_off": 37,
        "col_off": 51,
        "height": 101,
        "width": 90,
    }


def test_strided_net_with_size_multiple(image: np.ndarray) -> None:
    """Window 60 + 2*8 = 76 is extended to 80 (multiple of 8) on its bottom/right side."""
    model = PoolNet().eval()
    img = image[:, :180, :150]
    ref = reference(model, img, halo=8)  # padded side 196 x 166: even, like every tile offset
    got = predict_array(
        ArrayReader(img),
        model,
        Window(0, 0, 180, 150),
        options=opts(tile=60, halo=8, size_multiple=8),
        mean=MEAN,
        std=STD,
    )
    assert np.abs(got - ref).max() <= TOL
    unpadded = torch.nn.Conv2d(3, 2, 3)  # output 2 pixels smaller than its input
    with pytest.raises(ConfigError, match="model output must be"):
        predict_array(
            ArrayReader(img),
            unpadded,
            Window(0, 0, 180, 150),
            options=opts(tile=60, halo=8),
            mean=MEAN,
            std=STD,
        )


def test_image_smaller_than_the_halo_is_mirrored_repeatedly(rng: np.random.Generator) -> None:
    img = rng.random((3, 5, 7), dtype=np.float32)
    model = conv_net()
    ref = reference(model, img, halo=12)  # np.pad(mode="reflect") reflects repeatedly too
    got = predict_array(
        ArrayReader(img),
        model,
        Window(0, 0, 5, 7),
        options=opts(tile=32, halo=12),
        mean=MEAN,
        std=STD,
    )
    assert np.abs(got - ref).max() <= TOL


@pytest.mark.parametrize(
    ("tta_set", "flips"),
    [("flips", ((), (2,), (1,), (1, 2))), ("horizontal", ((), (2,))), ("rot180", ((), (1, 2)))],
)
def test_flip_tta_is_still_seamless(
    image: np.ndarray, tta_set: str, flips: tuple[tuple[int, ...], ...]
) -> None:
    """Each TTA set is the mean of whole-image predictions of its flipped copies (numpy)."""
    model = conv_net()
    img = image[:, :96, :80]
    refs = []
    for dims in flips:  # dims of (band, y, x): 2 is left-right, 1 up-down
        flipped = np.flip(img, dims) if dims else img
        p = reference(model, np.ascontiguousarray(flipped), halo=6)
        refs.append(np.flip(p, dims) if dims else p)
    ref = sum(refs) / len(flips)
    got = predict_array(
        ArrayReader(img),
        model,
        Window(0, 0, 96, 80),
        options=opts(tile=32, halo=6, tta_flips=True, tta_set=tta_set),
        mean=MEAN,
        std=STD,
    )
    assert np.abs(got - ref).max() <= TOL


# ------------------------------------------------------------------------------- gaussian
@pytest.mark.parametrize(("halo", "overlap"), [(0, 0.5), (8, 0.25), (8, 0.5)])
def test_gaussian_matches_monai_sliding_window(
    image: np.ndarray, halo: int, overlap: float
) -> None:
    from monai.inferers import sliding_window_inference

    model = conv_net()
    window = 64 + 2 * halo
    got = predict_array(
        ArrayReader(image),
        model,
        Window(0, 0, *image.shape[1:]),
        options=opts(tile=64, halo=halo, mode="gaussian", overlap=overlap),
        mean=MEAN,
        std=STD,
    )
    x = np.pad(image, ((0, 0), (halo, halo), (halo, halo)), mode="reflect")
    x = (x - np.reshape(MEAN, (-1, 1, 1))) / np.reshape(STD, (-1, 1, 1))
    with torch.inference_mode():
        theirs = sliding_window_inference(
            torch.from_numpy(x.astype(np.float32))[None],
            (window, window),
            4,
            lambda t: torch.softmax(model(t), 1),
            overlap=overlap,
            mode="gaussian",
            padding_mode="reflect",
        )[0].numpy()
    theirs = theirs[:, halo : halo + image.shape[1], halo : halo + image.shape[2]]
    diff = float(np.abs(got - theirs).max())
    print(f"gaussian halo {halo} overlap {overlap}: max |ours - MONAI| = {diff:.2e}")
    assert diff <= TOL


def test_gaussian_region_and_strips_do_not_change_results(image: np.ndarray) -> None:
    model = conv_net()
    full = Window(0, 0, *image.shape[1:])
    o = dict(tile=32, halo=4, mode="gaussian", overlap=0.5)
    whole = predict_array(ArrayReader(image), model, full, options=opts(**o), mean=MEAN, std=STD)
    region = Window(45, 30, 77, 101)
    part = predict_array(
        ArrayReader(image), model, region, options=opts(**o, strip_width=16), mean=MEAN, std=STD
    )
    assert np.abs(part - whole[(slice(None), *region.slices)]).max() <= TOL


def test_each_reader_thread_reads_its_own_column_band(image: np.ndarray) -> None:
    """Windows that share source tiles go to one reader thread (one handle, one block
    cache); the strip is split evenly between the readers; results do not change."""
    import threading

    seen: dict[int, set[str]] = {}

    class Recording(ArrayReader):
        def read_with_valid(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
            name = threading.current_thread().name
            if name != "MainThread":  # not the probe forward that fixes the class count
                seen.setdefault(window.col_off, set()).add(name)
            return super().read_with_valid(window)

    model = conv_net()
    full = Window(0, 0, *image.shape[1:])
    o = dict(tile=16, halo=4, read_workers=2, strip_width=128)  # 8 units per strip
    got = predict_array(Recording(image), model, full, options=opts(**o), mean=MEAN, std=STD)
    assert np.abs(got - reference(model, image, 4)).max() <= TOL
    assert reader_band(128, 2, 16) == 64
    for col, names in seen.items():
        assert len(names) == 1, (col, names)  # every window of a column: one thread
        band = (col + 4) // 64
        assert all(n.startswith(f"segflow-read{band % 2}") for n in names), (col, names)
    assert len({n for names in seen.values() for n in names}) == 2


def test_gaussian_into_sharded_store_with_narrow_strips(image: np.ndarray, tmp_path: Path) -> None:
    model = Counting(conv_net())
    store = scene(tmp_path, image, chunk=32, shard=64)
    o = dict(tile=48, halo=8, mode="gaussian", probability_dtype="float16")
    wide = predict_region(
        StoreReader(store),
        model,
        Window(0, 0, *image.shape[1:]),
        store,
        options=opts(**o),
        mean=MEAN,
        std=STD,
    )
    first = store.array("prediction/probabilities")[...]
    store2 = scene(tmp_path, image, chunk=32, shard=64, name="s2.zarr")
    narrow = predict_region(
        StoreReader(store2),
        model,
        Window(0, 0, *image.shape[1:]),
        store2,
        options=opts(**o, strip_width=64),
        mean=MEAN,
        std=STD,
    )
    np.testing.assert_array_equal(store2.array("prediction/probabilities")[...], first)
    # strips of one shard recompute the windows that straddle strip boundaries
    assert narrow.tiles > wide.tiles
    assert first.dtype == np.float16


# ------------------------------------------------------------------------------- store layouts
@pytest.mark.parametrize(
    ("chunk", "shard", "tile"), [(32, None, 32), (32, None, 96), (32, 128, 64), (40, None, 64)]
)
def test_tile_and_write_unit_alignments(
    image: np.ndarray, tmp_path: Path, chunk: int, shard: int | None, tile: int
) -> None:
    model = conv_net()
    ref = reference(model, image, halo=6)
    store = scene(tmp_path, image, chunk=chunk, shard=shard)
    predict_region(
        StoreReader(store),
        model,
        Window(0, 0, *image.shape[1:]),
        store,
        options=opts(tile=tile, halo=6, probability_dtype="float16"),
        mean=MEAN,
        std=STD,
    )
    probs = store.array("prediction/probabilities")[...].astype(np.float32)
    assert np.abs(probs - ref).max() <= 1e-3  # float16 rounding


@pytest.mark.parametrize(
    ("kw", "chunk", "classes", "unit"),
    [
        (dict(tile=1024, output="labels"), 512, 2, 2048),  # class ids + mask: 5 B a pixel
        (dict(tile=512, output="labels"), 512, 2, 1024),  # two tiles wide at most
        (dict(tile=256, output="labels"), 256, 2, 512),
        (dict(tile=1024, output="both"), 512, 2, 1024),  # float32 sums: 13 B a pixel
        (dict(tile=1024, output="labels", mode="gaussian"), 512, 2, 1024),  # blends sums
        (dict(tile=1024, output="labels", tta_flips=True), 512, 2, 1024),  # averages sums
        (dict(tile=1024, output="both"), 512, 100, 512),  # never below the chunk
    ],
)
def test_prediction_unit_is_the_largest_within_the_memory_budget(
    kw: dict[str, object], chunk: int, classes: int, unit: int
) -> None:
    options = opts(halo=8, **kw)
    got = prediction_unit(options, chunk=chunk, num_classes=classes)
    assert got == unit
    labels_only = kw["output"] == "labels" and "mode" not in kw and "tta_flips" not in kw
    per_pixel = 1 + (4 if labels_only else 4 * classes + 4)
    assert got == chunk or got**2 * per_pixel <= UNIT_BUDGET_BYTES  # an open unit's buffers


def test_region_in_scene_store_widens_to_whole_units(image: np.ndarray, tmp_path: Path) -> None:
    model = conv_net()
    ref = reference(model, image, halo=6)
    store = scene(tmp_path, image, chunk=64)
    rep = predict_region(
        StoreReader(store),
        model,
        Window(70, 10, 20, 60),
        store,
        options=opts(tile=64, halo=6, output="labels"),
        mean=MEAN,
        std=STD,
    )
    assert rep.units == 2 and rep.pixels == 2 * 64 * 64  # rows 64..128, cols 0..128
    labels = store.array("prediction/labels")[...]
    np.testing.assert_array_equal(labels[64:128, :128], ref[:, 64:128, :128].argmax(0))
    assert (labels[:64] == 255).all() and (labels[128:] == 255).all()  # untouched fill
    assert "prediction/probabilities" not in store.group


# ------------------------------------------------------------------------------- valid / nodata
def test_invalid_pixels_get_nodata_and_empty_units_skip_the_model(
    image: np.ndarray, tmp_path: Path
) -> None:
    valid = np.ones(image.shape[1:], bool)
    valid[:64, :64] = False  # one whole unit without data
    valid[100:110, 100:140] = False  # a hole inside other units
    store = scene(tmp_path, image, chunk=64, valid=valid)
    model = Counting(conv_net())
    rep = predict_region(
        StoreReader(store),
        model,
        Window(0, 0, *image.shape[1:]),
        store,
        options=opts(tile=64, halo=6, label_nodata=200),
        mean=MEAN,
        std=STD,
    )
    assert rep.empty_units == 1 and rep.units == 12
    assert model.tiles == 1 + 11  # one probe for the class count, then the 11 non-empty tiles
    labels = store.array("prediction/labels")[...]
    probs = store.array("prediction/probabilities")[...]
    assert (labels[~valid] == 200).all() and (probs[:, ~valid] == 0).all()
    ref = reference(conv_net(), image, halo=6, valid=valid)  # nodata pixels fed as the mean
    np.testing.assert_array_equal(labels[valid], ref.argmax(0)[valid])


def test_gaussian_skips_windows_without_valid_pixels_and_keeps_the_rest(
    image: np.ndarray, tmp_path: Path
) -> None:
    """Windows whose core is all nodata are not run; every valid pixel is unchanged."""
    valid = np.ones(image.shape[1:], bool)
    valid[:, :72] = False  # a nodata band: whole windows over it carry no valid pixel
    o = opts(tile=32, halo=4, mode="gaussian", overlap=0.5)
    full = Window(0, 0, *image.shape[1:])
    model = Counting(conv_net())
    store = scene(tmp_path, image, chunk=32, valid=valid)
    rep = predict_region(StoreReader(store), model, full, store, options=o, mean=MEAN, std=STD)
    # the engine feeds nodata pixels as the normalization mean: the same image, all valid,
    # with the mean at those pixels, gives the same probabilities everywhere else
    filled = np.where(valid, image, np.float32(MEAN).reshape(-1, 1, 1)).astype(image.dtype)
    dense = scene(tmp_path, filled, chunk=32, name="dense.zarr")
    all_tiles = predict_region(
        StoreReader(dense), Counting(conv_net()), full, dense, options=o, mean=MEAN, std=STD
    )
    assert 0 < rep.tiles < all_tiles.tiles and rep.empty_units > 0
    got = store.array("prediction/probabilities")[...]
    ref = dense.array("prediction/probabilities")[...]
    np.testing.assert_array_equal(got[:, valid], ref[:, valid])
    assert (got[:, ~valid] == 0).all()
    assert (store.array("prediction/labels")[...][~valid] == 255).all()


def test_label_dtype_and_binary_model(image: np.ndarray, tmp_path: Path) -> None:
    model = conv_net(classes=1)
    rep = predict_region(
        ArrayReader(image),
        model,
        Window(0, 0, 64, 64),
        tmp_path / "p.zarr",
        options=opts(tile=32, halo=4, label_nodata=65535),
        mean=MEAN,
        std=STD,
    )
    out = SceneStore.open(rep.store_path)
    assert rep.num_classes == 2  # one logit channel read as (1 - sigmoid, sigmoid)
    assert out.array("prediction/labels").dtype == np.uint16
    p = out.array("prediction/probabilities")[...].astype(int)
    assert (np.abs(p.sum(0) - 255) <= 1).all()


# ------------------------------------------------------------------------------- resume
class Stop(Exception):
    pass


def stop_after(n: int) -> Callable[[int, int], None]:
    calls = {"n": 0}

    def progress(done: int, total: int) -> None:
        calls["n"] += 1
        if calls["n"] >= n:
            raise Stop

    return progress


def test_killed_run_resumes_and_computes_only_missing_units(
    image: np.ndarray, tmp_path: Path
) -> None:
    region = Window(0, 0, *image.shape[1:])
    o = opts(tile=32, halo=6, batch_size=2)
    clean = scene(tmp_path, image, chunk=32, name="clean.zarr")
    predict_region(StoreReader(clean), conv_net(), region, clean, options=o, mean=MEAN, std=STD)

    store = scene(tmp_path, image, chunk=32)
    with pytest.raises(Stop):
        predict_region(
            StoreReader(store),
            conv_net(),
            region,
            store,
            options=o,
            mean=MEAN,
            std=STD,
            progress=stop_after(5),
        )
    done = store.progress("prediction/labels").done()
    total = len(store.grid)
    assert 5 <= len(done) < total
    assert not store.has("prediction/labels")

    model = Counting(conv_net())
    seen: list[tuple[int, int]] = []
    rep = predict_region(
        StoreReader(store),
        model,
        region,
        store,
        options=o,
        mean=MEAN,
        std=STD,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert rep.skipped_units == len(done)
    assert model.tiles == rep.tiles == total - len(done)  # tile = unit: one tile per unit
    assert seen[-1] == (total, total)
    for name in ("prediction/labels", "prediction/probabilities"):
        np.testing.assert_array_equal(store.array(name)[...], clean.array(name)[...])
    assert store.has("prediction/labels")

    # a re-run with the same inputs and parameters does nothing
    again = Counting(conv_net())
    rep = predict_region(StoreReader(store), again, region, store, options=o, mean=MEAN, std=STD)
    assert again.tiles == 0 and rep.units == 0 and rep.skipped_units == total


def test_lost_units_are_recomputed(image: np.ndarray, tmp_path: Path) -> None:
    region = Window(0, 0, *image.shape[1:])
    o = opts(tile=64, halo=6, mode="gaussian", overlap=0.5)
    store = scene(tmp_path, image, chunk=32)
    predict_region(StoreReader(store), conv_net(), region, store, options=o, mean=MEAN, std=STD)
    before = {n: store.array(n)[...] for n in ("prediction/labels", "prediction/probabilities")}
    # lose two units: their data and their progress markers
    marks = store.group["_segflow/progress/prediction/labels"]
    for r, c in ((1, 2), (4, 0)):
        w = store.grid.window(r, c)
        store.array("prediction/labels")[w.slices] = 0
        store.array("prediction/probabilities")[(slice(None), *w.slices)] = 7
        marks[r, c] = 0
    model = Counting(conv_net())
    rep = predict_region(StoreReader(store), model, region, store, options=o, mean=MEAN, std=STD)
    assert rep.units == 2
    # only the windows overlapping those two units ran
    layout = build_layout(o, *image.shape[1:])
    needed = {
        t.index for r, c in ((1, 2), (4, 0)) for t in layout.touching(store.grid.window(r, c))
    }
    assert model.tiles == rep.tiles == len(needed) < len(layout)
    for name, arr in before.items():
        np.testing.assert_array_equal(store.array(name)[...], arr)


def test_changed_parameters_recompute_everything(image: np.ndarray, tmp_path: Path) -> None:
    region = Window(0, 0, *image.shape[1:])
    store = scene(tmp_path, image, chunk=64)
    predict_region(
        StoreReader(store),
        conv_net(),
        region,
        store,
        options=opts(tile=64, halo=6),
        mean=MEAN,
        std=STD,
    )
    rep = predict_region(
        StoreReader(store),
        conv_net(seed=3),
        region,
        store,
        options=opts(tile=64, halo=6),
        mean=MEAN,
        std=STD,
    )
    assert rep.skipped_units == 0 and rep.units == len(store.grid)
    ref = reference(conv_net(seed=3), image, halo=6)
    np.testing.assert_array_equal(store.array("prediction/labels")[...], ref.argmax(0))


def test_standalone_store_resumes_from_partial(image: np.ndarray, tmp_path: Path) -> None:
    region = Window(20, 8, 150, 130)
    geo = GeoRef("LOCAL_CS[]", None, (1000.0, 2.0, 0.0, 5000.0, 0.0, -2.0))
    path = tmp_path / "pred.zarr"
    store = open_prediction_store(path, region, chunk=32, georef=geo)
    assert store.path == tmp_path / "pred.zarr.partial"
    assert store.georef is not None
    assert store.georef.geotransform == (1016.0, 2.0, 0.0, 4960.0, 0.0, -2.0)
    o = opts(tile=32, halo=6)
    with pytest.raises(Stop):
        predict_region(
            ArrayReader(image),
            conv_net(),
            region,
            store,
            options=o,
            mean=MEAN,
            std=STD,
            progress=stop_after(3),
        )
    assert not path.exists() and (tmp_path / "pred.zarr.partial").is_dir()
    rep = predict_region(
        ArrayReader(image), conv_net(), region, path, options=o, mean=MEAN, std=STD
    )
    assert rep.skipped_units >= 3 and rep.store_path == str(path)
    out = SceneStore.open(path)
    assert out.has("prediction/labels") and out.has("valid")
    assert out.array("valid")[...].all()
    ref = reference(conv_net(), image, halo=6)
    np.testing.assert_array_equal(
        out.array("prediction/labels")[...], ref[(slice(None), *region.slices)].argmax(0)
    )
    with pytest.raises(StoreError, match="source window"):
        open_prediction_store(path, Window(0, 0, 10, 10))


def test_a_store_killed_while_being_set_up_is_made_anew(tmp_path: Path) -> None:
    """kill -9 between creating the staging store and recording its source window (or before
    its attributes): the next call starts it anew; a finished store without one is refused."""
    import shutil

    import zarr

    region = Window(20, 8, 150, 130)
    path = tmp_path / "pred.zarr"
    SceneStore.create(tmp_path / "pred.zarr.partial", bands=(), height=9, width=9, dtype="uint8")
    store = open_prediction_store(path, region, chunk=32)
    assert (store.height, store.width) == (150, 130)
    assert store.meta["prediction_store"]["source_window"]["row_off"] == 20
    shutil.rmtree(store.path)
    zarr.open_group(store.path, mode="w", zarr_format=3)  # no attributes yet
    assert open_prediction_store(path, region, chunk=32).height == 150
    SceneStore.create(path, bands=(), height=150, width=130, dtype="uint8")  # finished
    with pytest.raises(StoreError, match="source window None"):
        open_prediction_store(path, region, chunk=32)


# ------------------------------------------------------------------------------- bad input
def test_bad_inputs_fail_with_one_clear_line(image: np.ndarray, tmp_path: Path) -> None:
    reader = ArrayReader(image)
    assert isinstance(reader, WindowReader)
    full = Window(0, 0, *image.shape[1:])
    good = opts(tile=32, halo=4)
    cases: list[tuple[type[Exception], str, Callable[[], object]]] = [
        (
            RegionError,
            "empty",
            lambda: predict_region(
                reader,
                conv_net(),
                Window(0, 0, 0, 5),
                tmp_path / "a",
                options=good,
                mean=MEAN,
                std=STD,
            ),
        ),
        (
            RegionError,
            "not inside the image",
            lambda: predict_region(
                reader,
                conv_net(),
                Window(190, 0, 20, 5),
                tmp_path / "b",
                options=good,
                mean=MEAN,
                std=STD,
            ),
        ),
        (
            ConfigError,
            "3 bands",
            lambda: predict_region(
                reader, conv_net(), full, tmp_path / "c", options=good, mean=[0.5], std=[1.0]
            ),
        ),
        (
            ConfigError,
            "std must be finite and > 0",
            lambda: predict_region(
                reader,
                conv_net(),
                full,
                tmp_path / "d",
                options=good,
                mean=MEAN,
                std=[1.0, 0.0, 1.0],
            ),
        ),
        (ConfigError, "twice the halo", lambda: opts(tile=32, halo=20)),
        (ConfigError, "overlap", lambda: opts(tile=32, halo=4, overlap=1.5)),
        (ConfigError, "gaussian' only", lambda: opts(tile=32, halo=4, window=64)),
        (
            ConfigError,
            "is a class id",
            lambda: predict_region(
                reader,
                conv_net(),
                full,
                tmp_path / "e",
                options=opts(tile=32, halo=4, label_nodata=1),
                mean=MEAN,
                std=STD,
            ),
        ),
        (
            ConfigError,
            "CUDA is not available",
            lambda: predict_array(
                reader,
                conv_net(),
                full,
                options=opts(tile=32, halo=4, device="cuda"),
                mean=MEAN,
                std=STD,
            ),
        )
        if not torch.cuda.is_available()
        else (
            ConfigError,
            "unknown device",
            lambda: predict_array(
                reader,
                conv_net(),
                full,
                options=opts(tile=32, halo=4, device="tpu"),
                mean=MEAN,
                std=STD,
            ),
        ),
        (
            StoreError,
            "is 10 x 10 pixels",
            lambda: predict_region(
                reader,
                conv_net(),
                full,
                SceneStore.create(
                    tmp_path / "small.zarr", bands=("a",), height=10, width=10, dtype="uint8"
                ),
                options=good,
                mean=MEAN,
                std=STD,
            ),
        ),
    ]
    for kind, match, call in cases:
        with pytest.raises(kind, match=match) as info:
            call()
        assert "\n" not in str(info.value)
    for name in "abcd":
        assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.partial").exists()


@pytest.mark.parametrize("classes", [1, 2, 3, 7, 300])
def test_labels_equal_the_argmax_of_the_probabilities(classes: int) -> None:
    """Class ids from logits: numpy's argmax of the softmax (sigmoid for one channel),
    ties to the lower id, uint8 up to 256 classes."""
    from segflow.infer.forward import _labels, _probabilities

    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(2, classes, 9, 11, generator=g)
    if classes > 1:
        logits[0, 1] = logits[0, 0]  # exact ties
    got = _labels(logits).numpy()
    probs = _probabilities(logits).numpy()
    want = probs.argmax(1) if classes > 1 else (logits[:, 0] > 0).numpy()
    np.testing.assert_array_equal(got, want)
    assert got.dtype == (np.uint8 if classes <= 256 else np.int32)
