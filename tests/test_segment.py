"""segment_region end to end: georeference, polygons on the buildings, resume, bad input."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from conftest import kill_9, mosaic_geotiff
from rasterio.features import rasterize

from segflow.config import ClassDef
from segflow.errors import CheckpointError, ConfigError, RegionError
from segflow.segment import SegmentRequest, _inference_options, segment_region, tta_set_for
from segflow.train.checkpoint import CheckpointMeta, build_meta, save_checkpoint
from segflow.train.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
CLASSES = (ClassDef(id=0, name="background"), ClassDef(id=1, name="building", color="#ff3030"))
CFG = ModelConfig(arch="unet", in_channels=1, out_channels=2, features=8, depth=2, num_res_units=0)
ORACLE = ModelConfig(**{**CFG.model_dump(), "norm": "none"})  # no BatchNorm statistics to settle


def _checkpoint(
    path: Path,
    model: torch.nn.Module,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    cfg: ModelConfig = CFG,
) -> Path:
    meta = build_meta(
        cfg,
        bands=("pan",),
        mean=[mean],
        std=[std],
        tile=256,
        classes=CLASSES,
    )
    save_checkpoint(path, model, meta)
    return path


@pytest.fixture(scope="module")
def mask_scene(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> tuple[Path, Path]:
    """A GeoTIFF on the Atlanta grid whose pixels are the building mask (x 1000), and the polygons."""
    d = tmp_path_factory.mktemp("scene")
    atl = samples / "spacenet_atlanta"
    gdf = gpd.read_file(atl / "geotiff_labels.geojson")
    with rasterio.open(atl / "sample_geotiff.tif") as src:
        profile = src.profile
        mask = rasterize(
            ((g, 1) for g in gdf.geometry),
            out_shape=src.shape,
            transform=src.transform,
            dtype="uint8",
        )
    profile.update(nodata=None, tiled=True, blockxsize=256, blockysize=256)
    out = d / "mask.tif"
    with rasterio.open(out, "w", **profile) as dst:
        dst.write((mask.astype("uint16") * 1000)[None])
    return out, atl / "geotiff_labels.geojson"


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory, mask_scene: tuple[Path, Path]) -> Path:
    """A small U-Net trained for a few seconds to reproduce the mask it is shown."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    with rasterio.open(mask_scene[0]) as src:
        x = src.read(1).astype("float32") / 1000.0
    model = build_model(ORACLE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        r, c = rng.integers(0, 900 - 256, size=2)
        patch = torch.from_numpy(x[None, None, r : r + 256, c : c + 256].copy())
        loss = torch.nn.functional.cross_entropy(model(patch), patch[:, 0].long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _checkpoint(
        tmp_path_factory.mktemp("ckpt") / "oracle", model, mean=0.0, std=1000.0, cfg=ORACLE
    )


def test_georeference_cog_and_polygons_on_buildings(
    mask_scene: tuple[Path, Path], oracle: Path, tmp_path: Path
) -> None:
    image, footprints = mask_scene
    window = (100, 200, 600, 500)  # COL ROW WIDTH HEIGHT
    req = SegmentRequest(
        image=str(image),
        model=str(oracle),
        out=str(tmp_path / "m.tif"),
        window=window,
        tile=256,
        polygons=str(tmp_path / "p.gpkg"),
        parquet=str(tmp_path / "p.parquet"),
        probabilities=str(tmp_path / "prob.tif"),
        quicklook=str(tmp_path / "q.png"),
    )
    report = segment_region(req)
    with rasterio.open(image) as src, rasterio.open(tmp_path / "m.tif") as cog:
        assert cog.crs == src.crs
        assert cog.transform == src.window_transform(rasterio.windows.Window(*window))
        assert cog.shape == (500, 600) and cog.nodata == 255
        pred = cog.read(1)
        truth = src.read(1, window=rasterio.windows.Window(*window)) > 0
    from rio_cogeo.cogeo import cog_validate

    assert cog_validate(str(tmp_path / "m.tif"))[0]
    iou = (pred.astype(bool) & truth).sum() / (pred.astype(bool) | truth).sum()
    assert iou > 0.9, f"oracle IoU {iou:.3f}"
    polys = gpd.read_file(tmp_path / "p.gpkg")
    assert polys.crs.to_epsg() == 32616 and len(polys) > 0
    assert set(polys["class_name"]) == {"building"}
    # the polygons lie on the SpaceNet buildings: area-weighted overlap with the footprints
    buildings = gpd.read_file(footprints).union_all()
    inter = polys.geometry.intersection(buildings).area.sum()
    assert inter / polys.geometry.area.sum() > 0.9
    assert gpd.read_parquet(tmp_path / "p.parquet").crs.to_epsg() == 32616
    assert report.class_pixels["building"] == int((pred == 1).sum())
    if shutil.which("gdalinfo"):
        info = subprocess.run(
            ["gdalinfo", str(tmp_path / "m.tif")], capture_output=True, text=True, check=True
        ).stdout
        assert "UTM zone 16N" in info and "LAYOUT=COG" in info
        t = cog.transform
        assert f"Origin = ({t.c:.15f},{t.f:.15f})" in info


def test_instances_cog_store_and_polygons(
    mask_scene: tuple[Path, Path], oracle: Path, tmp_path: Path
) -> None:
    """Instance ids equal whole-array labelling of the class COG, for tiles 128 and 256; one
    polygon per instance, keyed by its id."""
    from test_instances import reference_instances

    from segflow.io.store import SceneStore

    image = mask_scene[0]
    runs = {}
    for tile in (128, 256, 512):
        d = tmp_path / str(tile)
        d.mkdir()
        req = SegmentRequest(image=str(image), model=str(oracle), out=str(d / "m.tif"),
                             window=(100, 200, 600, 500), tile=tile, instances=str(d / "i.tif"),
                             polygons=str(d / "p.gpkg"))  # fmt: skip
        report = segment_region(req)
        with rasterio.open(d / "m.tif") as cog, rasterio.open(d / "i.tif") as inst:
            classes, ids = cog.read(1), inst.read(1)
            assert inst.transform == cog.transform and inst.crs == cog.crs
            assert inst.dtypes[0] == "uint32"
        np.testing.assert_array_equal(ids, reference_instances(classes, [1]))
        store = SceneStore.open(req.work_store)
        src = store.meta["prediction_store"]["source_window"]  # the store's grid in the image
        r0, c0 = 200 - src["row_off"], 100 - src["col_off"]
        stored = store.array("prediction/instances")[r0 : r0 + 500, c0 : c0 + 600]
        np.testing.assert_array_equal(stored, ids)
        polys = gpd.read_file(d / "p.gpkg")
        assert report.instances == report.polygons == len(polys) == ids.max() > 5
        assert sorted(polys.instance_id) == list(range(1, ids.max() + 1))
        runs[tile] = ids
        if tile == 256:  # the prediction store evaluates like the COG it was exported to
            from segflow.config.evaluate import EvaluateRequest
            from segflow.evaluation import evaluate

            assert (r0, c0) == (0, 0)  # the store's grid is the window's here
            by = {p: evaluate(EvaluateRequest(prediction=p, reference=str(mask_scene[1])))
                  for p in (str(d / "m.tif"), str(req.work_store))}  # fmt: skip
            a, b = by.values()
            assert a["pixels"] == b["pixels"] and a["objects"]["tp"] == b["objects"]["tp"] > 5
    np.testing.assert_array_equal(runs[128], runs[256])
    np.testing.assert_array_equal(runs[512], runs[256])
    # split at necks: every piece lies inside one connected component, and covers it all
    split = SegmentRequest(image=str(image), model=str(oracle), out=str(tmp_path / "s.tif"),
                           window=(100, 200, 600, 500), tile=256, instances=str(tmp_path / "si.tif"),
                           instance_split="distance", split_depth=1.5)  # fmt: skip
    pieces_report = segment_region(split)
    with rasterio.open(tmp_path / "si.tif") as inst:
        pieces = inst.read(1)
    comps = runs[256]
    np.testing.assert_array_equal(pieces > 0, comps > 0)
    for p in range(1, pieces.max() + 1):
        assert len(np.unique(comps[pieces == p])) == 1
    assert pieces_report.instances == pieces.max() >= comps.max()
    with pytest.raises(ConfigError, match="not among the classes"):
        segment_region(SegmentRequest(image=str(image), model=str(oracle),
                                      out=str(tmp_path / "x.tif"), instances=str(tmp_path / "x_i.tif"),
                                      instance_classes=(7,)))  # fmt: skip
    assert not (tmp_path / "x.tif").exists()


def test_window_equals_part_of_whole_run(mask_scene: tuple[Path, Path], tmp_path: Path) -> None:
    torch.manual_seed(3)
    ckpt = _checkpoint(tmp_path / "rand", build_model(CFG).eval(), mean=500.0, std=400.0)
    image = str(mask_scene[0])
    whole = segment_region(
        SegmentRequest(
            image=image,
            model=str(ckpt),
            out=str(tmp_path / "w.tif"),
            tile=256,
            probabilities=str(tmp_path / "wp.tif"),
        )
    )
    part = segment_region(
        SegmentRequest(
            image=image,
            model=str(ckpt),
            out=str(tmp_path / "p.tif"),
            tile=128,
            window=(301, 99, 400, 512),
            probabilities=str(tmp_path / "pp.tif"),
        )
    )
    assert whole.region.size == 900 * 900 and part.region.size == 400 * 512
    with rasterio.open(tmp_path / "wp.tif") as a, rasterio.open(tmp_path / "pp.tif") as b:
        w = a.read(window=rasterio.windows.Window(301, 99, 400, 512)).astype(int)
        # uint8 probabilities from different tile sizes: equal up to rounding of the last bit
        assert np.abs(w - b.read().astype(int)).max() <= 1


def test_bad_inputs(mask_scene: tuple[Path, Path], tmp_path: Path, samples: Path) -> None:
    torch.manual_seed(0)
    ckpt = _checkpoint(tmp_path / "ck", build_model(CFG).eval())
    image = str(mask_scene[0])
    out = tmp_path / "o.tif"

    def run(**kw: object) -> None:
        segment_region(
            SegmentRequest(**{"image": image, "model": str(ckpt), "out": str(out), **kw})
        )  # type: ignore[arg-type]

    with pytest.raises(RegionError, match="outside the image"):
        run(bbox=(0.0, 0.0, 10.0, 10.0))
    with pytest.raises(RegionError, match="unknown --bbox-crs"):
        run(bbox=(733700.0, 3724800.0, 733900.0, 3725000.0), bbox_crs="EPSG:12345678")
    with pytest.raises(ConfigError, match="band"):
        run(image=str(samples / "landsat" / "RGB.byte.tif"))
    with pytest.raises(CheckpointError, match="not found"):
        run(model=str(tmp_path / "nope"))
    pickled = tmp_path / "pickled.pt"
    torch.save(build_model(CFG).state_dict(), pickled)
    with pytest.raises(CheckpointError, match="pickle"):
        run(model=str(pickled))
    with pytest.raises(ConfigError, match="output directory does not exist"):
        run(out=str(tmp_path / "missing" / "o.tif"))
    save_checkpoint(tmp_path / "unflipped", build_model(CFG).eval(), _unflipped_meta())
    with pytest.raises(ConfigError, match="without flips or quarter turns"):
        run(model=str(tmp_path / "unflipped"), tta_flips=True)
    assert not out.exists() and not list(tmp_path.glob("*.predictions.zarr*"))


def _unflipped_meta() -> CheckpointMeta:
    """A checkpoint's record of training without flips or quarter turns."""
    meta = build_meta(CFG, bands=("pan",), mean=[0.0], std=[1.0], tile=256, classes=CLASSES)
    return meta.model_copy(
        update={"training": {"config": {"augment": {"flips": False, "rot90": False}}}}
    )


def test_tta_flips_named_on_the_command_line_serve_a_model_trained_without_them() -> None:
    """`--tta horizontal` overrides the training record (the user vouches for the flips)."""
    spec = importlib.util.spec_from_file_location(
        "segflow_flow_segment_region", ROOT / "flows" / "segment_region.py"
    )
    assert spec is not None and spec.loader is not None
    flow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flow)
    base = ["--image", "a.tif", "--model", "ck", "--out", "o.tif"]
    named, auto, off = (
        flow.request_from_args(flow.parser().parse_args(base + extra))
        for extra in (["--tta", "horizontal"], ["--tta"], [])
    )
    assert (named.tta_flips, named.tta_set) == (True, "horizontal")
    assert (auto.tta_flips, auto.tta_set) == (True, None)
    assert (off.tta_flips, off.tta_set) == (False, None)
    unflipped = _unflipped_meta()
    opts = _inference_options(named, unflipped)
    assert opts.tta_flips and opts.tta_set == "horizontal"
    with pytest.raises(ConfigError, match="--tta horizontal"):
        _inference_options(auto, unflipped)


@pytest.mark.parametrize(
    ("flips", "rot90", "expected"),
    [(True, True, "flips"), (True, False, "horizontal"), (False, True, "rot180")],
)
def test_tta_uses_the_flips_the_model_was_trained_with(
    flips: bool, rot90: bool, expected: str
) -> None:
    meta = build_meta(CFG, bands=("pan",), mean=[0.0], std=[1.0], tile=256, classes=CLASSES)
    assert tta_set_for(meta) == "flips"  # no training record: all four
    trained = meta.model_copy(
        update={"training": {"config": {"augment": {"flips": flips, "rot90": rot90}}}}
    )
    assert tta_set_for(trained) == expected


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "flows" / "segment_region.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_bad_input_one_line(mask_scene: tuple[Path, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = _checkpoint(tmp_path / "ck", build_model(CFG).eval())
    bad = tmp_path / "corrupt"
    shutil.copytree(ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    for args, expect in [
        (["--window", "5000", "5000", "10", "10"], "outside the image"),
        (["--bbox", "0", "0", "1", "1", "--bbox-crs", "EPSG:12345678"], "unknown --bbox-crs"),
        (["--model", str(bad)], "checkpoint"),
    ]:
        model = [] if "--model" in args else ["--model", str(ckpt)]
        proc = _cli("--image", str(mask_scene[0]), *model, "--out", str(tmp_path / "o.tif"), *args)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and expect in lines[0].lower(), proc.stderr
        assert not (tmp_path / "o.tif").exists()
    # the Prefect API server the command started early (flows/_warm_api.py) went
    # with it, although the command failed before its flow (servers of other commands on
    # this machine, started elsewhere, are not this test's)
    import psutil

    servers = [p for p in psutil.process_iter(["cmdline", "cwd"])
               if "prefect.server.api.server:create_app" in " ".join(p.info["cmdline"] or [])
               and p.info["cwd"] == str(ROOT)]  # fmt: skip
    assert not servers


def test_resume_after_kill_9(samples: Path, tmp_path: Path) -> None:
    """SIGKILL segment_region mid-run; the same command again skips finished units and gives the same COG."""
    image = mosaic_geotiff(samples / "spacenet_atlanta" / "sample_geotiff.tif", tmp_path / "big.tif")
    torch.manual_seed(0)
    ckpt = _checkpoint(tmp_path / "ck", build_model(CFG).eval(), mean=400.0, std=300.0)
    args = ["--image", str(image), "--model", str(ckpt), "--tile", "256", "--batch-size", "2"]
    work = tmp_path / "k.predictions.zarr"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "flows" / "segment_region.py"),
            *args,
            "--out",
            str(tmp_path / "k.tif"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    from segflow.io.store import SceneStore, staging_path

    deadline = time.time() + 300
    done: set = set()
    while time.time() < deadline and proc.poll() is None:
        stage = staging_path(work)
        if (stage / "_segflow" / "progress").exists():
            try:
                done = SceneStore.open(stage).progress("prediction/labels").done()
            except Exception:
                done = set()
            if len(done) >= 10:
                kill_9(proc.pid)
                break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -9, "the run finished before it could be killed"
    assert not (tmp_path / "k.tif").exists()
    killed = SceneStore.open(staging_path(work))
    assert killed.write_unit == 512  # shards two 256-pixel tiles wide, of 256-pixel chunks
    killed_done = killed.progress("prediction/labels").done()
    assert len(killed_done) >= 10
    report = segment_region(
        SegmentRequest(
            image=str(image), model=str(ckpt), out=str(tmp_path / "k.tif"), tile=256, batch_size=2
        )
    )
    assert report.inference["skipped_units"] == len(killed_done)
    ref = segment_region(
        SegmentRequest(
            image=str(image), model=str(ckpt), out=str(tmp_path / "ref.tif"), tile=256, batch_size=2
        )
    )
    assert ref.inference["skipped_units"] == 0
    with rasterio.open(tmp_path / "k.tif") as a, rasterio.open(tmp_path / "ref.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_slide_outputs_ome_tiff_and_qupath(samples: Path, tmp_path: Path) -> None:
    """An SVS region: pyramidal OME-TIFF with the slide's pixel size, QuPath GeoJSON in slide pixels."""
    import json

    import tifffile

    cfg = ModelConfig(
        arch="unet", in_channels=3, out_channels=2, features=4, depth=1, num_res_units=0
    )
    torch.manual_seed(1)
    meta = build_meta(
        cfg,
        bands=("red", "green", "blue"),
        mean=[200.0] * 3,
        std=[30.0] * 3,
        tile=256,
        classes=CLASSES,
    )
    save_checkpoint(tmp_path / "ck", build_model(cfg).eval(), meta)
    svs = samples / "cmu1_small_region" / "CMU-1-Small-Region.svs"
    region = (1000, 1200, 700, 600)  # COL ROW WIDTH HEIGHT in level-0 pixels
    report = segment_region(
        SegmentRequest(
            image=str(svs),
            model=str(tmp_path / "ck"),
            out=str(tmp_path / "m.tif"),
            window=region,
            tile=256,
            ome_tiff=str(tmp_path / "m.ome.tif"),
            ome_zarr=str(tmp_path / "m.ome.zarr"),
            qupath_geojson=str(tmp_path / "m.geojson"),
        )
    )
    assert report.georef is None
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(str(tmp_path / "m.ome.zarr")))())
    label = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    scale = label.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale == pytest.approx([0.499, 0.499], abs=1e-3)
    with rasterio.open(tmp_path / "m.tif") as cog:
        np.testing.assert_array_equal(np.asarray(label.data[0]), cog.read(1))
    with tifffile.TiffFile(tmp_path / "m.ome.tif") as tif:
        assert tif.is_ome and len(tif.series[0].levels) >= 2
        level0 = tif.series[0].levels[0].asarray()
        ome = tif.ome_metadata
    with rasterio.open(tmp_path / "m.tif") as cog:
        np.testing.assert_array_equal(level0.squeeze(), cog.read(1))
    assert 'PhysicalSizeX="0.499' in ome
    features = json.loads((tmp_path / "m.geojson").read_text())["features"]
    assert features, "the random model predicts some class-1 pixels"
    xs = [
        x
        for f in features
        for ring in f["geometry"]["coordinates"]
        for x, _ in (ring if f["geometry"]["type"] == "Polygon" else ring[0])
    ]
    # slide level-0 pixel coordinates: inside the requested window, not region-relative
    assert min(xs) >= region[0] and max(xs) <= region[0] + region[2]
