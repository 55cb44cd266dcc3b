"""The pipeline with everything on object storage: its source, work_dir (stage records, scene
store, fingerprint, checkpoints, training state and outputs) on the loopback S3 server, equal
to the same pipeline on local disk; a second run skips every stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml

from segflow.io import locations, remote
from segflow.io.store import SceneStore
from tests.test_pipeline import _write_config, pipeline  # noqa: F401 (a fixture)

STAGES = {"ingest", "prepare", "train", "segment_region", "evaluate"}


def _config(tmp_path: Path, *, work: str, source: str) -> Path:
    """The tiny demo pipeline, with polygons, its work directory and source where asked."""
    path = _write_config(tmp_path, segment={"polygons": True, "parquet": True})
    doc = yaml.safe_load(path.read_text())
    doc["work_dir"] = work
    doc["ingest"]["source"] = source
    doc["train"]["stores"]["train"] = [f"{work}/scene.zarr"]
    path.write_text(yaml.safe_dump(doc))
    return path


def test_pipeline_on_s3_equals_the_local_disk_run(
    pipeline: Any,  # noqa: F811
    s3: str,
    samples: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEGFLOW_CACHE_DIR", str(tmp_path / "cache"))
    chip = samples / "spacenet_atlanta" / "sample_geotiff.tif"
    remote.upload(chip, f"{s3}/in/chip.tif")
    (tmp_path / "l").mkdir()
    (tmp_path / "r").mkdir()
    local = tmp_path / "l" / "work"
    here = pipeline.pipeline_flow(
        str(_config(tmp_path / "l", work=str(local), source=str(chip))), device="cpu"
    )
    work = f"{s3}/work"
    cfg = _config(tmp_path / "r", work=work, source=f"{s3}/in/chip.tif")
    there = pipeline.pipeline_flow(str(cfg), device="cpu")
    assert {k for k, v in there.items() if v["ran"]} == STAGES
    assert not list((tmp_path / "r").glob("s3*")), "a local directory named after the URL"

    # the scene store: every array bit for bit
    a, b = SceneStore.open(f"{work}/scene.zarr"), SceneStore.open(local / "scene.zarr")
    for name in ("image", "valid", "labels", "instances", "weights"):
        np.testing.assert_array_equal(a.array(name)[...], b.array(name)[...])
    assert json.loads(remote.read_bytes(f"{work}/scene.fingerprint.json")) == json.loads(
        (local / "scene.fingerprint.json").read_text()
    )
    # the checkpoints: the same weights (training reads the same patches in the same order)
    for ck in ("best", "last"):
        assert (
            remote.read_bytes(f"{work}/train/{ck}/model.safetensors")
            == (local / "train" / ck / "model.safetensors").read_bytes()
        )
    assert remote.exists(f"{work}/train/state/state.json")  # the resumable training state
    # the outputs: COG pixels and georeference, polygons, evaluation
    got = tmp_path / "got"
    got.mkdir()
    for name in ("prediction.tif", "prediction.gpkg", "prediction.parquet"):
        remote.download(f"{work}/{name}", got / name)
    with rasterio.open(got / "prediction.tif") as x, rasterio.open(local / "prediction.tif") as y:
        np.testing.assert_array_equal(x.read(), y.read())
        assert (x.crs, x.transform, x.nodata) == (y.crs, y.transform, y.nodata)
    for name, read in (
        ("prediction.gpkg", gpd.read_file),
        ("prediction.parquet", gpd.read_parquet),
    ):
        p, q = read(got / name), read(local / name)
        assert len(p) == len(q) > 0 and p.crs == q.crs
        assert p.geometry.geom_equals_exact(q.geometry, 0).all()
    report = json.loads(remote.read_bytes(f"{work}/evaluation.json"))
    want = json.loads((local / "evaluation.json").read_text())
    assert report.pop("prediction") == f"{work}/prediction.tif"
    for doc in (report, want):
        doc.pop("prediction", None), doc.pop("seconds")
    assert report == want
    assert there["evaluate"]["f1"] == here["evaluate"]["f1"]
    # stage records live beside the outputs, on S3
    for stage in STAGES:
        record = json.loads(remote.read_bytes(f"{work}/stages/{stage}.json"))
        assert record["key"] and record["stage"] == stage

    again = pipeline.pipeline_flow(str(cfg), device="cpu")
    assert {k: v["plan"] for k, v in again.items()} == dict.fromkeys(STAGES, "skip")


def test_a_local_mirror_goes_up_whole_and_comes_back_elsewhere(s3: str, tmp_path: Path) -> None:
    """What training writes into the mirror is uploaded (changed files only, deletions too,
    also when the body fails); another machine's empty cache starts from those objects."""
    url = f"{s3}/run/train"
    with locations.local_mirror(url, cache=tmp_path / "a") as local:
        assert not [p for p in local.iterdir() if not p.name.startswith(".segflow")]
        (local / "best").mkdir()
        (local / "best" / "model.safetensors").write_bytes(b"w" * 1000)
        (local / "best" / "checkpoint.json").write_text("{}")
        (local / "old.json").write_text("x")
    assert remote.read_bytes(f"{url}/best/model.safetensors") == b"w" * 1000
    with (
        pytest.raises(RuntimeError, match="killed"),
        locations.local_mirror(url, cache=tmp_path / "a") as local,
    ):
        assert locations.sync_up(local, url) == 0  # nothing changed since the upload
        (local / "old.json").unlink()
        (local / "state.json").write_text('{"step": 7}')
        raise RuntimeError("killed")
    assert not remote.exists(f"{url}/old.json")
    assert remote.read_bytes(f"{url}/state.json") == b'{"step": 7}'
    # another machine: nothing in its cache, so the mirror starts from the objects
    with locations.local_mirror(url, cache=tmp_path / "b") as other:
        assert (other / "state.json").read_text() == '{"step": 7}'
        assert (other / "best" / "model.safetensors").read_bytes() == b"w" * 1000
        assert locations.sync_up(other, url) == 0  # downloaded files are not sent back


def test_train_flow_writes_checkpoints_and_state_to_s3(s3: str, samples: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """flows/train.py --out s3://...: the store is built from its source, the checkpoints and
    the resumable state are objects, and the checkpoint loads from its URL."""
    import importlib.util

    from segflow.train.checkpoint import load_checkpoint

    monkeypatch.setenv("SEGFLOW_CACHE_DIR", str(tmp_path / "cache"))
    chip = samples / "spacenet_atlanta" / "sample_geotiff.tif"
    path = _write_config(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["train"]["stores"]["train"] = [{"store": str(tmp_path / "s.zarr"), "source": str(chip),
                                        "labels": str(chip.parent / "geotiff_labels.geojson")}]  # fmt: skip
    path.write_text(yaml.safe_dump(doc))
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "segflow_flow_train_s3", root / "flows" / "train.py"
    )
    assert spec and spec.loader
    flow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flow)
    out = f"{s3}/runs/t/train"
    flow.main(["--config", str(path), "--out", out, "--no-prefect", "--no-progress",
               "--steps", "4", "--device", "cpu"])  # fmt: skip
    for name in ("best/checkpoint.json", "last/model.safetensors", "state/state.json"):
        assert remote.exists(f"{out}/{name}"), name
    _, meta = load_checkpoint(f"{out}/last")
    assert meta.training["step"] == 4
    assert not list(tmp_path.glob("s3*"))
