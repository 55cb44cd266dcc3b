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

from segflow.io import remote
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
    for name, read in (("prediction.gpkg", gpd.read_file), ("prediction.parquet", gpd.read_parquet)):
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
