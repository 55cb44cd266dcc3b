"""The pipeline's stage keys (segflow.stages) and the pipeline flow's skip / re-run behaviour.

The flow test runs flows/pipeline.py in-process on the bundled SpaceNet chip with a tiny model
(under one module-scoped ``prefect_test_harness``) and asserts which stages ran after each
change; no timings are asserted. The shipped ISBI slice config (raster class labels, no
instances: prepare derives the objects through the embedded Dask client) runs end to end as a
command line, with a few training steps.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from segflow.config import PipelineConfig, load_config
from segflow.stages import (
    StagePlan,
    StageRecord,
    begin_stage,
    canonical_json,
    code_version,
    finish_stage,
    module_closure,
    path_identity,
    plan_run,
    plan_stage,
    read_record,
    read_started,
    record_path,
    stage_key,
    write_record,
)
from segflow.stages import plan as stages

ROOT = Path(__file__).resolve().parents[1]
CHIP = ROOT / "data" / "samples" / "spacenet_atlanta"


# --------------------------------------------------------------------------- stage keys
BASE: dict[str, Any] = dict(
    upstream={"ingest": "a" * 64},
    params={"w0": 10.0, "sigma": 5.0},
    inputs={"source": {"path": "x.tif", "size": 3, "mtime_ns": 1, "sha256": "f" * 64}},
    code="0.1.0+abc",
)


def test_stage_key_is_stable() -> None:
    k = stage_key("prepare", **BASE)
    assert len(k) == 64 and int(k, 16) >= 0
    assert stage_key("prepare", **BASE) == k
    # key order of the parameters does not matter; neither do an input's path, size or mtime
    same = dict(BASE, params={"sigma": 5.0, "w0": 10.0})
    same["inputs"] = {"source": {"path": "y.tif", "size": 9, "mtime_ns": 7, "sha256": "f" * 64}}
    assert stage_key("prepare", **same) == k


@pytest.mark.parametrize(
    "change",
    [
        {"upstream": {"ingest": "b" * 64}},
        {"upstream": {}},
        {"params": {"w0": 5.0, "sigma": 5.0}},
        {"inputs": {"source": {"path": "x.tif", "size": 3, "mtime_ns": 1, "sha256": "e" * 64}}},
        {"inputs": {}},
        {"code": "0.1.0+abd"},
        {"code": "0.2.0+abc"},
    ],
)
def test_stage_key_changes_with_each_ingredient(change: dict[str, Any]) -> None:
    assert stage_key("prepare", **{**BASE, **change}) != stage_key("prepare", **BASE)


def test_stage_key_depends_on_the_stage_name() -> None:
    assert stage_key("prepare", **BASE) != stage_key("train", **BASE)


def test_canonical_json_sorts_and_dumps_models() -> None:
    from segflow.config import PrepareConfig

    assert canonical_json({"b": (1, 2), "a": Path("p")}) == '{"a":"p","b":[1,2]}'
    assert json.loads(canonical_json(PrepareConfig(w0=3)))["w0"] == 3.0


# --------------------------------------------------------------------------- content identity
def test_path_identity_reuses_the_hash_while_size_and_mtime_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    first = path_identity(f)
    calls: list[Path] = []
    real = stages._file_sha256

    def counting(p: Path) -> str:
        calls.append(p)
        return real(p)

    monkeypatch.setattr(stages, "_file_sha256", counting)
    assert path_identity(f, first) == first
    assert calls == []  # not read again
    os.utime(f, ns=(first["mtime_ns"] + 10**9, first["mtime_ns"] + 10**9))
    touched = path_identity(f, first)
    assert calls == [f] and touched["sha256"] == first["sha256"]  # re-read, same content
    f.write_bytes(b"abd")
    assert path_identity(f, touched)["sha256"] != first["sha256"]


def test_path_identity_of_directories(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "checkpoint.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"w1")
    ident = path_identity(d)
    assert ident["kind"] == "directory" and set(ident["files"]) == {
        "checkpoint.json",
        "model.safetensors",
    }
    (d / "model.safetensors").write_bytes(b"w2")
    assert (
        path_identity(d, ident)["files"]["model.safetensors"]["sha256"]
        != (ident["files"]["model.safetensors"]["sha256"])
    )
    z = tmp_path / "s.zarr"
    (z / "image" / "c").mkdir(parents=True)
    (z / "zarr.json").write_text("{}")
    (z / "image" / "zarr.json").write_text("{}")
    (z / "image" / "c" / "0").write_bytes(b"chunk")
    zid = path_identity(z)
    assert zid["kind"] == "zarr" and set(zid["files"]) == {"zarr.json", "image/zarr.json"}


def test_path_identity_of_a_missing_path_is_one_clear_error(tmp_path: Path) -> None:
    from segflow.errors import SourceError

    with pytest.raises(SourceError, match=r"input not found: .*nothere.tif.*check the path"):
        path_identity(tmp_path / "nothere.tif")


# --------------------------------------------------------------------------- code version
def _fake_package(root: Path) -> Path:
    pkg = root / "segflow"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from segflow.sub import g  # lazy\n")
    (pkg / "sub" / "__init__.py").write_text("from segflow.sub.impl import g\n")
    (pkg / "sub" / "impl.py").write_text("import segflow.util\ndef g(): ...\n")
    (pkg / "sub" / "other.py").write_text("x = 1\n")
    (pkg / "util.py").write_text("y = 1\n")
    (pkg / "c.py").write_text("import segflow.sub.other\n")
    return pkg


def test_module_closure_follows_lazy_imports_and_reexports(tmp_path: Path) -> None:
    pkg = _fake_package(tmp_path)
    got = module_closure(["segflow.a"], root=pkg)
    assert got == ("segflow", "segflow.a", "segflow.sub", "segflow.sub.impl", "segflow.util")
    assert "segflow.sub.other" not in got  # a sibling the package does not hand to ``a``
    assert module_closure(["segflow.a"], exclude=["segflow.sub"], root=pkg) == (
        "segflow",
        "segflow.a",
    )


def test_code_version_changes_only_with_the_modules_a_stage_runs(tmp_path: Path) -> None:
    pkg = _fake_package(tmp_path)
    a, c = code_version(["segflow.a"], root=pkg), code_version(["segflow.c"], root=pkg)
    (pkg / "sub" / "other.py").write_text("x = 2\n")
    assert code_version(["segflow.a"], root=pkg) == a
    assert code_version(["segflow.c"], root=pkg) != c
    (pkg / "util.py").write_text("y = 2\n")  # two imports away from ``a``
    assert code_version(["segflow.a"], root=pkg) != a


def test_real_stage_code_closures() -> None:
    ingest = module_closure(*stages.STAGE_CODE["ingest"][:1], exclude=["segflow.train"])
    segment = module_closure(["segflow.segment"])
    assert "segflow.ingest" in ingest and "segflow.segment" not in ingest
    assert not any(m.startswith(("segflow.infer", "segflow.io.export")) for m in ingest)
    # ``from segflow.io.export import write_cog`` is resolved to the module behind it
    assert {"segflow.infer.engine", "segflow.io.export.cog"} <= set(segment)


# --------------------------------------------------------------------------- records
def test_records_round_trip_and_bad_ones_are_ignored(tmp_path: Path) -> None:
    rec = StageRecord(stage="s", key="k", outputs=("o",), result={"ran": True}, inputs={})
    write_record(tmp_path, rec)
    assert read_record(tmp_path, "s") == rec
    record_path(tmp_path, "s").write_text("{not json")
    assert read_record(tmp_path, "s") is None
    record_path(tmp_path, "s").write_text(json.dumps({"record_version": 0, "key": "k"}))
    assert read_record(tmp_path, "s") is None


def test_plan_stage(tmp_path: Path) -> None:
    out = tmp_path / "out.tif"
    out.write_bytes(b"")
    rec = StageRecord(stage="s", key="k", outputs=(str(out),))
    assert plan_stage("k", record=rec, started={"key": "k"}) is StagePlan.SKIP
    assert plan_stage("k2", record=rec, started={"key": "k"}) is StagePlan.FRESH
    assert plan_stage("k2", record=rec, started={"key": "k2"}) is StagePlan.RESUME
    out.unlink()  # an output deleted: the same key runs again, resuming its own work
    assert plan_stage("k", record=rec, started={"key": "k"}) is StagePlan.RESUME
    assert plan_stage("k", record=None, started=None) is StagePlan.FRESH


def test_stage_lifecycle(tmp_path: Path) -> None:
    out = tmp_path / "o.txt"
    run = plan_run(tmp_path, "s", params={"a": 1})
    assert run.plan is StagePlan.FRESH
    begin_stage(run)
    assert (read_started(tmp_path, "s") or {})["key"] == run.key
    assert read_record(tmp_path, "s") is None
    out.write_text("x")
    finish_stage(run, [out], {"ran": True, "seconds": 1.0})
    again = plan_run(tmp_path, "s", params={"a": 1})
    assert again.plan is StagePlan.SKIP and again.previous and again.previous.result["ran"]
    other = plan_run(tmp_path, "s", params={"a": 2})
    assert other.plan is StagePlan.FRESH
    begin_stage(other)  # a clean start forgets the old record: its outputs are being replaced
    assert read_record(tmp_path, "s") is None
    assert plan_run(tmp_path, "s", params={"a": 1}).plan is StagePlan.FRESH
    assert plan_run(tmp_path, "s", params={"a": 2}).plan is StagePlan.RESUME


# --------------------------------------------------------------------------- the pipeline
def _write_config(tmp_path: Path, **changes: dict[str, Any]) -> Path:
    """A tiny copy of pipelines/spacenet_atlanta_buildings.yaml, all outputs in tmp_path."""
    demo = yaml.safe_load((ROOT / "pipelines" / "spacenet_atlanta_buildings.yaml").read_text())
    work = tmp_path / "work"
    demo["work_dir"] = str(work)
    demo["ingest"].update(
        source=str(CHIP / "sample_geotiff.tif"), labels=str(CHIP / "geotiff_labels.geojson")
    )
    t = demo["train"]
    t["stores"]["train"] = [str(work / "scene.zarr")]
    t["model"].update(features=8, depth=2)
    t["schedule"] = {"name": "constant"}
    t.update(patch=64, batch_size=4, steps=10, val_interval=10, checkpoint_interval=10)
    t.pop("time_limit_s", None)
    demo["segment"].update(polygons=False, parquet=False, quicklook=True)
    demo["evaluate"] = {"reference": str(CHIP / "geotiff_labels.geojson")}
    for section, values in changes.items():
        demo[section].update(values)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(demo))
    return path


def _edit(path: Path, section: str, **values: Any) -> None:
    doc = yaml.safe_load(path.read_text())
    doc[section].update(values)
    path.write_text(yaml.safe_dump(doc))


def test_stage_keys_of_the_pipeline(tmp_path: Path) -> None:
    """Which keys a config change moves, without running anything (ingest inputs are hashed)."""
    path = _write_config(tmp_path)

    def keys() -> dict[str, str]:
        cfg = load_config(path)
        store = cfg.work_path / "scene.zarr"
        ing = stages.plan_ingest(cfg)
        prep = stages.plan_prepare(cfg, ing)
        return {"ingest": ing.key, "prepare": prep.key, "train": _train(cfg, store, ing, prep)}

    def _train(cfg: PipelineConfig, store: Path, ing: Any, prep: Any) -> str:
        return stages.plan_train(cfg, store, ing, prep).key

    k0 = keys()
    _edit(path, "segment", tile=128, mode="gaussian")
    assert keys() == k0
    _edit(path, "train", seed=1)
    k1 = keys()
    assert k1["train"] != k0["train"] and k1["prepare"] == k0["prepare"]
    _edit(path, "prepare", w0=5.0)
    k2 = keys()
    assert k2["ingest"] == k0["ingest"]
    assert k2["prepare"] != k1["prepare"] and k2["train"] != k1["train"]
    _edit(path, "ingest", chunk=128)
    assert all(a != b for a, b in zip(keys().values(), k2.values(), strict=True))


@pytest.fixture(scope="module")
def pipeline() -> Any:
    """flows/pipeline.py as a module, under one Prefect test harness for the whole module."""
    from prefect.testing.utilities import prefect_test_harness

    spec = importlib.util.spec_from_file_location(
        "segflow_flow_pipeline", ROOT / "flows" / "pipeline.py"
    )
    assert spec and spec.loader
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    # None: the flows' own PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (90 s, set by
    # flows/_common, imported above), not the harness's fixed 30 s a loaded 2-core CI missed
    with prefect_test_harness(server_startup_timeout=None):
        yield module
    sys.modules.pop(spec.name, None)


def _ran(st: dict[str, Any]) -> set[str]:
    return {name for name, s in st.items() if s["ran"]}


def _mtimes(paths: list[Path]) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


def test_pipeline_reruns_only_what_changed(pipeline: Any, tmp_path: Path) -> None:
    path = _write_config(tmp_path)
    work = tmp_path / "work"
    cog = work / "prediction.tif"
    all_stages = {"ingest", "prepare", "train", "segment_region", "evaluate"}

    first = pipeline.pipeline_flow(str(path), device="cpu")
    assert _ran(first) == all_stages
    report = json.loads((work / "evaluation.json").read_text())
    assert report["objects"]["reference"] == 43 and first["evaluate"]["f1"] is not None
    assert {s["plan"] for s in first.values()} == {"fresh"}
    for name in all_stages:
        rec = read_record(work, name)
        assert rec is not None and rec.outputs and all(Path(p).exists() for p in rec.outputs)
        # Prefect's cache holds the same key (its result persisted under the work directory)
        assert (work / ".prefect-results" / f"{name}-{rec.key}").is_file()
    assert cog.is_file()
    ckpt = sorted((work / "train").rglob("*.safetensors"))
    assert ckpt

    second = pipeline.pipeline_flow(str(path), device="cpu")
    assert _ran(second) == set()
    assert second["segment_region"]["outputs"] == first["segment_region"]["outputs"]
    cfg = load_config(path)
    text = pipeline.summary(cfg, second)
    assert text.count("skipped (current)") == 5 and "ran in" not in text
    assert "objects F1" in text
    assert "ran in" in pipeline.summary(cfg, first)

    # an inference option: only segment_region, the checkpoint untouched
    before_cog, before_ckpt = cog.stat().st_mtime_ns, _mtimes(ckpt)
    _edit(path, "segment", tile=128)
    third = pipeline.pipeline_flow(str(path), device="cpu")
    assert _ran(third) == {"segment_region", "evaluate"}  # a new prediction is evaluated
    assert cog.stat().st_mtime_ns != before_cog
    assert _mtimes(ckpt) == before_ckpt

    # an export option alone: segment_region again, re-exporting without re-inferring, and
    # the output no longer asked for is removed (it would be stale)
    quicklook = Path(third["segment_region"]["outputs"]["quicklook"])
    assert quicklook.is_file()
    _edit(path, "segment", quicklook=False)
    export_only = pipeline.pipeline_flow(str(path), device="cpu")
    assert _ran(export_only) == {"segment_region", "evaluate"}
    assert export_only["segment_region"]["tiles"] == 0
    assert not quicklook.exists() and cog.is_file()

    # a prepare option: prepare, train and segment_region, not ingest
    store_meta = (work / "scene.zarr" / "image" / "zarr.json").stat().st_mtime_ns
    _edit(path, "prepare", w0=5.0)
    fourth = pipeline.pipeline_flow(str(path), device="cpu")
    assert _ran(fourth) == {"prepare", "train", "segment_region", "evaluate"}
    assert (work / "scene.zarr" / "image" / "zarr.json").stat().st_mtime_ns == store_meta

    # a deleted output: its stage runs again (re-exporting from the finished inference store)
    cog.unlink()
    fifth = pipeline.pipeline_flow(str(path), device="cpu")
    assert _ran(fifth) == {"segment_region"}
    assert fifth["segment_region"]["plan"] == "resume"
    assert fifth["segment_region"]["tiles"] == 0  # nothing inferred again
    assert cog.is_file()

    # an evaluation option: only the evaluation, which the segment_region key still keys
    _edit(path, "evaluate", iou=0.75)
    sixth = pipeline.pipeline_flow(str(path), device="cpu")
    assert _ran(sixth) == {"evaluate"}
    assert json.loads((work / "evaluation.json").read_text())["objects"]["iou_threshold"] == 0.75

    # a collection section: only segment_collection runs, with the pipeline's trained model;
    # each scene's prediction is segment_region's over that scene
    scenes = [_cut(tmp_path / "scenes", "a", 0, 0), _cut(tmp_path / "scenes", "b", 300, 200)]
    doc = yaml.safe_load(path.read_text())
    doc["collection"] = {"scenes": str(tmp_path / "scenes" / "*.tif"), "tile": 128,
                         "polygons": False}  # fmt: skip
    path.write_text(yaml.safe_dump(doc))
    seventh = pipeline.pipeline_flow(str(path), device="cpu")
    assert _ran(seventh) == {"segment_collection"}
    col = seventh["segment_collection"]
    assert (col["scenes"], col["done"], col["failed"]) == (2, 2, 0)
    assert "collection: 2 scenes (2 done" in pipeline.summary(load_config(path), seventh)
    _assert_same_prediction(scenes[1], work / "train" / "best", work / "collection" / "b")
    # a new scene: the stage runs again, and only that scene is segmented
    _cut(tmp_path / "scenes", "c", 500, 500)
    eighth = pipeline.pipeline_flow(str(path), device="cpu")
    assert _ran(eighth) == {"segment_collection"}
    assert (eighth["segment_collection"]["done"], eighth["segment_collection"]["skipped"]) == (1, 2)
    assert _ran(pipeline.pipeline_flow(str(path), device="cpu")) == set()


def _cut(folder: Path, name: str, row: int, col: int) -> Path:
    """A 300 x 300 scene of the chip at (row, col), as ``gdal_translate -srcwin`` would."""
    import rasterio
    from rasterio.windows import Window

    folder.mkdir(exist_ok=True)
    with rasterio.open(CHIP / "sample_geotiff.tif") as src:
        win = Window(col, row, 300, 300)
        profile = dict(src.profile, height=300, width=300, transform=src.window_transform(win))
        with rasterio.open(folder / f"{name}.tif", "w", **profile) as dst:
            dst.write(src.read(window=win))
    return folder / f"{name}.tif"


def _assert_same_prediction(scene: Path, model: Path, folder: Path) -> None:
    import numpy as np
    import rasterio

    from segflow.segment import SegmentRequest, segment_region

    ref = scene.parent.parent / f"ref-{scene.stem}.tif"
    segment_region(SegmentRequest(image=str(scene), model=str(model), tile=128, out=str(ref)))
    with rasterio.open(ref) as want, rasterio.open(folder / "prediction.tif") as got:
        assert (got.crs, got.transform) == (want.crs, want.transform)
        np.testing.assert_array_equal(got.read(), want.read())


# --------------------------------------------------------------------------- ISBI slice, CLI
# a plain pixel grid (PNG): the image and the COG have no georeference
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_isbi_slice_pipeline_runs_from_the_command_line(tmp_path: Path) -> None:
    """`python flows/pipeline.py pipelines/isbi2012_slice0.yaml`, shortened to 10 steps.

    Raster labels and no instances: prepare derives the cells as connected components on the
    embedded Dask client (this crashed with "'list' object has no attribute 'result'").
    """
    import numpy as np
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    from segflow.io.store import SceneStore
    from segflow.train.checkpoint import load_checkpoint
    from segflow.train.models import halo

    doc = yaml.safe_load((ROOT / "pipelines" / "isbi2012_slice0.yaml").read_text())
    work = tmp_path / "work"
    doc["work_dir"] = str(work)
    ing = doc["ingest"]
    ing.update(source=str(ROOT / ing["source"]), labels=str(ROOT / ing["labels"]))
    t = doc["train"]
    assert t["stores"]["train"] == ["outputs/isbi2012_slice0/scene.zarr"]  # the shipped layout
    t["stores"]["train"] = [str(work / "scene.zarr")]
    t["model"].update(arch="unet", features=8, depth=2)  # a smaller, faster network
    t.update(patch=64, batch_size=4, steps=10, val_interval=10, checkpoint_interval=10)
    t["schedule"] = {"name": "constant"}
    t.pop("time_limit_s", None)
    config = tmp_path / "isbi2012_slice0.yaml"
    config.write_text(yaml.safe_dump(doc))

    # the flow's own temporary Prefect server and embedded Dask cluster, as in a fresh clone
    drop = ("PREFECT_API_URL", "SEGFLOW_DASK_ADDRESS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    r = subprocess.run(
        [sys.executable, str(ROOT / "flows" / "pipeline.py"), str(config), "--device", "cpu"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("ingest", "prepare", "train", "segment_region"):
        assert f"| {stage} | ran in" in r.stdout, r.stdout
        assert read_record(work, stage) is not None

    # prepare derived the objects from the raster labels, and wrote the weight map
    store = SceneStore.open(work / "scene.zarr")
    params = store.array_params("instances") or {}
    assert params["derived_from"] == "labels" and params["count"] > 100
    weights = np.asarray(store.array("weights")[...])
    assert weights.shape == (512, 512) and np.isfinite(weights).all() and weights.max() > 1
    assert (work / "scene.fingerprint.json").is_file()

    # the checkpoint carries a halo that covers the network's receptive field
    _, meta = load_checkpoint(work / "train" / "best")
    assert meta.halo >= halo(meta.model) > 0

    # the COG: the image's grid, both classes, a valid COG
    cog = work / "prediction.tif"
    with rasterio.open(ROOT / ing["source"]) as src:
        shape = src.shape
    with rasterio.open(cog) as dst:
        assert (dst.count, dst.shape) == (1, shape)
        mask = dst.read(1)
    values, counts = np.unique(mask, return_counts=True)
    assert values.tolist() == [0, 1] and counts.sum() == shape[0] * shape[1]
    assert min(counts) > 0.05 * mask.size  # membranes and cells, not one class everywhere
    assert cog_validate(str(cog))[0]
    assert (work / "quicklook.png").stat().st_size > 0


def test_segment_and_evaluate_requests_of_a_pipeline(tmp_path: Path) -> None:
    """The segment section's instance and OME-Zarr switches become segment_region's paths;
    the evaluate section evaluates the pipeline's own prediction into its work directory."""
    path = _write_config(tmp_path, segment={"instances": True, "instance_classes": [1],
                                            "ome_zarr": True})  # fmt: skip
    from segflow.stages import evaluate_request, segment_request

    cfg = load_config(path)
    req = segment_request(cfg, "model", "cpu")
    work = cfg.work_path
    assert req.instances == str(work / "instances.tif") and req.instance_classes == (1,)
    assert req.ome_zarr == str(work / "prediction.ome.zarr")
    ev = evaluate_request(cfg)
    assert ev.prediction == req.out and ev.out_json == str(work / "evaluation.json")
    assert ev.reference == str(CHIP / "geotiff_labels.geojson")
