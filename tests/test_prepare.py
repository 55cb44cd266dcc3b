"""The prepare stage over scene stores: weights written and recorded, fingerprint, re-runs, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import write_scene
from PIL import Image
from scipy import ndimage

from segflow.config import ClassDef, PrepareConfig, TrainRegion
from segflow.errors import ConfigError, RegionError, StoreError
from segflow.fingerprint import Fingerprint
from segflow.geometry import BlockIndex
from segflow.io.store import GeoRef, SceneStore
from segflow.prepare import (
    config_with,
    is_current,
    make_config,
    prepare_store,
    write_weights,
)
from segflow.weights import border_radius, border_term, weight_map

ROOT = Path(__file__).resolve().parents[1]
CLASSES = (ClassDef(id=0, name="background"), ClassDef(id=1, name="nucleus"))


def make_store(
    path: Path,
    image: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    instances: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    chunk: int = 64,
    shard: int | None = None,
    georef: GeoRef | None = None,
) -> SceneStore:
    """A complete store written directly (as ingest would), every array recorded."""
    store = write_scene(
        path,
        image,
        labels=labels,
        instances=instances,
        valid=valid,
        chunk=chunk,
        shard=shard,
        georef=georef,
        classes=CLASSES,
    )
    assert isinstance(store, SceneStore)
    return store


@pytest.fixture(scope="module")
def dsb_scene(samples: Path) -> dict[str, np.ndarray]:
    inst = np.asarray(Image.open(samples / "dsb2018" / "labels_697a05c6fe4a.png")).astype(np.uint32)
    img = np.asarray(Image.open(samples / "dsb2018" / "image_697a05c6fe4a.png"))[..., :3]
    labels = (inst > 0).astype(np.uint8)
    labels[:12] = 255  # unlabelled rows
    valid = np.ones(inst.shape, bool)
    valid[:, -9:] = False  # nodata columns
    return {
        "image": np.ascontiguousarray(img.transpose(2, 0, 1)),
        "labels": labels,
        "instances": inst,
        "valid": valid,
    }


def naive_term(inst: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    d1 = np.full(inst.shape, np.inf)
    d2 = np.full(inst.shape, np.inf)
    for obj in np.unique(inst[inst > 0]):
        d = ndimage.distance_transform_edt(inst != obj)
        d2, d1 = np.minimum(d2, np.maximum(d1, d)), np.minimum(d1, d)
    return np.where(inst == 0, w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2)), 0.0)


def test_prepare_writes_weights_and_fingerprint(
    tmp_path: Path, dsb_scene: dict[str, np.ndarray]
) -> None:
    s = dsb_scene
    make_store(
        tmp_path / "s.zarr",
        s["image"],
        labels=s["labels"],
        instances=s["instances"],
        valid=s["valid"],
        chunk=64,
        shard=128,
    )
    region = TrainRegion(bbox=(0, 0, 180, 256))
    cfg = PrepareConfig(class_weights="median", train_region=region)
    res = prepare_store(tmp_path / "s.zarr", cfg)
    assert not res.skipped and res.instances == "instances"

    # class frequencies: bincount over valid, labelled pixels of the training region
    keep = s["valid"] & (s["labels"] != 255)
    keep[180:] = False
    ref_counts = np.bincount(s["labels"][keep], minlength=2)
    assert res.class_counts == {0: ref_counts[0], 1: ref_counts[1]}
    f = ref_counts / ref_counts.sum()
    assert res.class_weights[0] == pytest.approx(np.median(f) / f[0], rel=1e-10)

    store = SceneStore.open(tmp_path / "s.zarr")
    assert store.has("weights")
    w = store.array("weights")[...]
    assert w.dtype == np.float32
    expect = weight_map(s["instances"], s["labels"], s["valid"], class_weights=res.class_weights)
    assert np.array_equal(w, expect)
    # against the naive border term: within eps on labelled valid pixels, 0 elsewhere
    wc = np.where(s["labels"] == 1, res.class_weights[1], res.class_weights[0])
    ok = s["valid"] & (s["labels"] != 255)
    assert np.abs(w[ok] - (wc + naive_term(s["instances"]))[ok]).max() <= 1e-3
    assert not w[~ok].any()

    params = store.array_params("weights")
    assert params is not None
    assert (params["w0"], params["sigma"], params["eps"]) == (10.0, 5.0, 1e-3)
    assert params["halo"] == 22 and params["radius"] == pytest.approx(border_radius(10, 5, 1e-3))
    assert params["class_weights"] == {"0": res.class_weights[0], "1": res.class_weights[1]}

    # the fingerprint: attribute and JSON beside the store, equal, over the training region
    assert res.fingerprint_path == tmp_path / "s.fingerprint.json"  # beside the store
    fp = Fingerprint.from_json(tmp_path / "s.fingerprint.json")
    assert Fingerprint.from_dict(store.meta["fingerprint"]) == fp == res.fingerprint
    mask = s["valid"].copy()
    mask[180:] = False
    for b in range(3):
        x = s["image"][b][mask].astype(np.float64)
        assert fp.mean[b] == pytest.approx(x.mean(), rel=1e-6) and fp.std[b] == pytest.approx(
            x.std(), rel=1e-6
        )
        assert [fp.p0_5[b], fp.p99_5[b]] == pytest.approx(
            list(np.percentile(x, [0.5, 99.5])), rel=1e-12
        )
    assert fp.nodata_fraction == pytest.approx(9 / 256)
    assert fp.class_counts == res.class_counts and fp.train_region is not None
    assert fp.train_region["bbox"] == [0, 0, 180, 256]

    # the store opens with xarray, weights included
    import xarray as xr

    ds = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    assert ds["weights"].dims == ("y", "x")
    assert np.array_equal(ds["weights"].values, w)


def test_same_result_for_any_chunking(tmp_path: Path, dsb_scene: dict[str, np.ndarray]) -> None:
    s = dsb_scene
    results = []
    for i, (chunk, shard) in enumerate([(64, None), (64, 256), (256, None), (32, 64)]):
        path = tmp_path / f"c{i}.zarr"
        make_store(
            path,
            s["image"],
            labels=s["labels"],
            instances=s["instances"],
            valid=s["valid"],
            chunk=chunk,
            shard=shard,
        )
        prepare_store(path, PrepareConfig(class_weights="inverse"))
        results.append(SceneStore.open(path).array("weights")[...])
    for other in results[1:]:
        assert np.array_equal(results[0], other)
    # and the computation chunk does not matter either
    path = tmp_path / "c0.zarr"
    write_weights(
        SceneStore.open(path, mode="r+"),
        PrepareConfig(class_weights="inverse"),
        {0: 1.0, 1: 1.0},
        chunk=128,
        force=True,
    )
    w = SceneStore.open(path).array("weights")[...]
    assert np.array_equal(w, weight_map(s["instances"], s["labels"], s["valid"]))


def test_rerun_skips_and_changed_parameters_recompute(
    tmp_path: Path, dsb_scene: dict[str, np.ndarray]
) -> None:
    s = dsb_scene
    path = tmp_path / "s.zarr"
    make_store(path, s["image"], labels=s["labels"], instances=s["instances"], valid=s["valid"])
    cfg = PrepareConfig()
    assert not prepare_store(path, cfg).skipped
    store = SceneStore.open(path, mode="r+")
    assert is_current(store, cfg)
    store.array("weights")[0, 0] = 123.0  # a marker: a skipped run leaves it alone
    again = prepare_store(path, cfg)
    assert again.skipped and SceneStore.open(path).array("weights")[0, 0] == 123.0
    (tmp_path / "s.fingerprint.json").unlink()  # a missing JSON is rewritten from the attributes
    assert prepare_store(path, cfg).skipped and (tmp_path / "s.fingerprint.json").is_file()

    other = PrepareConfig(sigma=3.0)
    assert not is_current(SceneStore.open(path), other)
    assert not prepare_store(path, other).skipped
    store = SceneStore.open(path)
    assert store.array_params("weights")["sigma"] == 3.0
    assert np.array_equal(
        store.array("weights")[...], weight_map(s["instances"], s["labels"], s["valid"], sigma=3.0)
    )


def test_interrupted_weights_resume(tmp_path: Path, dsb_scene: dict[str, np.ndarray]) -> None:
    s = dsb_scene
    path = tmp_path / "s.zarr"
    make_store(
        path,
        s["image"],
        labels=s["labels"],
        instances=s["instances"],
        valid=s["valid"],
        chunk=64,
        shard=128,
    )
    cfg = PrepareConfig()
    write_weights(SceneStore.open(path, mode="r+"), cfg, {})
    # pretend the run was killed after unit (0, 1): forget the record, mark one unit done
    store = SceneStore.open(path, mode="r+")
    store.forget_array("weights")
    store.progress("weights").reset()
    store.write_window("weights", store.grid.window(0, 1), np.full((128, 128), 7.0, np.float32))
    store.progress("weights").mark(BlockIndex(0, 1))
    assert write_weights(store, cfg, {})
    w = SceneStore.open(path).array("weights")[...]
    assert (w[:128, 128:] == 7.0).all()  # the finished unit was not recomputed
    expect = weight_map(s["instances"], s["labels"], s["valid"])
    assert np.array_equal(w[128:], expect[128:]) and np.array_equal(
        w[:128, :128], expect[:128, :128]
    )
    assert SceneStore.open(path).has("weights")


def test_instances_derived_from_labels(tmp_path: Path, rng: np.random.Generator) -> None:
    smooth = ndimage.gaussian_filter(rng.random((150, 200)), 2.5)
    labels = (smooth > np.quantile(smooth, 0.7)).astype(np.uint8)
    labels[:4] = 255
    path = tmp_path / "s.zarr"
    make_store(
        path, rng.integers(0, 255, (1, 150, 200), dtype=np.uint8), labels=labels, chunk=32, shard=64
    )
    res = prepare_store(path, PrepareConfig(class_weights="inverse"))
    assert res.instances == "labels"
    store = SceneStore.open(path)
    inst = store.array("instances")[...]
    ref, n = ndimage.label((labels != 0) & (labels != 255))
    assert n > 10 and len(np.unique(inst)) - 1 == n
    pairs = np.unique(np.stack([inst[inst > 0], ref[ref > 0]]), axis=1)
    assert pairs.shape[1] == n  # one-to-one: the same objects, merged across chunks
    params = store.array_params("instances")
    assert params["derived_from"] == "labels" and params["count"] == n
    w = store.array("weights")[...]
    assert np.array_equal(w, weight_map(inst, labels, None, class_weights=res.class_weights))
    assert prepare_store(path, PrepareConfig(class_weights="inverse")).skipped


def test_instances_only_store_and_georef(tmp_path: Path, samples: Path) -> None:
    import rasterio
    from rasterio.features import rasterize

    folder = samples / "spacenet_atlanta"
    with rasterio.open(folder / "sample_geotiff.tif") as src:
        image = src.read()
        georef = GeoRef(src.crs.to_wkt(), src.crs.to_epsg(), tuple(src.transform.to_gdal()))
        shape, transform = (src.height, src.width), src.transform
    feats = json.loads((folder / "geotiff_labels.geojson").read_text())["features"]
    inst = rasterize(
        [(f["geometry"], i) for i, f in enumerate(feats, 1)],
        out_shape=shape,
        transform=transform,
        dtype="uint32",
    )
    path = tmp_path / "atl.zarr"
    make_store(path, image, instances=inst, valid=image[0] != 0, chunk=256, georef=georef)
    with pytest.raises(ConfigError, match="need labels"):
        prepare_store(path, PrepareConfig(class_weights="median"))
    res = prepare_store(path, PrepareConfig(), fingerprint_path=tmp_path / "fp" / "atl.json")
    assert res.class_counts == {} and res.fingerprint_path == tmp_path / "fp" / "atl.json"
    fp = Fingerprint.from_json(res.fingerprint_path)
    assert fp.pixel_size == (0.5, 0.5) and fp.pixel_unit == "metre"
    w = SceneStore.open(path).array("weights")[...]
    assert np.array_equal(w, np.where(image[0] != 0, 1 + border_term(inst), 0).astype(np.float32))


# --------------------------------------------------------------------------- bad input
def test_bad_input(tmp_path: Path, dsb_scene: dict[str, np.ndarray]) -> None:
    s = dsb_scene
    bare = tmp_path / "bare.zarr"
    make_store(bare, s["image"])
    with pytest.raises(StoreError, match="neither labels nor instances"):
        prepare_store(bare)
    with pytest.raises(StoreError, match="no scene store"):
        prepare_store(tmp_path / "missing.zarr")
    full = tmp_path / "full.zarr"
    make_store(full, s["image"], labels=s["labels"], instances=s["instances"])
    with pytest.raises(RegionError, match="does not overlap"):
        prepare_store(full, PrepareConfig(train_region=TrainRegion(bbox=(256, 0, 300, 10))))
    with pytest.raises(ConfigError, match="'sigma' = 0"):
        make_config(sigma=0)
    with pytest.raises(ConfigError, match="'w0' = -1"):
        make_config(w0=-1)
    with pytest.raises(ConfigError, match="explicit_class_weights"):
        prepare_store(full, make_config(class_weights="explicit"))
    assert not SceneStore.open(full).has("weights")  # nothing was written


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run(
        [sys.executable, str(ROOT / "flows" / "prepare.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, dsb_scene: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    r = run_cli(str(tmp_path / "missing.zarr"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: no scene store")
    # the other checks through the same entry point, in process (no Prefect run starts)
    sys.path.insert(0, str(ROOT / "flows"))
    try:
        import prepare as prepare_flow_module  # flows/prepare.py
    finally:
        sys.path.pop(0)
    from _common import run_cli as common_run_cli

    s = dsb_scene
    store = tmp_path / "s.zarr"
    make_store(store, s["image"], labels=s["labels"], instances=s["instances"])
    bare = tmp_path / "bare.zarr"
    make_store(bare, s["image"])
    cases = [
        ([str(store), "--sigma", "0"], "'sigma' = 0.0 is invalid"),
        ([str(store), "--w0", "-2"], "'w0' = -2.0 is invalid"),
        ([str(store), "--train-bbox", "300", "0", "400", "50"], "does not overlap the image"),
        ([str(bare)], "neither labels nor instances"),
        ([str(store), "--explicit-weights", "0=a"], "--explicit-weights must be"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            common_run_cli(lambda argv=argv: prepare_flow_module.main(argv))
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)


@pytest.mark.slow
def test_flow_end_to_end(tmp_path: Path, dsb_scene: dict[str, np.ndarray]) -> None:
    """The real command: Prefect flow, embedded Dask cluster, then a re-run that does nothing."""
    s = dsb_scene
    path = tmp_path / "s.zarr"
    make_store(path, s["image"], labels=s["labels"], instances=s["instances"], valid=s["valid"])
    r = run_cli(
        str(path), "--class-weights", "inverse", "--train-blocks", "64", "3", "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    store = SceneStore.open(path)
    assert store.has("weights") and store.meta["fingerprint"]["train_region"]["block"] == 64
    r = run_cli(str(path), "--class-weights", "inverse", "--train-blocks", "64", "3")
    assert r.returncode == 0 and "up to date" in r.stdout


def test_steps_run_in_order_through_the_hook(tmp_path: Path, rng: np.random.Generator) -> None:
    """prepare_store hands each step to ``step`` (the flow makes each a Prefect task)."""
    labels = (rng.random((64, 64)) > 0.7).astype(np.uint8)
    make_store(tmp_path / "s.zarr", rng.integers(0, 255, (1, 64, 64), dtype=np.uint8),
               labels=labels, chunk=32)  # fmt: skip
    names: list[str] = []

    def step(name: str, work: Any) -> Any:
        names.append(name)
        return work()

    direct = prepare_store(tmp_path / "s.zarr", PrepareConfig(class_weights="inverse"),
                           step=step, force=True)  # fmt: skip
    assert names == ["instances", "class-weights", "weight-map", "fingerprint"]
    again = prepare_store(tmp_path / "s.zarr", PrepareConfig(class_weights="inverse"), force=True)
    assert (direct.class_counts, direct.class_weights) == (again.class_counts, again.class_weights)
    assert direct.fingerprint == again.fingerprint


def test_command_line_forms_of_the_nested_options() -> None:
    base = PrepareConfig(sigma=3.0).model_dump()
    cfg = config_with(base, overrides={"w0": 5.0, "sigma": None}, explicit_weights="0=1,1=4",
                      train_blocks=(64, 3))  # fmt: skip
    assert (cfg.w0, cfg.sigma, cfg.class_weights) == (5.0, 3.0, "explicit")
    assert cfg.explicit_class_weights == {0: 1.0, 1: 4.0}
    assert cfg.train_region == TrainRegion(block=64, holdout_every=3)
    kept = config_with({}, overrides={"class_weights": "none"}, explicit_weights="0=1")
    assert kept.class_weights == "none"  # an explicit mode wins over the weights' implied one
    with pytest.raises(ConfigError, match="give either --train-bbox or --train-blocks"):
        config_with({}, overrides={}, train_bbox=(0, 0, 8, 8), train_blocks=(8, 2))
    with pytest.raises(ConfigError, match="--explicit-weights must be id=weight pairs"):
        config_with({}, overrides={}, explicit_weights="one=1")
