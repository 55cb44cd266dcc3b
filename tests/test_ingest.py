"""Ingest: exact round trips against the sources' own readers, labels, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr
from PIL import Image
from rasterio.features import rasterize

from segflow.config import ClassDef
from segflow.errors import ConfigError, LabelError, SourceError, StoreError
from segflow.geometry import BlockIndex
from segflow.ingest import IngestSpec, ingest, plan_tasks
from segflow.io.store import SceneStore, staging_path

ROOT = Path(__file__).resolve().parents[1]
BUILDINGS = (ClassDef(id=0, name="background"), ClassDef(id=1, name="building", color="#ff0000"))


def _open_xr(path: Path) -> xr.Dataset:
    return xr.open_zarr(path, decode_coords="all", consolidated=True)


def _assert_geotiff_roundtrip(src_path: Path, store_path: Path) -> None:
    with rasterio.open(src_path) as src:
        ref = src.read()
        mask = src.dataset_mask() > 0
        crs, transform = src.crs, src.transform
    ds = _open_xr(store_path)
    np.testing.assert_array_equal(ds["image"].values, ref)
    assert ds["image"].dtype == ref.dtype
    np.testing.assert_array_equal(ds["valid"].values, mask)
    assert ds.rio.crs == crs
    assert ds["image"].rio.transform() == transform


GEOTIFF_SAMPLES = ["spacenet_atlanta/sample_geotiff.tif", "landsat/RGB.byte.tif"]


@pytest.mark.parametrize("name", GEOTIFF_SAMPLES)
@pytest.mark.parametrize(("chunk", "shard"), [(256, None), (128, 512)])
def test_geotiff_roundtrip_bundled(
    samples: Path, tmp_path: Path, name: str, chunk: int, shard: int | None
) -> None:
    src = samples / name
    report = ingest(
        IngestSpec(source=str(src), out=str(tmp_path / "s.zarr"), chunk=chunk, shard=shard)
    )
    assert report.units_written == report.units_total and report.units_skipped == 0
    _assert_geotiff_roundtrip(src, tmp_path / "s.zarr")
    assert not staging_path(tmp_path / "s.zarr").exists()
    if shard is None:
        _assert_only_edge_valid_chunks_stored(src, tmp_path / "s.zarr", chunk)


def _assert_only_edge_valid_chunks_stored(src_path: Path, store_path: Path, chunk: int) -> None:
    """``valid`` is filled with True: a chunk is stored only where some pixel is nodata."""
    with rasterio.open(src_path) as src:
        mask = src.dataset_mask() > 0
    root = store_path / "valid" / "c"
    stored = {tuple(int(p) for p in f.relative_to(root).parts) for f in root.rglob("*")
              if f.is_file()}  # fmt: skip
    h, w = mask.shape
    partial = {(r // chunk, c // chunk) for r in range(0, h, chunk) for c in range(0, w, chunk)
               if not mask[r : r + chunk, c : c + chunk].all()}  # fmt: skip
    assert stored == partial


SHARED_GEOTIFFS = [
    "spacenet_solaris/atlanta_buildings/sample_geotiff.tif",
    "spacenet_solaris/vegas_roads/road_mask_input.tif",
    "spacenet_solaris/vegas_roads/sample_road_raster_mask.tif",
    "landsat_rgb_rasterio/RGB.byte.tif",
]


@pytest.mark.parametrize("name", SHARED_GEOTIFFS)
def test_geotiff_roundtrip_shared(shared_data: Path, tmp_path: Path, name: str) -> None:
    ingest(IngestSpec(source=str(shared_data / name), out=str(tmp_path / "s.zarr"), chunk=384))
    _assert_geotiff_roundtrip(shared_data / name, tmp_path / "s.zarr")


def _slide_roundtrip(svs: Path, tmp_path: Path) -> None:
    import openslide

    ingest(IngestSpec(source=str(svs), out=str(tmp_path / "w.zarr"), chunk=512))
    store = SceneStore.open(tmp_path / "w.zarr")
    with openslide.OpenSlide(str(svs)) as slide:
        w, h = slide.dimensions
        ref = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB")).transpose(2, 0, 1)
        mpp = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    np.testing.assert_array_equal(store.array("image")[...], ref)
    info = store.slide
    assert info is not None and info.mpp_x == pytest.approx(mpp)
    assert store.georef is None


def test_slide_roundtrip_bundled(samples: Path, tmp_path: Path) -> None:
    _slide_roundtrip(samples / "cmu1_small_region" / "CMU-1-Small-Region.svs", tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "isbi2012_em_membranes/train/images/0.png",
        "isbi2012_em_membranes/test/images/3.png",
        "dsb2018_nuclei_instances/images/fe9adb627a6f.png",
        "dsb2018_nuclei_instances/images/472b1c5ff988.png",
    ],
)
def test_plain_image_roundtrip_shared(shared_data: Path, tmp_path: Path, name: str) -> None:
    src = shared_data / name
    ingest(IngestSpec(source=str(src), out=str(tmp_path / "p.zarr"), chunk=128))
    ref = np.asarray(Image.open(src))
    ref = ref[None] if ref.ndim == 2 else ref.transpose(2, 0, 1)
    store = SceneStore.open(tmp_path / "p.zarr")
    np.testing.assert_array_equal(store.array("image")[...], ref)
    assert store.array("valid")[...].all()


def test_slide_roundtrip_shared(shared_data: Path, tmp_path: Path) -> None:
    _slide_roundtrip(shared_data / "wsi_cmu1_small_region" / "CMU-1-Small-Region.svs", tmp_path)


def test_vector_labels_become_instances(samples: Path, tmp_path: Path) -> None:
    """43 Atlanta footprints -> 43 instance ids whose pixel areas match the polygons."""
    import geopandas as gpd

    d = samples / "spacenet_atlanta"
    ingest(
        IngestSpec(
            source=str(d / "sample_geotiff.tif"),
            labels=str(d / "geotiff_labels.geojson"),
            out=str(tmp_path / "a.zarr"),
            chunk=256,
            classes=BUILDINGS,
        )
    )
    store = SceneStore.open(tmp_path / "a.zarr")
    inst = store.array("instances")[...]
    labels = store.array("labels")[...]
    gdf = gpd.read_file(d / "geotiff_labels.geojson")
    ids, counts = np.unique(inst[inst > 0], return_counts=True)
    assert len(gdf) == 43 and len(ids) == 43
    # the labels agree with the instances, and with one whole-image rasterize
    np.testing.assert_array_equal(labels, (inst > 0).astype(labels.dtype))
    with rasterio.open(d / "sample_geotiff.tif") as src:
        ref = rasterize(
            ((g, i + 1) for i, g in enumerate(gdf.geometry)),
            out_shape=src.shape,
            transform=src.transform,
            dtype="uint32",
        )
    np.testing.assert_array_equal(inst, ref)
    areas = gdf.geometry.area.to_numpy()
    pixel_area = dict(zip(ids.tolist(), (counts * 0.25).tolist(), strict=True))
    # Pixel-centre rasterization: a pixel belongs to a polygon when its centre is inside, so a
    # building's pixel area is off by up to about half its perimeter x 0.5 m. That is < 2 % from
    # 100 m^2 up; the worst 50-100 m^2 building (54 m^2) is 4.4 % off for that reason alone.
    rel = np.array([abs(pixel_area.get(i + 1, 0) - areas[i]) / areas[i] for i in range(43)])
    assert rel[areas >= 100].max() < 0.02, (
        f"worst relative area error {rel[areas >= 100].max():.3%}"
    )
    assert rel[areas >= 50].max() < 0.05
    assert abs(counts.sum() * 0.25 - areas.sum()) / areas.sum() < 0.005


def test_raster_labels_with_class_map(samples: Path, tmp_path: Path) -> None:
    img = samples / "isbi2012" / "train" / "images" / "3.png"
    lab = samples / "isbi2012" / "train" / "labels" / "3.png"
    ingest(
        IngestSpec(
            source=str(img),
            labels=str(lab),
            class_map={0: 1, 255: 0},
            out=str(tmp_path / "i.zarr"),
            chunk=128,
        )
    )
    store = SceneStore.open(tmp_path / "i.zarr")
    ref = np.where(np.asarray(Image.open(lab)) == 0, 1, 0)
    np.testing.assert_array_equal(store.array("labels")[...], ref)
    assert store.has("labels")


def test_instance_raster(samples: Path, tmp_path: Path) -> None:
    d = samples / "dsb2018"
    ingest(
        IngestSpec(
            source=str(d / "image_697a05c6fe4a.png"),
            instances=str(d / "labels_697a05c6fe4a.png"),
            out=str(tmp_path / "n.zarr"),
            chunk=64,
        )
    )
    store = SceneStore.open(tmp_path / "n.zarr")
    np.testing.assert_array_equal(
        store.array("instances")[...], np.asarray(Image.open(d / "labels_697a05c6fe4a.png"))
    )


def test_rerun_does_nothing_and_other_inputs_refused(samples: Path, tmp_path: Path) -> None:
    src = samples / "landsat" / "RGB.byte.tif"
    out = tmp_path / "l.zarr"
    ingest(IngestSpec(source=str(src), out=str(out), chunk=256))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = ingest(IngestSpec(source=str(src), out=str(out), chunk=256))
    assert again.already_complete and again.units_written == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(StoreError, match="different store already exists"):
        ingest(IngestSpec(source=str(src), out=str(out), chunk=128))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_the_source_hash_runs_beside_a_new_stores_writes(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new store gets the source's hash and its run key before its first marks; a hash that
    fails removes the new store; a store left without a key is rebuilt, not resumed."""
    import hashlib
    import threading

    import segflow.ingest as ingest_module

    src = samples / "landsat" / "RGB.byte.tif"
    out = tmp_path / "l.zarr"
    started = threading.Event()
    real = ingest_module.source_sha256

    def slow_hash(*args: object, **kw: object) -> str:
        assert started.wait(30)  # finishes only once a task has written its units
        return real(*args, **kw)

    def first_task(*args: object, **kw: object) -> object:
        units = task(*args, **kw)
        started.set()
        return units

    task = ingest_module._ingest_task
    monkeypatch.setattr(ingest_module, "source_sha256", slow_hash)
    monkeypatch.setattr(ingest_module, "_ingest_task", first_task)
    ingest(IngestSpec(source=str(src), out=str(out), chunk=256))
    meta = SceneStore.open(out).meta
    assert meta["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    monkeypatch.undo()
    again = ingest(IngestSpec(source=str(src), out=str(out), chunk=256))
    assert again.already_complete  # the key recorded is the one a later run computes

    def broken(*args: object, **kw: object) -> str:
        raise SourceError("cannot read it to hash it")

    monkeypatch.setattr(ingest_module, "source_sha256", broken)
    with pytest.raises(SourceError, match="to hash it"):
        ingest(IngestSpec(source=str(src), out=str(tmp_path / "b.zarr"), chunk=256))
    assert not (tmp_path / "b.zarr").exists() and not staging_path(tmp_path / "b.zarr").exists()
    monkeypatch.undo()

    # killed before the key was recorded: a store without one, and nothing marked
    keyless = SceneStore.create(staging_path(tmp_path / "k.zarr"), bands=("b",), height=8,
                                width=8, dtype="uint8")  # fmt: skip
    assert keyless.meta.get("ingest_key") is None
    report = ingest(IngestSpec(source=str(src), out=str(tmp_path / "k.zarr"), chunk=256))
    assert report.units_skipped == 0 and report.units_written == report.units_total
    _assert_geotiff_roundtrip(src, tmp_path / "k.zarr")


def test_plan_tasks_reads_strips_once_and_covers_every_unit() -> None:
    from segflow.geometry import BlockGrid

    grid = BlockGrid(1000, 1300, 256)
    striped = plan_tasks(grid, (3, 1300))
    tiled = plan_tasks(grid, (256, 256))
    done = {BlockIndex(0, 0), BlockIndex(0, 1), BlockIndex(2, 3)}
    resumed = plan_tasks(grid, (3, 1300), done=done)
    assert sorted(i for t in resumed for i, _ in t.units) == sorted(
        i for i, _ in grid if i not in done
    )
    assert resumed[0].window.col_off == 512  # the finished first units of row 0 are not read
    for tasks in (striped, tiled):
        units = [i for t in tasks for i, _ in t.units]
        assert sorted(units) == sorted(i for i, _ in grid)
        for t in tasks:
            for _, w in t.units:
                assert t.window.contains(w)
    assert len(striped) == grid.shape_in_blocks[0]
    assert len(tiled) == 1  # 4 x 6 units of 256 fit in one 2048-pixel task
    assert len(plan_tasks(grid, (256, 256), task_pixels=256)) == len(grid)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from segflow.ingest import IngestSpec, ingest
    seen = 0
    def progress(n):
        global seen
        seen += n
        if seen >= int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
    ingest(IngestSpec(source=sys.argv[1], out=sys.argv[2], chunk=128), progress=progress)
    """
)


def test_resume_after_kill_9(samples: Path, tmp_path: Path) -> None:
    """SIGKILL mid-ingest, run again: finished units are skipped and the store is identical."""
    src = str(samples / "spacenet_atlanta" / "sample_geotiff.tif")
    out = tmp_path / "k.zarr"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, src, str(out), "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    assert not out.exists() and staging_path(out).exists()
    done = SceneStore.open(staging_path(out)).progress("ingest").done()
    assert len(done) >= 20
    chunk_files = {
        p: p.stat().st_mtime_ns
        for p in (staging_path(out) / "image" / "c").rglob("*")
        if p.is_file()
    }
    resumed = ingest(IngestSpec(source=src, out=str(out), chunk=128))
    assert resumed.units_skipped == len(done)
    assert resumed.units_written == resumed.units_total - len(done)
    # chunks of units finished before the kill were not written again
    for index in done:
        p = out / "image" / "c" / "0" / str(index.row) / str(index.col)
        old = staging_path(out) / "image" / "c" / "0" / str(index.row) / str(index.col)
        assert p.stat().st_mtime_ns == chunk_files[old]
    ref = tmp_path / "ref.zarr"
    ingest(IngestSpec(source=src, out=str(ref), chunk=128))
    for name in ("image", "valid"):
        np.testing.assert_array_equal(
            SceneStore.open(out).array(name)[...], SceneStore.open(ref).array(name)[...]
        )


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_library(samples: Path, tmp_path: Path) -> None:
    atl = samples / "spacenet_atlanta"
    out = tmp_path / "x.zarr"
    with pytest.raises(SourceError, match="not found"):
        ingest(IngestSpec(source=str(tmp_path / "missing.tif"), out=str(out)))
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    with pytest.raises(SourceError):
        ingest(IngestSpec(source=str(text), out=str(out)))
    with pytest.raises(ConfigError, match="chunk"):
        ingest(IngestSpec(source=str(atl / "sample_geotiff.tif"), out=str(out), chunk=0))
    with pytest.raises(StoreError, match="output directory does not exist"):
        ingest(
            IngestSpec(source=str(atl / "sample_geotiff.tif"), out=str(tmp_path / "no" / "x.zarr"))
        )
    assert not out.exists() and not staging_path(out).exists()


def test_bad_label_values_leave_nothing(samples: Path, tmp_path: Path) -> None:
    img = samples / "isbi2012" / "train" / "images" / "0.png"
    lab = samples / "isbi2012" / "train" / "labels" / "0.png"
    out = tmp_path / "x.zarr"
    with pytest.raises(LabelError, match="class"):
        # 255 is neither a class (0, 1) nor the ignore index here: found when a block is read
        ingest(
            IngestSpec(source=str(img), labels=str(lab), out=str(out), chunk=128, ignore_index=254)
        )
    assert not out.exists() and not staging_path(out).exists()


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run(
        [sys.executable, str(ROOT / "flows" / "ingest.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> dict[str, Path]:
    import geopandas as gpd

    d = tmp_path_factory.mktemp("bad")
    src = (samples / "spacenet_atlanta" / "sample_geotiff.tif").read_bytes()
    (d / "truncated.tif").write_bytes(src[: int(len(src) * 0.6)])
    (d / "text.tif").write_text("hello\n")
    gdf = gpd.read_file(samples / "spacenet_atlanta" / "geotiff_labels.geojson")
    gdf.set_geometry(gdf.geometry.translate(100_000, 0)).to_file(
        d / "far.geojson", driver="GeoJSON"
    )
    gdf.assign(cls=7).to_file(d / "cls7.geojson", driver="GeoJSON")
    (d / "bad.yaml").write_text("name: x\ningest:\n  source: a.tif\n  chunkk: 512\n")
    return {p.stem: p for p in d.iterdir()}


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("missing", "not found"),
        ("truncated", "truncated"),
        ("text", "cannot"),
        ("far", "do not overlap"),
        ("cls7", "class table"),
        ("chunk0", "chunk"),
        ("config", "unknown key 'ingest.chunkk'"),
    ],
)
def test_bad_input_cli(
    case: str, expect: str, samples: Path, bad_files: dict[str, Path], tmp_path: Path
) -> None:
    """Each bad input: one clear line on stderr, exit 2, no store at --out, existing store untouched."""
    tif = str(samples / "spacenet_atlanta" / "sample_geotiff.tif")
    out = tmp_path / "out.zarr"
    args = {
        "missing": [str(tmp_path / "nope.tif")],
        "truncated": [str(bad_files["truncated"])],
        "text": [str(bad_files["text"])],
        "far": [tif, "--labels", str(bad_files["far"])],
        "cls7": [tif, "--labels", str(bad_files["cls7"]), "--class-field", "cls"],
        "chunk0": [tif, "--chunk", "0"],
        "config": [tif, "--config", str(bad_files["bad"])],
    }[case]
    proc = _cli(*args, "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expect.lower() in lines[0].lower(), lines[0]
    assert not out.exists() and not staging_path(out).exists()


def test_cli_runs_flow_and_existing_store_untouched(samples: Path, tmp_path: Path) -> None:
    d = samples / "spacenet_atlanta"
    out = tmp_path / "atl.zarr"
    proc = _cli(
        str(d / "sample_geotiff.tif"),
        "--out",
        str(out),
        "--labels",
        str(d / "geotiff_labels.geojson"),
        "--classes",
        json.dumps([c.model_dump() for c in BUILDINGS]),
        "--chunk",
        "256",
    )
    assert proc.returncode == 0, proc.stderr
    store = SceneStore.open(out)
    assert store.has("labels") and store.has("instances") and store.has("image")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    bad = _cli(str(d / "sample_geotiff.tif"), "--out", str(out), "--chunk", "0")
    assert bad.returncode == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_arrays_added_after_ingest_are_visible(samples: Path, tmp_path: Path) -> None:
    """A later stage's array (e.g. prepare's weights) is seen by segflow and by xarray."""
    out = tmp_path / "l.zarr"
    ingest(IngestSpec(source=str(samples / "landsat" / "RGB.byte.tif"), out=str(out), chunk=256))
    store = SceneStore.open(out, mode="r+")
    store.create_array("weights", dtype="float32", fill_value=0)
    store.write_window("weights", store.grid.window(0, 0), np.ones((256, 256), "float32"))
    store.progress("weights").mark(BlockIndex(0, 0))
    store.record_array("weights", w0=10)
    again = SceneStore.open(out)
    assert again.has("weights") and again.progress("weights").done() == {BlockIndex(0, 0)}
    ds = _open_xr(out)
    assert float(ds["weights"][:256, :256].sum()) == 256 * 256


def test_a_command_lines_options_make_the_spec_the_pipeline_would() -> None:
    """Flags, JSON forms and a pipeline's class table, into one spec; defaults from the schema."""
    from segflow.config import IngestConfig, PipelineConfig

    pipeline = PipelineConfig.model_validate(
        {"name": "p", "ignore_index": 99, "ingest": {"source": "a.tif"},
         "classes": [{"id": 0, "name": "bg"}, {"id": 1, "name": "roof"}]}
    )  # fmt: skip
    spec = IngestSpec.from_command_line(
        out="s.zarr", options={"source": "a.tif", "chunk": 256, "shard": None},
        class_map_json='{"0": 0, "255": 1}', pipeline=pipeline,
    )  # fmt: skip
    ref = IngestSpec.from_config(
        IngestConfig(source="a.tif", chunk=256, class_map={0: 0, 255: 1}),
        out="s.zarr", classes=pipeline.classes, ignore_index=99,
    )  # fmt: skip
    assert spec == ref and spec.level == IngestConfig.model_fields["level"].default
    with pytest.raises(ConfigError, match="--classes must be a JSON list"):
        IngestSpec.from_command_line(out="s.zarr", options={"source": "a.tif"},
                                     classes_json='[{"name": 3}]')  # fmt: skip
    with pytest.raises(ConfigError, match="--class-map is not valid JSON"):
        IngestSpec.from_command_line(out="s.zarr", options={"source": "a.tif"},
                                     class_map_json="{0: 1")  # fmt: skip
