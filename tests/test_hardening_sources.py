"""Hostile sources: non-finite pixels are nodata everywhere; header sizes meet a pixel budget.

* A float GeoTIFF with NaN, +inf and -inf pixels is compared with its *twins*: the same image
  with those pixels holding a finite value flagged nodata, once by a nodata value and once by
  an internal GDAL mask. Ingest, the fingerprint and segment_region must not tell them apart.
* A TIFF of a few hundred bytes whose header claims 10^6 x 10^6 pixels is refused from its
  header, in milliseconds and with no memory growth; a sparse gigapixel GeoTIFF still opens.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import tiff_header_bomb
from rasterio.transform import from_origin
from rasterio.windows import Window as RWindow

from segflow.config import ClassDef, PrepareConfig
from segflow.errors import ConfigError, SourceError
from segflow.geometry import Window
from segflow.ingest import IngestSpec, check_inputs, ingest
from segflow.io.sources import (
    DEFAULT_MAX_PIXELS,
    ENV_MAX_PIXELS,
    declared_size,
    max_pixels,
    open_source,
)
from segflow.io.store import SceneStore, staging_path
from segflow.prepare import compute_fingerprint
from segflow.segment import SegmentRequest, segment_region
from segflow.train.checkpoint import build_meta, save_checkpoint
from segflow.train.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
BOMB_SIDE = 10**6

# ------------------------------------------------------------------------ non-finite pixels
H, W = 80, 112
CLASSES = (ClassDef(id=0, name="background"), ClassDef(id=1, name="thing"))
CFG = ModelConfig(
    arch="unet", in_channels=1, out_channels=2, features=8, depth=2, num_res_units=0, norm="none"
)
PROFILE = {
    "driver": "GTiff",
    "height": H,
    "width": W,
    "count": 1,
    "dtype": "float32",
    "crs": "EPSG:32616",
    "transform": from_origin(733600.0, 3725000.0, 0.5, 0.5),
    "tiled": True,
    "blockxsize": 32,
    "blockysize": 32,
}


def _bad_pixels() -> dict[str, np.ndarray]:
    """Where the NaN, +inf and -inf pixels go: single pixels, a block, edges and tile seams."""
    masks = {k: np.zeros((H, W), bool) for k in ("nan", "posinf", "neginf")}
    masks["nan"][10:13, 40:43] = True  # a 3x3 hole
    masks["nan"][0, 0] = True  # a corner: its mirrored halo must not see NaN either
    masks["nan"][31:33, 60] = True  # across a 32-pixel tile seam
    masks["posinf"][50, 20] = True
    masks["posinf"][H - 1, 70:74] = True  # the bottom edge
    masks["neginf"][64, 95] = True
    masks["neginf"][20:22, W - 1] = True  # the right edge
    return masks


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | np.ndarray]:
    """``nan.tif`` (NaN/inf pixels, no nodata) and its twins flagged nodata by value and by mask."""
    d = tmp_path_factory.mktemp("twins")
    base = np.random.default_rng(3).normal(0.5, 0.25, (H, W)).astype(np.float32)
    masks = _bad_pixels()
    bad = masks["nan"] | masks["posinf"] | masks["neginf"]

    nan_img = base.copy()
    nan_img[masks["nan"]] = np.nan
    nan_img[masks["posinf"]] = np.inf
    nan_img[masks["neginf"]] = -np.inf
    with rasterio.open(d / "nan.tif", "w", **PROFILE) as dst:
        dst.write(nan_img[None])

    by_value = np.where(bad, np.float32(-9999.0), base)
    with rasterio.open(d / "nodata.tif", "w", **PROFILE, nodata=-9999.0) as dst:
        dst.write(by_value[None])

    by_mask = np.where(bad, np.float32(3.5), base)  # a plausible value, hidden by the mask
    with (
        rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
        rasterio.open(d / "masked.tif", "w", **PROFILE) as dst,
    ):
        dst.write(by_mask[None])
        dst.write_mask(np.where(bad, 0, 255).astype(np.uint8))

    torch.manual_seed(0)
    model = build_model(CFG).eval()
    meta = build_meta(CFG, bands=("pan",), mean=[0.5], std=[0.25], tile=32, classes=CLASSES)
    save_checkpoint(d / "model", model, meta)
    return {
        "nan": d / "nan.tif",
        "nodata": d / "nodata.tif",
        "masked": d / "masked.tif",
        "model": d / "model",
        "bad": bad,
    }


def test_sources_mark_non_finite_pixels_invalid(twins: dict[str, Path | np.ndarray]) -> None:
    bad = twins["bad"]
    assert isinstance(bad, np.ndarray)
    full = Window(0, 0, H, W)
    masks = {}
    for name in ("nan", "nodata", "masked"):
        with open_source(twins[name]) as src:  # type: ignore[arg-type]
            _, valid = src.read_with_valid(full)
            np.testing.assert_array_equal(src.read_valid(full), valid)
            # a window that is not block-aligned gives the same answer
            w = Window(9, 37, 30, 41)
            np.testing.assert_array_equal(src.read_with_valid(w)[1], valid[w.slices])
        masks[name] = valid
    np.testing.assert_array_equal(masks["nan"], ~bad)
    np.testing.assert_array_equal(masks["nodata"], masks["nan"])
    np.testing.assert_array_equal(masks["masked"], masks["nan"])


def test_ingest_and_fingerprint_count_non_finite_as_nodata(
    twins: dict[str, Path | np.ndarray], tmp_path: Path
) -> None:
    bad = twins["bad"]
    assert isinstance(bad, np.ndarray)
    stores = {}
    for name in ("nan", "nodata"):
        ingest(IngestSpec(source=str(twins[name]), out=str(tmp_path / f"{name}.zarr"), chunk=32))
        stores[name] = SceneStore.open(tmp_path / f"{name}.zarr")
    valid = np.asarray(stores["nan"].array("valid")[...])
    np.testing.assert_array_equal(valid, ~bad)
    np.testing.assert_array_equal(valid, np.asarray(stores["nodata"].array("valid")[...]))

    fps = {n: compute_fingerprint(s, PrepareConfig(), {}, {}) for n, s in stores.items()}
    got, twin = fps["nan"], fps["nodata"]
    assert got.nodata_fraction == pytest.approx(bad.mean(), abs=1e-12)
    assert got.train_pixels == int((~bad).sum())
    for key in ("mean", "std", "min", "max", "p0_5", "p99_5"):
        values = getattr(got, key)
        assert all(np.isfinite(values)), (key, values)
        assert values == getattr(twin, key), key
    assert got.nodata_fraction == twin.nodata_fraction


def _segment(image: Path, model: Path, out: Path) -> np.ndarray:
    segment_region(
        SegmentRequest(image=str(image), model=str(model), out=str(out), tile=32, batch_size=4)
    )
    with rasterio.open(out) as cog:
        assert cog.nodata == 255
        return np.asarray(cog.read(1))


def test_segment_region_non_finite_equals_masked_nodata_twins(
    twins: dict[str, Path | np.ndarray], tmp_path: Path
) -> None:
    """NaN/inf pixels get 255, and every label equals the runs where they are nodata by value
    or by mask (so the non-finite values never reached the model, not even as context)."""
    bad = twins["bad"]
    model = twins["model"]
    assert isinstance(bad, np.ndarray) and isinstance(model, Path)
    labels = {}
    for name in ("nan", "nodata", "masked"):
        labels[name] = _segment(twins[name], model, tmp_path / f"{name}.tif")  # type: ignore[arg-type]
    np.testing.assert_array_equal(labels["nan"] == 255, bad)
    np.testing.assert_array_equal(labels["nan"], labels["nodata"])
    np.testing.assert_array_equal(labels["nan"], labels["masked"])

    # the same through a scene store (the engine's store reader)
    ingest(IngestSpec(source=str(twins["nan"]), out=str(tmp_path / "nan.zarr"), chunk=32))
    from_store = _segment(tmp_path / "nan.zarr", model, tmp_path / "store.tif")
    np.testing.assert_array_equal(from_store, labels["nan"])


def test_engine_never_feeds_non_finite_values(tmp_path: Path) -> None:
    """In-memory arrays too: NaN pixels reach the model as 0 (the normalization mean)."""
    from segflow.infer import ArrayReader, InferenceOptions, predict_array

    seen: list[torch.Tensor] = []

    class Spy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.clone())
            return self.conv(x)

    image = np.random.default_rng(0).random((1, 40, 40), dtype=np.float32)
    image[0, 5:8, 30] = np.nan
    image[0, 20, 0] = np.inf
    opts = InferenceOptions(tile=16, halo=2, device="cpu", batch_size=4)
    got = predict_array(
        ArrayReader(image), Spy(), Window(0, 0, 40, 40), options=opts, mean=[0.5], std=[0.25]
    )
    assert np.isfinite(got).all()
    assert seen and all(bool(torch.isfinite(x).all()) for x in seen)


# ------------------------------------------------------------------------------ pixel budget
def _vrt_bomb(path: Path) -> Path:
    path.write_text(
        f'<VRTDataset rasterXSize="{BOMB_SIDE}" rasterYSize="{BOMB_SIDE}">\n'
        '  <VRTRasterBand dataType="Byte" band="1"/>\n</VRTDataset>\n'
    )
    return path


def _png_bomb(path: Path) -> Path:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(1 << 20), 9)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


BOMBS: dict[str, Callable[[Path], Path]] = {
    "tiff": lambda d: tiff_header_bomb(d / "bomb.tif", side=BOMB_SIDE),
    "bigtiff": lambda d: tiff_header_bomb(d / "bomb_big.tif", side=BOMB_SIDE, big=True),
    "vrt": lambda d: _vrt_bomb(d / "bomb.vrt"),
    "png": lambda d: _png_bomb(d / "bomb.png"),
}


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_header_bomb_refused_before_reading(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_MAX_PIXELS, raising=False)
    bomb = BOMBS[kind](tmp_path)
    assert bomb.stat().st_size < 16_000
    assert declared_size(bomb) == (BOMB_SIDE, BOMB_SIDE)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(SourceError) as err:
            open_source(bomb)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(err.value)
    assert "\n" not in msg
    assert str(bomb) in msg and f"{BOMB_SIDE} x {BOMB_SIDE} = {BOMB_SIDE**2} pixels" in msg
    assert f"limit of {DEFAULT_MAX_PIXELS}" in msg and ENV_MAX_PIXELS in msg
    assert seconds < 2.0 and peak < 20 * 2**20, (seconds, peak)


def test_budget_keyword_and_environment(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tif = samples / "landsat" / "RGB.byte.tif"
    with open_source(tif) as src:
        n = src.info.width * src.info.height
    with open_source(tif, max_pixels=n):
        pass  # exactly at the limit is allowed
    with pytest.raises(SourceError, match=f"= {n} pixels, over the limit of {n - 1} "):
        open_source(tif, max_pixels=n - 1)
    with pytest.raises(ConfigError, match="max_pixels"):
        open_source(tif, max_pixels=0)
    with pytest.raises(SourceError, match="over the limit"):  # the ingest spec passes it on
        check_inputs(IngestSpec(source=str(tif), out=str(tmp_path / "o.zarr"), max_pixels=n - 1))

    monkeypatch.setenv(ENV_MAX_PIXELS, str(n - 1))
    assert max_pixels() == n - 1
    with pytest.raises(SourceError, match=f"set {ENV_MAX_PIXELS}={n} "):
        open_source(tif)
    bomb = tiff_header_bomb(tmp_path / "bomb.tif", side=BOMB_SIDE)
    monkeypatch.setenv(ENV_MAX_PIXELS, "1e12")  # the user vouches for it: the header passes
    with open_source(bomb) as src:
        assert (src.info.height, src.info.width) == (BOMB_SIDE, BOMB_SIDE)
    monkeypatch.setenv(ENV_MAX_PIXELS, "lots")
    with pytest.raises(ConfigError, match=ENV_MAX_PIXELS):
        open_source(tif)


def test_ingest_cli_refuses_header_bomb_at_once(tmp_path: Path) -> None:
    """exit 2, one ``error:`` line, small peak memory, nothing at --out (flows/ingest.py)."""
    bomb = tiff_header_bomb(tmp_path / "bomb.tif", side=BOMB_SIDE)
    out = tmp_path / "x.zarr"
    # a wrapper process, so RUSAGE_CHILDREN sees the command alone
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=240)\n"
        "sys.stdout.write(f'{p.returncode} {time.perf_counter() - t:.3f} '\n"
        "    f'{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n')\n"
        "sys.stderr.write(p.stderr)\n"
    )
    env = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        ENV_MAX_PIXELS: "",
    }
    cmd = [sys.executable, str(ROOT / "flows" / "ingest.py"), str(bomb), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    rc, seconds, max_rss_kib = proc.stdout.split()
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert int(rc) == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "1000000 x 1000000" in lines[0] and ENV_MAX_PIXELS in lines[0]
    assert int(max_rss_kib) < 300 * 1024, max_rss_kib  # Linux: KiB
    # the command's own start-up (Prefect, Dask, torch imports) dominates; the check is
    # measured in-process by test_header_bomb_refused_before_reading
    assert float(seconds) < 120, seconds
    assert not out.exists() and not staging_path(out).exists()


def test_sparse_gigapixel_geotiff_is_accepted(tmp_path: Path) -> None:
    """32768 x 32768 (1.07 gigapixels, tiny on disk: sparse tiles) is under the default budget."""
    side = 32768
    path = tmp_path / "giga.tif"
    tile = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=side,
        width=side,
        count=1,
        dtype="uint16",
        crs="EPSG:32616",
        transform=from_origin(700000.0, 3800000.0, 1.0, 1.0),
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
        sparse_ok=True,
    ) as dst:
        dst.write(tile[None], window=RWindow(20480, 10240, 256, 256))
    assert path.stat().st_size < 2**20
    assert side * side < DEFAULT_MAX_PIXELS
    assert declared_size(path) == (side, side)
    with open_source(path) as src:
        assert (src.info.height, src.info.width) == (side, side)
        np.testing.assert_array_equal(src.read(Window(10240, 20480, 256, 256))[0], tile)
        assert not src.read(Window(0, 0, 64, 64)).any()  # a tile never written reads as 0
    info = check_inputs(IngestSpec(source=str(path), out=str(tmp_path / "giga.zarr")))
    assert (info.height, info.width) == (side, side)
