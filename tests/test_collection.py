"""segment_collection: the bundled chip cut into 16 overlapping scenes; the mosaic against one
segment_region over the whole chip; a corrupt scene isolated; finished scenes skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from rasterio.windows import Window as RWindow

from segflow.config import ClassDef
from segflow.config.collection import CollectionRequest
from segflow.errors import ConfigError
from segflow.segment import SegmentRequest, segment_region
from segflow.stages.collection import list_scenes, segment_collection
from segflow.train.checkpoint import build_meta, save_checkpoint
from segflow.train.models import ModelConfig, build_model

CLASSES = (ClassDef(id=0, name="background"), ClassDef(id=1, name="building", color="#ff3030"))
#: norm none: the network is tile independent; halo 8, size multiple 4 (build_meta measures)
CFG = ModelConfig(arch="unet", in_channels=1, out_channels=2, features=4, depth=2,
                  num_res_units=0, norm="none")  # fmt: skip
#: scene starts on the chip, multiples of the size multiple; each scene runs 24 px (3 halos)
#: into the next, so overlaps are >= twice the halo
STARTS = (0, 220, 440, 660)
OVERLAP = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)  # untrained: a speckled mask, many polygons
    meta = build_meta(CFG, bands=("pan",), mean=[300.0], std=[150.0], tile=256, classes=CLASSES)
    assert (meta.halo, meta.size_multiple) == (8, 4) and 2 * meta.halo <= OVERLAP
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(path, build_model(CFG), meta)
    return path


def cut_scenes(chip: Path, folder: Path) -> list[Path]:
    """The chip as 4 x 4 GeoTIFF scenes (like ``gdal_translate -srcwin``), overlapping."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with rasterio.open(chip) as src:
        ends = [*(s + OVERLAP for s in STARTS[1:]), src.width]
        for i, (r0, r1) in enumerate(zip(STARTS, ends, strict=True)):
            for j, (c0, c1) in enumerate(zip(STARTS, ends, strict=True)):
                win = RWindow(c0, r0, c1 - c0, r1 - r0)
                profile = dict(src.profile, height=r1 - r0, width=c1 - c0,
                               transform=src.window_transform(win), tiled=False)  # fmt: skip
                path = folder / f"r{i}c{j}.tif"
                with rasterio.open(path, "w", **profile) as dst:
                    dst.write(src.read(window=win))
                out.append(path)
    return out


def test_mosaic_of_16_overlapping_scenes_equals_one_run_over_the_chip(
    samples: Path, model_dir: Path, tmp_path: Path
) -> None:
    chip = samples / "spacenet_atlanta" / "sample_geotiff.tif"
    cut_scenes(chip, tmp_path / "scenes")
    whole = tmp_path / "whole"
    whole.mkdir()
    ref = segment_region(SegmentRequest(image=str(chip), model=str(model_dir), tile=256,
                                        out=str(whole / "m.tif"), polygons=str(whole / "m.gpkg")))  # fmt: skip
    req = CollectionRequest(scenes=str(tmp_path / "scenes" / "*.tif"), model=str(model_dir),
                            out_dir=str(tmp_path / "out"), tile=256, parquet=True)  # fmt: skip
    report = segment_collection(req)
    assert [s.status for s in report.scenes] == ["done"] * 16

    with rasterio.open(report.outputs["mosaic"]) as got, rasterio.open(whole / "m.tif") as want:
        assert (got.crs, got.transform, got.shape) == (want.crs, want.transform, want.shape)
        np.testing.assert_array_equal(got.read(), want.read())
    # the polygon layer: objects crossing scene edges are one feature, as in the whole run
    merged, single = (
        gpd.read_file(report.outputs["mosaic_polygons"]),
        gpd.read_file(whole / "m.gpkg"),
    )
    assert len(merged) == len(single) == ref.polygons > 100
    assert merged.geometry.area.sum() == pytest.approx(single.geometry.area.sum(), rel=1e-12)
    assert len(gpd.read_parquet(report.outputs["mosaic_parquet"])) == len(single)
    # the rule matters: an inner scene's own prediction differs from the whole run near its
    # edges (mirror padding), so a mosaic taking any pixel from any scene would not be equal
    own_path = req.scene_dir("r1c1") + "/prediction.tif"
    with rasterio.open(own_path) as own, rasterio.open(whole / "m.tif") as want:
        inner = want.read(1, window=RWindow(STARTS[1], STARTS[1], own.width, own.height))
        assert (own.read(1) != inner).any()
    table = pd.read_csv(report.outputs["summary_csv"], keep_default_na=False)
    assert list(table["status"]) == ["done"] * 16 and table["area_building"].sum() > 0
    assert table["area_unit"].unique().tolist() == ["m^2"]
    pd.testing.assert_frame_equal(pd.read_parquet(report.outputs["summary_parquet"]), table,
                                  check_dtype=False)  # fmt: skip

    again = segment_collection(req)  # every scene current: none is redone
    assert [s.status for s in again.scenes] == ["skipped"] * 16
    with rasterio.open(again.outputs["mosaic"]) as got, rasterio.open(whole / "m.tif") as want:
        np.testing.assert_array_equal(got.read(), want.read())


def test_a_truncated_scene_fails_alone(samples: Path, model_dir: Path, tmp_path: Path) -> None:
    chip = samples / "spacenet_atlanta" / "sample_geotiff.tif"
    scenes = cut_scenes(chip, tmp_path / "scenes")[:3]
    raw = scenes[1].read_bytes()
    scenes[1].write_bytes(raw[: len(raw) // 3])
    rgb = tmp_path / "scenes" / "rgb.tif"  # three bands for a one-band model
    with rasterio.open(scenes[0]) as src:
        profile = dict(src.profile, count=3)
        with rasterio.open(rgb, "w", **profile) as dst:
            dst.write(np.repeat(src.read(), 3, axis=0))
    listing = tmp_path / "scenes.txt"
    listing.write_text("".join(f"scenes/{p.name}\n" for p in [*scenes, rgb]) + "scenes/gone.tif\n")
    req = CollectionRequest(scenes=str(listing), model=str(model_dir), out_dir=str(tmp_path / "o"),
                            tile=256, polygons=False)  # fmt: skip
    report = segment_collection(req)
    status = {s.name: (s.status, s.reason) for s in report.scenes}
    assert status["r0c0"][0] == status["r0c2"][0] == "done"
    assert status["r0c1"][0] == "failed" and "truncated" in status["r0c1"][1]
    assert status["rgb"][0] == "failed" and "the model expects 1 band(s)" in status["rgb"][1]
    assert status["gone"][0] == "failed" and "not found" in status["gone"][1]
    assert [s.name for s in report.failed] == ["r0c1", "rgb", "gone"]
    table = pd.read_csv(report.outputs["summary_csv"])
    assert table.set_index("name").loc["r0c1", "status"] == "failed"
    assert "mosaic" in report.outputs  # of the scenes that finished


def test_scene_lists_and_their_errors(tmp_path: Path, model_dir: Path) -> None:
    for name in ("a.tif", "b.tif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "l.csv").write_text("id,image\n1,a.tif\n2,b.tif\n")
    req = CollectionRequest(scenes=str(tmp_path / "l.csv"), model=str(model_dir), out_dir="o")
    assert [(s.name, Path(s.image).name) for s in list_scenes(req)] == [
        ("a", "a.tif"),
        ("b", "b.tif"),
    ]
    with pytest.raises(ConfigError, match="names no image"):
        list_scenes(req.model_copy(update={"scenes": str(tmp_path / "*.png")}))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.tif").write_bytes(b"x")
    with pytest.raises(ConfigError, match="both go to folder 'a'"):
        list_scenes(req.model_copy(update={"scenes": str(tmp_path / "**" / "a.tif")}))
    named = req.model_copy(
        update={"scenes": str(tmp_path / "**" / "a.tif"), "name": "{index}_{stem}"}
    )
    assert [s.name for s in list_scenes(named)] == ["0_a", "1_a"]
    json.dumps([s.__dict__ for s in list_scenes(named)])


def _records(out: Path) -> int:
    return len(list(out.glob("*/stages/segment_region.json")))


def test_killed_after_half_the_scenes_the_same_command_redoes_none(
    samples: Path, model_dir: Path, tmp_path: Path
) -> None:
    """kill -9 once about half the scenes are recorded; the same command then skips every
    recorded scene (counted) and its mosaic equals an undisturbed run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    chip = samples / "spacenet_atlanta" / "sample_geotiff.tif"
    cut_scenes(chip, tmp_path / "scenes")
    out = tmp_path / "out"
    req = CollectionRequest(scenes=str(tmp_path / "scenes" / "*.tif"), model=str(model_dir),
                            out_dir=str(out), tile=256, polygons=False)  # fmt: skip
    code = ("import sys; from segflow.config.collection import CollectionRequest as R; "
            "from segflow.stages.collection import segment_collection as s; "
            "s(R.model_validate_json(sys.argv[1]))")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, req.model_dump_json()],
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while _records(out) < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _records(out)
    assert 8 <= done < 16, f"{done} scenes recorded when killed"

    resumed = segment_collection(req)
    statuses = [s.status for s in resumed.scenes]
    failed = [(s.name, s.reason) for s in resumed.scenes if s.status == "failed"]
    assert statuses.count("skipped") == done and statuses.count("done") == 16 - done, failed
    calm = segment_collection(req.model_copy(update={"out_dir": str(tmp_path / "calm")}))
    with rasterio.open(resumed.outputs["mosaic"]) as a, rasterio.open(calm.outputs["mosaic"]) as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_the_command_line_names_failed_scenes_and_exits_1(
    samples: Path, model_dir: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    scenes = cut_scenes(samples / "spacenet_atlanta" / "sample_geotiff.tif", tmp_path / "s")
    for extra in scenes[2:]:
        extra.unlink()
    scenes[0].write_bytes(scenes[0].read_bytes()[:500])
    flow = Path(__file__).resolve().parents[1] / "flows" / "segment_collection.py"
    r = subprocess.run(
        [sys.executable, str(flow), "--scenes", str(tmp_path / "s" / "*.tif"), "--model",
         str(model_dir), "--out-dir", str(tmp_path / "o"), "--tile", "256"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")},
    )  # fmt: skip
    assert r.returncode == 1, r.stderr[-2000:]
    assert "2 scenes: 1 done, 0 skipped, 1 failed" in r.stdout
    failed = [ln for ln in r.stderr.splitlines() if ln.startswith("failed: ")]
    assert len(failed) == 1 and "r0c0" in failed[0] and "truncated" in failed[0]
    assert (tmp_path / "o" / "r0c1" / "prediction.tif").is_file()


def test_scenes_in_several_crss_mosaic_only_into_one(
    samples: Path, model_dir: Path, tmp_path: Path
) -> None:
    """The scenes' predictions in two CRSs: refused without mosaic_crs (one line naming the
    option); with it, the mosaic lies in that CRS and matches one run over the chip (class
    ids moved by nearest neighbour: equal but for pixels along reprojected edges)."""
    chip = samples / "spacenet_atlanta" / "sample_geotiff.tif"
    cut_scenes(chip, tmp_path / "scenes")
    req = CollectionRequest(scenes=str(tmp_path / "scenes" / "*.tif"), model=str(model_dir),
                            out_dir=str(tmp_path / "out"), tile=256, polygons=False)  # fmt: skip
    same = segment_collection(req.model_copy(update={"mosaic_crs": "EPSG:32616"}))
    plain = segment_collection(req.model_copy(update={"out_dir": str(tmp_path / "plain")}))
    with rasterio.open(same.outputs["mosaic"]) as a, rasterio.open(plain.outputs["mosaic"]) as b:
        assert (a.crs, a.transform) == (b.crs, b.transform)  # the grid anchored at the origin
        np.testing.assert_array_equal(a.read(), b.read())  # a warp onto its own grid: exact

    # one scene's prediction moved into Web Mercator, as if it came from another source
    moved = Path(req.scene_dir("r0c0")) / "prediction.tif"
    _warp_file(moved, "EPSG:3857")
    from segflow.stages.collection import write_mosaic

    with pytest.raises(ConfigError, match="mosaic-crs") as err:
        write_mosaic(req, same.scenes)
    assert "\n" not in str(err.value)
    out = write_mosaic(req.model_copy(update={"mosaic_crs": "EPSG:32616"}), same.scenes)
    with rasterio.open(out["mosaic"]) as got, rasterio.open(plain.outputs["mosaic"]) as want:
        assert got.crs == want.crs and got.res == want.res
        # the moved scene's footprint grew by the round trip: compare on the chip's pixels
        col, row = ~got.transform * (want.transform.c, want.transform.f)
        assert (col, row) == (round(col), round(row))  # one pixel grid
        inner = got.read(1, window=RWindow(round(col), round(row), want.width, want.height))
        agree = (inner == want.read(1)).mean()
    assert agree > 0.99


def _warp_file(path: Path, crs: str) -> None:
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    with rasterio.open(path) as src:
        t, w, h = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
        profile = dict(src.profile, crs=crs, transform=t, width=w, height=h)
        data, colormap = src.read(), src.colormap(1)
        tags = src.tags()
        out = np.full((1, h, w), src.nodata, data.dtype)
        reproject(data, out, src_transform=src.transform, src_crs=src.crs, dst_transform=t,
                  dst_crs=crs, resampling=Resampling.nearest, dst_nodata=src.nodata)  # fmt: skip
    path.unlink()
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(out)
        dst.write_colormap(1, colormap)
        dst.update_tags(**tags)


def test_slides_report_tissue_areas_in_square_microns(samples: Path, tmp_path: Path) -> None:
    """Two small RGB slides (tiled TIFFs, 0.5 um per pixel): the summary gives each class's
    area in um^2 (pixels x 0.25) and its share of the slide; no mosaic without a CRS."""
    import tifffile

    rgb = tifffile.imread(samples / "cmu1_small_region" / "CMU-1-Small-Region.svs")
    (tmp_path / "slides").mkdir()
    for i, (r, c) in enumerate(((0, 0), (1024, 512))):
        tifffile.imwrite(tmp_path / "slides" / f"slide{i}.tif", rgb[r : r + 512, c : c + 512],
                         tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4),
                         resolutionunit="CENTIMETER")  # fmt: skip
    cfg = ModelConfig(arch="unet", in_channels=3, out_channels=2, features=4, depth=2,
                      num_res_units=0, norm="none")  # fmt: skip
    torch.manual_seed(1)
    meta = build_meta(cfg, bands=("red", "green", "blue"), mean=[180.0] * 3, std=[40.0] * 3,
                      tile=256, classes=(ClassDef(id=0, name="stroma"), ClassDef(id=1, name="tumour")))  # fmt: skip
    save_checkpoint(tmp_path / "rgb_model", build_model(cfg), meta)
    req = CollectionRequest(scenes=str(tmp_path / "slides" / "*.tif"), model=str(tmp_path / "rgb_model"),
                            out_dir=str(tmp_path / "out"), tile=256, polygons=False)  # fmt: skip
    report = segment_collection(req)
    assert [s.status for s in report.scenes] == ["done", "done"] and "mosaic" not in report.outputs
    for s in report.scenes:
        assert s.area_unit == "um^2"
        with rasterio.open(s.out) as ds:
            labels = ds.read(1)
        for cls, cid in (("stroma", 0), ("tumour", 1)):
            assert s.class_areas[cls] == pytest.approx((labels == cid).sum() * 0.25)
        assert sum(s.class_fractions.values()) == pytest.approx(1.0)
    table = pd.read_csv(report.outputs["summary_csv"])
    assert {"fraction_stroma", "fraction_tumour", "area_tumour"} <= set(table.columns)


def test_a_stac_item_collection_is_a_collection(
    samples: Path, model_dir: Path, tmp_path: Path
) -> None:
    """An ItemCollection whose Items name the scenes by relative hrefs: one scene per Item
    (named by its id, read through --asset), equal to the same scenes given as files."""
    chip = samples / "spacenet_atlanta" / "sample_geotiff.tif"
    scenes = cut_scenes(chip, tmp_path / "scenes")[:2]
    items = [{"type": "Feature", "stac_version": "1.1.0", "id": f"item{i}", "geometry": None,
              "properties": {"datetime": "2020-01-01T00:00:00Z"}, "links": [],
              "assets": {"pan": {"href": f"scenes/{p.name}", "type": "image/tiff"},
                         "thumb": {"href": "t.png", "type": "image/png", "roles": ["thumbnail"]}}}
             for i, p in enumerate(scenes)]  # fmt: skip
    catalog = tmp_path / "items.json"
    catalog.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    req = CollectionRequest(scenes=str(catalog), assets=("pan",), model=str(model_dir),
                            out_dir=str(tmp_path / "out"), tile=256, polygons=False)  # fmt: skip
    report = segment_collection(req)
    assert [(s.name, s.status) for s in report.scenes] == [("item0", "done"), ("item1", "done")]
    files = segment_collection(req.model_copy(update={
        "scenes": str(tmp_path / "scenes" / "r0c[01].tif"), "assets": (), "out_dir": str(tmp_path / "f")}))  # fmt: skip
    for a, b in zip(report.scenes, files.scenes, strict=True):
        with rasterio.open(a.out) as x, rasterio.open(b.out) as y:
            np.testing.assert_array_equal(x.read(), y.read())
            assert x.transform == y.transform


def test_on_a_cluster_small_scenes_are_tasks_and_a_large_one_is_split_into_units(
    samples: Path, model_dir: Path, tmp_path: Path
) -> None:
    """An embedded cluster of 2 workers: three small scenes run as one task each, the whole
    chip (above ``split_pixels``) through distributed segment_region's units; every
    prediction equals the in-process run's."""
    import shutil

    from segflow.stages.collection import collection_client

    chip = samples / "spacenet_atlanta" / "sample_geotiff.tif"
    for extra in cut_scenes(chip, tmp_path / "scenes")[3:]:
        extra.unlink()
    shutil.copy(chip, tmp_path / "scenes" / "whole.tif")
    req = CollectionRequest(scenes=str(tmp_path / "scenes" / "*.tif"), model=str(model_dir),
                            out_dir=str(tmp_path / "here"), tile=256, polygons=False,
                            mosaic=False, split_pixels=300 * 300)  # fmt: skip
    here = segment_collection(req)
    on = req.model_copy(update={"out_dir": str(tmp_path / "cluster"), "workers": 2})
    with collection_client(on) as client:
        assert client is not None and len(client.scheduler_info()["workers"]) == 2
        spread = segment_collection(on, client=client)
    assert [(s.name, s.status, s.split) for s in spread.scenes] == [
        ("r0c0", "done", False), ("r0c1", "done", False), ("r0c2", "done", False),
        ("whole", "done", True),
    ]  # fmt: skip
    assert not any(s.split for s in here.scenes)
    for a, b in zip(here.scenes, spread.scenes, strict=True):
        with rasterio.open(a.out) as x, rasterio.open(b.out) as y:
            assert (x.transform, x.shape) == (y.transform, y.shape)
            np.testing.assert_array_equal(x.read(), y.read())
        assert a.class_areas == b.class_areas
