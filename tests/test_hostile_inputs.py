"""Hostile command lines across every flow: one ``error:`` line, exit 2, nothing damaged.

Each case is a real command line of ``flows/*.py`` (run by tests/_flow_runner.py, which
imports once and forks a child per case, so the table costs seconds, not minutes). For every
case: exit status 2, exactly one line on stderr and it starts with ``error:`` and names what
was wrong (a per-case fragment), nothing at the case's output paths, and afterwards every
file that existed before in the arena (inputs, other outputs, unrelated files) and the
bundled samples are byte-identical (hashed before and after), and no new file exists but the
resumable ``.partial`` state of the disk-full cases.

The read-only and disk-full cases mount small tmpfs file systems (root, as on CI): a root
process writes through permission bits, so only a read-only mount really refuses it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import mount, tiff_header_bomb, tree_digest, unmount

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
CHIP = SAMPLES / "spacenet_atlanta" / "sample_geotiff.tif"
ISBI = SAMPLES / "isbi2012" / "train"

INGEST, PREPARE, TRAIN, SEGMENT, PIPELINE, EVALUATE, COLLECTION = (
    str(ROOT / "flows" / f"{n}.py")
    for n in (
        "ingest",
        "prepare",
        "train",
        "segment_region",
        "pipeline",
        "evaluate",
        "segment_collection",
    )
)


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Inputs, a checkpoint, a prepared store, configs and bystander files for the cases."""
    from test_segment import CFG, _checkpoint

    from segflow.config import ClassDef, PrepareConfig
    from segflow.ingest import IngestSpec, ingest
    from segflow.prepare import prepare_store
    from segflow.train.models import build_model

    a = tmp_path_factory.mktemp("arena")
    shutil.copy(CHIP, a / "scene.tif")
    shutil.copy(SAMPLES / "landsat" / "RGB.byte.tif", a / "rgb.tif")
    (a / "unrelated.tif").write_bytes(b"a file the user keeps\n")
    (a / "notes.txt").write_text("not an image\n")
    (a / "fake.tif").write_text("not a tiff at all\n")
    raw = CHIP.read_bytes()
    (a / "truncated.tif").write_bytes(raw[: len(raw) // 3])
    (a / "header_only.tif").write_bytes(raw[:500])  # cut inside the tags' values
    tiff_header_bomb(a / "bomb.tif")
    _stac_items(a)
    (a / "a_dir").mkdir()
    (a / "a_dir" / "keep.txt").write_text("keep\n")
    torch.manual_seed(0)
    _checkpoint(a / "ck", build_model(CFG).eval(), mean=400.0, std=300.0)
    shutil.copytree(a / "ck", a / "ck_halo0")
    meta = json.loads((a / "ck_halo0" / "checkpoint.json").read_text())
    meta["halo"] = 0
    (a / "ck_halo0" / "checkpoint.json").write_text(json.dumps(meta))
    torch.save(build_model(CFG).state_dict(), a / "pickled.pt")
    classes = (ClassDef(id=0, name="membrane"), ClassDef(id=1, name="cell"))
    ingest(
        IngestSpec(
            source=str(ISBI / "images" / "0.png"),
            out=str(a / "store.zarr"),
            labels=str(ISBI / "labels" / "0.png"),
            class_map={0: 0, 255: 1},
            chunk=256,
            classes=classes,
        )
    )
    prepare_store(a / "store.zarr", PrepareConfig())
    cfg = yaml.safe_load((ROOT / "pipelines" / "isbi2012_slice0.yaml").read_text())
    cfg["work_dir"] = str(a / "work")
    cfg["ingest"]["source"] = str(ISBI / "images" / "0.png")
    cfg["ingest"]["labels"] = str(ISBI / "labels" / "0.png")
    cfg["train"]["stores"]["train"] = [str(a / "store.zarr")]
    (a / "slice.yaml").write_text(yaml.safe_dump(cfg))
    bad = dict(
        cfg,
        train=dict(cfg["train"], stores=dict(cfg["train"]["stores"], train=[str(a / "nope.zarr")])),
    )
    (a / "missing_store.yaml").write_text(yaml.safe_dump(bad))
    (a / "unknown_key.yaml").write_text(yaml.safe_dump(dict(cfg, colour="red")))
    (a / "broken.yaml").write_text("name: [unclosed\n")
    (a / "missing_source.yaml").write_text(
        yaml.safe_dump(dict(cfg, ingest=dict(cfg["ingest"], source=str(a / "gone.png"))))
    )
    (a / "bad_tile.yaml").write_text(
        yaml.safe_dump(dict(cfg, segment=dict(cfg["segment"], tile=0)))
    )
    (a / "empty_collection.yaml").write_text(
        yaml.safe_dump(dict(cfg, work_dir=str(a / "work_col"),
                            collection={"scenes": str(a / "nothing_*.tif")}))
    )  # fmt: skip
    from segflow.train.loop import STATE_VERSION

    state = a / "resume_out" / "state"
    state.mkdir(parents=True)
    (state / "state.json").write_text(json.dumps({"version": STATE_VERSION}))
    (state / "state.safetensors").write_bytes(
        __import__("pickle").dumps({"weights": np.zeros(3)})  # a pickle where tensors belong
    )
    ro_ok = mount(a / "ro", tmpfs_size="1m", read_only=True)
    full_ok = mount(a / "full", tmpfs_size="160k")
    shutil.copytree(a / "store.zarr", a / "ro_store_src.zarr")
    store_ok = mount(a / "ro_store.zarr", bind=a / "ro_store_src.zarr", read_only=True)
    if not (ro_ok and full_ok and store_ok):
        for m in ("ro", "full", "ro_store.zarr"):
            unmount(a / m)
        pytest.skip("needs root to mount tmpfs file systems (read-only and disk-full cases)")
    yield a
    for m in ("ro", "full", "ro_store.zarr"):
        unmount(a / m)


def _stac_items(a: Path) -> None:
    """STAC Items the cases misuse: two raster assets, one pointing nowhere; a collection."""

    def item(assets: dict[str, str]) -> dict[str, Any]:
        return {"type": "Feature", "stac_version": "1.1.0", "id": "scene", "geometry": None,
                "properties": {"datetime": "2020-01-01T00:00:00Z"}, "links": [],
                "assets": {k: {"href": h, "type": "image/tiff"} for k, h in assets.items()}}  # fmt: skip

    (a / "two_assets.json").write_text(json.dumps(item({"pan": "./scene.tif", "rgb": "./rgb.tif"})))
    (a / "gone_asset.json").write_text(json.dumps(item({"pan": "./gone_asset.tif"})))
    (a / "collection.json").write_text(json.dumps({"type": "FeatureCollection", "features": []}))


def cases(a: Path) -> list[dict[str, Any]]:
    """(id, script, argv, output paths that must not appear, fragment of the error line)."""
    seg = [SEGMENT, "--image", str(a / "scene.tif"), "--model", str(a / "ck")]
    out = str(a / "mask.tif")
    t: list[tuple[str, str, list[str], list[str], str]] = [
        # ---- ingest
        (
            "ingest-missing-source",
            INGEST,
            [str(a / "gone.tif"), "--out", str(a / "s1.zarr")],
            ["s1.zarr"],
            "not found",
        ),
        (
            "ingest-source-is-dir",
            INGEST,
            [str(a / "a_dir"), "--out", str(a / "s2.zarr")],
            ["s2.zarr"],
            "a_dir",
        ),
        (
            "ingest-truncated",
            INGEST,
            [str(a / "truncated.tif"), "--out", str(a / "s3.zarr")],
            ["s3.zarr"],
            "truncated.tif",
        ),
        (
            "ingest-not-a-tiff",
            INGEST,
            [str(a / "fake.tif"), "--out", str(a / "s4.zarr")],
            ["s4.zarr"],
            "fake.tif",
        ),
        (
            "ingest-header-bomb",
            INGEST,
            [str(a / "bomb.tif"), "--out", str(a / "s5.zarr")],
            ["s5.zarr"],
            "SEGFLOW_MAX_PIXELS",
        ),
        (
            "ingest-out-is-unrelated-file",
            INGEST,
            [str(a / "scene.tif"), "--out", str(a / "unrelated.tif")],
            [],
            "unrelated.tif",
        ),
        (
            "ingest-out-is-source",
            INGEST,
            [str(a / "scene.tif"), "--out", str(a / "scene.tif")],
            [],
            "input",
        ),
        (
            "ingest-out-dir-missing",
            INGEST,
            [str(a / "scene.tif"), "--out", str(a / "no" / "s.zarr")],
            ["no"],
            "does not exist",
        ),
        (
            "ingest-out-read-only",
            INGEST,
            [str(a / "scene.tif"), "--out", str(a / "ro" / "s.zarr")],
            ["ro/s.zarr"],
            "read-only",
        ),
        (
            "ingest-disk-full",
            INGEST,
            [str(a / "scene.tif"), "--out", str(a / "full" / "s.zarr")],
            ["full/s.zarr"],
            "space",
        ),
        (
            "ingest-chunk-zero",
            INGEST,
            [str(a / "scene.tif"), "--out", str(a / "s6.zarr"), "--chunk", "0"],
            ["s6.zarr"],
            "chunk",
        ),
        (
            "ingest-shard-not-multiple",
            INGEST,
            [str(a / "scene.tif"), "--out", str(a / "s7.zarr"), "--shard", "700"],
            ["s7.zarr"],
            "shard",
        ),
        (
            "ingest-class-map-json",
            INGEST,
            [str(a / "scene.tif"), "--out", str(a / "s8.zarr"), "--class-map", "{0: 1"],
            ["s8.zarr"],
            "class-map",
        ),
        (
            "ingest-classes-bad",
            INGEST,
            [str(a / "scene.tif"), "--out", str(a / "s9.zarr"), "--classes", '[{"name": 3}]'],
            ["s9.zarr"],
            "classes",
        ),
        (
            "ingest-labels-missing",
            INGEST,
            [
                str(a / "scene.tif"),
                "--out",
                str(a / "s10.zarr"),
                "--labels",
                str(a / "gone.geojson"),
            ],
            ["s10.zarr"],
            "gone.geojson",
        ),
        (
            "ingest-labels-not-labels",
            INGEST,
            [str(a / "scene.tif"), "--out", str(a / "s11.zarr"), "--labels", str(a / "notes.txt")],
            ["s11.zarr"],
            "notes.txt",
        ),
        (
            "ingest-level-too-high",
            INGEST,
            [str(a / "scene.tif"), "--out", str(a / "s12.zarr"), "--level", "7"],
            ["s12.zarr"],
            "level",
        ),
        (
            "ingest-other-store-exists",
            INGEST,
            [str(a / "scene.tif"), "--out", str(a / "store.zarr")],
            [],
            "different store",
        ),
        (
            "ingest-out-existing-dir",
            INGEST,
            [str(a / "scene.tif"), "--out", str(a / "a_dir")],
            [],
            "not a scene store",
        ),
        # ---- prepare
        ("prepare-missing-store", PREPARE, [str(a / "gone.zarr")], [], "gone.zarr"),
        ("prepare-store-is-file", PREPARE, [str(a / "notes.txt")], [], "notes.txt"),
        ("prepare-negative-w0", PREPARE, [str(a / "store.zarr"), "--w0", "-1"], [], "w0"),
        ("prepare-zero-sigma", PREPARE, [str(a / "store.zarr"), "--sigma", "0"], [], "sigma"),
        (
            "prepare-read-only-store",
            PREPARE,
            [str(a / "ro_store.zarr"), "--force"],
            [],
            "read-only",
        ),
        # ---- train
        ("train-missing-config", TRAIN, ["--config", str(a / "gone.yaml")], [], "gone.yaml"),
        ("train-broken-yaml", TRAIN, ["--config", str(a / "broken.yaml")], [], "broken.yaml"),
        ("train-unknown-key", TRAIN, ["--config", str(a / "unknown_key.yaml")], [], "colour"),
        (
            "train-out-is-file",
            TRAIN,
            ["--config", str(a / "slice.yaml"), "--out", str(a / "unrelated.tif")],
            [],
            "not a directory",
        ),
        (
            "train-device-quantum",
            TRAIN,
            ["--config", str(a / "slice.yaml"), "--device", "quantum", "--out", str(a / "t1")],
            ["t1"],
            "quantum",
        ),
        (
            "train-missing-store",
            TRAIN,
            ["--config", str(a / "missing_store.yaml"), "--out", str(a / "t2")],
            ["t2"],
            "nope.zarr",
        ),
        (
            "train-pickle-in-state",
            TRAIN,
            [
                "--config",
                str(a / "slice.yaml"),
                "--out",
                str(a / "resume_out"),
                "--resume",
                "--no-prefect",
                "--steps",
                "2",
            ],
            [],
            "state",
        ),
        # ---- segment_region
        ("segment-out-is-image", SEGMENT, [*seg[1:], "--out", str(a / "scene.tif")], [], "input"),
        (
            "segment-probabilities-is-image",
            SEGMENT,
            [*seg[1:], "--out", out, "--probabilities", str(a / "scene.tif")],
            ["mask.tif"],
            "input",
        ),
        (
            "segment-out-is-model",
            SEGMENT,
            [*seg[1:], "--out", str(a / "ck" / "checkpoint.json")],
            [],
            "input",
        ),
        (
            "segment-out-equals-polygons",
            SEGMENT,
            [*seg[1:], "--out", out, "--polygons", out],
            ["mask.tif"],
            "both name",
        ),
        (
            "segment-out-unrelated-file",
            SEGMENT,
            [*seg[1:], "--out", str(a / "unrelated.tif")],
            [],
            "--overwrite",
        ),
        ("segment-out-is-dir", SEGMENT, [*seg[1:], "--out", str(a / "a_dir")], [], "directory"),
        (
            "segment-out-dir-missing",
            SEGMENT,
            [*seg[1:], "--out", str(a / "no" / "m.tif")],
            ["no"],
            "does not exist",
        ),
        (
            "segment-out-read-only",
            SEGMENT,
            [*seg[1:], "--out", str(a / "ro" / "m.tif")],
            ["ro/m.tif"],
            "read-only",
        ),
        (
            "segment-disk-full",
            SEGMENT,
            [
                *seg[1:],
                "--out",
                str(a / "full" / "m.tif"),
                "--probabilities",
                str(a / "full" / "p.tif"),
            ],
            ["full/m.tif", "full/p.tif"],
            "space",
        ),
        (
            "segment-model-missing",
            SEGMENT,
            ["--image", str(a / "scene.tif"), "--model", str(a / "gone"), "--out", out],
            ["mask.tif"],
            "not found",
        ),
        (
            "segment-model-pickled",
            SEGMENT,
            ["--image", str(a / "scene.tif"), "--model", str(a / "pickled.pt"), "--out", out],
            ["mask.tif"],
            "pickle",
        ),
        (
            "segment-halo-below-field",
            SEGMENT,
            ["--image", str(a / "scene.tif"), "--model", str(a / "ck_halo0"), "--out", out],
            ["mask.tif"],
            "halo",
        ),
        (
            "segment-image-missing",
            SEGMENT,
            ["--image", str(a / "gone.tif"), "--model", str(a / "ck"), "--out", out],
            ["mask.tif"],
            "gone.tif",
        ),
        (
            "segment-image-not-tiff",
            SEGMENT,
            ["--image", str(a / "fake.tif"), "--model", str(a / "ck"), "--out", out],
            ["mask.tif"],
            "fake.tif",
        ),
        (
            "segment-image-truncated",
            SEGMENT,
            ["--image", str(a / "truncated.tif"), "--model", str(a / "ck"), "--out", out],
            ["mask.tif"],
            "truncated.tif",
        ),
        (
            "segment-image-header-bomb",
            SEGMENT,
            ["--image", str(a / "bomb.tif"), "--model", str(a / "ck"), "--out", out],
            ["mask.tif"],
            "SEGFLOW_MAX_PIXELS",
        ),
        (
            "segment-bands-mismatch",
            SEGMENT,
            ["--image", str(a / "rgb.tif"), "--model", str(a / "ck"), "--out", out],
            ["mask.tif"],
            "band",
        ),
        (
            "segment-tile-not-multiple",
            SEGMENT,
            [*seg[1:], "--out", out, "--tile", "102"],
            ["mask.tif"],
            "multiple",
        ),
        (
            "segment-tile-zero",
            SEGMENT,
            [*seg[1:], "--out", out, "--tile", "0"],
            ["mask.tif"],
            "tile",
        ),
        (
            "segment-dask-address-malformed",
            SEGMENT,
            [*seg[1:], "--out", out, "--dask-address", "scheduler:port"],
            ["mask.tif"],
            "not a Dask scheduler address",
        ),
        (
            "segment-workers-zero",
            SEGMENT,
            [*seg[1:], "--out", out, "--workers", "0"],
            ["mask.tif"],
            "--workers 0",
        ),
        (
            "segment-memory-budget",
            SEGMENT,
            [*seg[1:], "--out", out, "--tile", "4096"],
            ["mask.tif"],
            "SEGFLOW_MEMORY_BUDGET",
        ),
        (
            "segment-bbox-outside",
            SEGMENT,
            [*seg[1:], "--out", out, "--bbox", "0", "0", "10", "10"],
            ["mask.tif"],
            "bbox",
        ),
        (
            "segment-window-empty",
            SEGMENT,
            [*seg[1:], "--out", out, "--window", "0", "0", "0", "10"],
            ["mask.tif"],
            "window",
        ),
        (
            "segment-bbox-crs-unknown",
            SEGMENT,
            [
                *seg[1:],
                "--out",
                out,
                "--bbox",
                "733700",
                "3724800",
                "733900",
                "3725000",
                "--bbox-crs",
                "EPSG:12345678",
            ],
            ["mask.tif"],
            "bbox-crs",
        ),
        (
            "segment-device-quantum",
            SEGMENT,
            [*seg[1:], "--out", out, "--device", "quantum"],
            ["mask.tif"],
            "quantum",
        ),
        (
            "segment-overlap-too-big",
            SEGMENT,
            [*seg[1:], "--out", out, "--mode", "gaussian", "--overlap", "1.5"],
            ["mask.tif"],
            "overlap",
        ),
        (
            "segment-work-not-a-store",
            SEGMENT,
            [*seg[1:], "--out", out, "--work", str(a / "a_dir")],
            ["mask.tif"],
            "prediction store",
        ),
        (
            "segment-into-store-of-a-tiff",
            SEGMENT,
            [*seg[1:], "--out", out, "--into-store"],
            ["mask.tif"],
            "scene store",
        ),
        # ---- pipeline
        # ---- evaluate
        (
            "evaluate-missing-prediction",
            EVALUATE,
            [
                "--prediction",
                str(a / "gone.tif"),
                "--reference",
                str(a / "scene.tif"),
                "--out-json",
                str(a / "e1.json"),
            ],
            ["e1.json"],
            "prediction not found",
        ),
        (
            "evaluate-not-a-class-cog",
            EVALUATE,
            [
                "--prediction",
                str(a / "scene.tif"),
                "--reference",
                str(a / "scene.tif"),
                "--out-json",
                str(a / "e2.json"),
            ],
            ["e2.json"],
            "no class table",
        ),
        (
            "evaluate-report-is-input",
            EVALUATE,
            [
                "--prediction",
                str(a / "scene.tif"),
                "--reference",
                str(a / "scene.tif"),
                "--out-json",
                str(a / "scene.tif"),
            ],
            [],
            "input",
        ),
        (
            "evaluate-both-polygons",
            EVALUATE,
            [
                "--prediction",
                str(a / "p.geojson"),
                "--reference",
                str(a / "r.geojson"),
                "--out-markdown",
                str(a / "e3.md"),
            ],
            ["e3.md"],
            "both the prediction and the reference are polygons",
        ),
        (
            "ingest-truncated-in-the-tags",
            INGEST,
            [str(a / "header_only.tif"), "--out", str(a / "s_h.zarr")],
            ["s_h.zarr"],
            "header_only.tif",
        ),
        # ---- collections
        (
            "pipeline-collection-names-no-scene",
            PIPELINE,
            [str(a / "empty_collection.yaml")],
            ["work_col"],
            "collection.scenes",
        ),
        (
            "collection-negative-split-pixels",
            COLLECTION,
            ["--scenes", str(a / "scene.tif"), "--model", str(a / "ck"), "--out-dir",
             str(a / "c5"), "--split-pixels", "-1"],
            ["c5"],
            "--split-pixels -1",
        ),
        (
            "ingest-labels-url-of-an-unsupported-scheme",
            INGEST,
            [str(a / "scene.tif"), "--out", str(a / "s_ftp.zarr"), "--labels",
             "ftp://host/labels.geojson"],
            ["s_ftp.zarr"],
            "unsupported url scheme 'ftp'",
        ),
        (
            "collection-empty-glob",
            COLLECTION,
            [
                "--scenes",
                str(a / "nothing_*.tif"),
                "--model",
                str(a / "ck"),
                "--out-dir",
                str(a / "c1"),
            ],
            ["c1"],
            "names no image",
        ),
        (
            "collection-missing-list",
            COLLECTION,
            ["--scenes", str(a / "gone.txt"), "--model", str(a / "ck"), "--out-dir", str(a / "c2")],
            ["c2"],
            "does not exist",
        ),
        (
            "collection-missing-model",
            COLLECTION,
            [
                "--scenes",
                str(a / "scene.tif"),
                "--model",
                str(a / "nomodel"),
                "--out-dir",
                str(a / "c3"),
            ],
            ["c3"],
            "model not found",
        ),
        (
            "collection-not-a-catalog",
            COLLECTION,
            [
                "--scenes",
                str(a / "two_assets.json"),
                "--model",
                str(a / "ck"),
                "--out-dir",
                str(a / "c4"),
            ],
            ["c4"],
            "itemcollection",
        ),
        # ---- STAC Items as the image
        (
            "stac-no-asset-chosen",
            INGEST,
            [str(a / "two_assets.json"), "--out", str(a / "t1.zarr")],
            ["t1.zarr"],
            "choose the band assets",
        ),
        (
            "stac-unknown-asset",
            SEGMENT,
            [
                "--image",
                str(a / "two_assets.json"),
                "--asset",
                "nir",
                "--model",
                str(a / "ck"),
                "--out",
                str(a / "t2.tif"),
            ],
            ["t2.tif"],
            "has no asset 'nir'",
        ),
        (
            "stac-asset-file-missing",
            INGEST,
            [str(a / "gone_asset.json"), "--out", str(a / "t3.zarr")],
            ["t3.zarr"],
            "gone_asset.tif",
        ),
        (
            "stac-not-an-item",
            SEGMENT,
            [
                "--image",
                str(a / "collection.json"),
                "--model",
                str(a / "ck"),
                "--out",
                str(a / "t4.tif"),
            ],
            ["t4.tif"],
            "is not a STAC Item",
        ),
        (
            "stac-different-grids",
            INGEST,
            [str(a / "two_assets.json"), "--asset", "pan", "rgb", "--out", str(a / "t5.zarr")],
            ["t5.zarr"],
            "different CRSs",
        ),
        (
            "stac-asset-without-item",
            INGEST,
            [str(a / "scene.tif"), "--asset", "pan", "--out", str(a / "t6.zarr")],
            ["t6.zarr"],
            "need a STAC Item",
        ),
        ("pipeline-missing-config", PIPELINE, [str(a / "gone.yaml")], [], "gone.yaml"),
        ("pipeline-broken-yaml", PIPELINE, [str(a / "broken.yaml")], [], "broken.yaml"),
        ("pipeline-unknown-key", PIPELINE, [str(a / "unknown_key.yaml")], [], "colour"),
        ("pipeline-missing-source", PIPELINE, [str(a / "missing_source.yaml")], [], "gone.png"),
        ("pipeline-bad-tile", PIPELINE, [str(a / "bad_tile.yaml")], [], "tile"),
    ]
    env = {"segment-memory-budget": {"SEGFLOW_MEMORY_BUDGET": "20MB"}}
    return [
        {"id": i, "script": s, "argv": argv, "outputs": outs, "match": m, "env": env.get(i, {})}
        for i, s, argv, outs, m in t
    ]


def _run_cases(table: list[dict[str, Any]], tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Run every case through tests/_flow_runner.py; its results by case id."""
    (tmp_path / "cases.json").write_text(json.dumps(table))
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), SEGFLOW_DEBUG="")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "_flow_runner.py"),
            str(tmp_path / "cases.json"),
            str(tmp_path / "results.json"),
        ],
        cwd=tmp_path,  # nothing a case writes by mistake lands in the checkout
        env=env,
        check=True,
        timeout=600,
    )
    return {r["id"]: r for r in json.loads((tmp_path / "results.json").read_text())}


def _one_error_line(case: dict[str, Any], result: dict[str, Any]) -> bool:
    lines = [ln for ln in result["stderr"].splitlines() if ln.strip()]
    return (
        result["status"] == 2
        and len(lines) == 1
        and lines[0].startswith("error: ")
        and case["match"].lower() in lines[0].lower()
    )


def test_hostile_command_lines(arena: Path, tmp_path: Path) -> None:
    table = cases(arena)
    assert len(table) >= 40
    before, samples_before = tree_digest(arena), tree_digest(SAMPLES)
    results = _run_cases(table, tmp_path)
    failures = []
    for case in table:
        r = results[case["id"]]
        present = [o for o in case["outputs"] if (arena / o).exists()]
        if not _one_error_line(case, r) or present:
            failures.append(
                f"{case['id']}: exit {r['status']}, outputs left {present}, stderr:\n{r['stderr'][-2000:]}"
            )
    assert not failures, "\n\n".join(failures)
    after = tree_digest(arena)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"pre-existing files changed or removed: {changed}"
    new = [k for k in after if k not in before and ".partial" not in k]
    assert not new, f"files appeared: {new}"
    assert tree_digest(SAMPLES) == samples_before


# ------------------------------------------------------------------------ object storage
BUCKET = "segflow-hostile"
WRONG_SECRET = "segflow-WRONG-secret-51d2e8"


@pytest.fixture(scope="module")
def s3_auth(tmp_path_factory: pytest.TempPathFactory, arena: Path) -> Iterator[dict[str, str]]:
    """A moto_server that checks credentials, a bucket holding the scene and the checkpoint,
    and the environment with a valid access key."""
    from segflow.io import remote
    from tests._s3 import authorised_bucket, start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3auth") / "moto.log", authenticate=True)
    try:
        env = authorised_bucket(server, BUCKET)
        with pytest.MonkeyPatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            remote.upload(arena / "scene.tif", f"s3://{BUCKET}/scene.tif")
            for f in (arena / "ck").iterdir():
                remote.upload(f, f"s3://{BUCKET}/ck/{f.name}")
        yield env
    finally:
        server.stop()


def s3_cases(env: dict[str, str], arena: Path, configs: Path) -> list[dict[str, Any]]:
    """Bad object-storage input: (id, script, argv, environment changes, error fragment);
    the pipeline configs with a bad ``work_dir`` are written into ``configs``."""
    from tests._s3 import free_port

    b = f"s3://{BUCKET}"
    slice_cfg = yaml.safe_load((arena / "slice.yaml").read_text())
    for name, work in (
        ("no_bucket", "s3://segflow-no-such-bucket/w"),
        ("s3a", f"s3a://{BUCKET}/w"),
    ):
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(dict(slice_cfg, work_dir=work)))
    seg = [SEGMENT, "--image", f"{b}/scene.tif", "--model", f"{b}/ck"]
    t: list[tuple[str, str, list[str], dict[str, str], str]] = [
        ("s3-missing-key", INGEST, [f"{b}/gone.tif", "--out", f"{b}/o1.zarr"], {},
         "no such object"),
        ("s3-missing-bucket", INGEST, ["s3://segflow-no-such-bucket/x.tif", "--out",
                                       f"{b}/o2.zarr"], {}, "no such"),
        ("s3-wrong-secret", INGEST, [f"{b}/scene.tif", "--out", f"{b}/o3.zarr"],
         {"AWS_SECRET_ACCESS_KEY": WRONG_SECRET}, "access denied"),
        ("s3-unknown-key-id", seg[0], [*seg[1:], "--out", f"{b}/o4.tif"],
         {"AWS_ACCESS_KEY_ID": "AKIASEGFLOWUNKNOWN01"}, "access denied"),
        ("s3-unreachable", seg[0], [*seg[1:], "--out", f"{b}/o5.tif"],
         {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, "cannot reach"),
        ("s3-unsupported-scheme", INGEST, ["ftp://example.org/x.tif", "--out", f"{b}/o6.zarr"],
         {}, "unsupported url scheme"),
        ("s3-out-read-only", seg[0], [*seg[1:], "--out", "https://example.org/o7.tif"], {},
         "read only"),
        ("s3-out-missing-bucket", seg[0], [*seg[1:], "--out", "s3://segflow-no-such-bucket/o.tif"],
         {}, "no such"),
        ("s3-missing-model", SEGMENT, ["--image", f"{b}/scene.tif", "--model", f"{b}/nomodel",
                                       "--out", f"{b}/o9.tif"], {}, "no such object"),
        ("s3-out-s3a", INGEST, [f"{b}/scene.tif", "--out", f"s3a://{BUCKET}/o10.zarr"], {},
         "unsupported url scheme"),
        ("s3-work-dir-missing-bucket", PIPELINE, [str(configs / "no_bucket.yaml")], {},
         "no such bucket"),
        ("s3-work-dir-s3a", PIPELINE, [str(configs / "s3a.yaml")], {}, "unsupported url scheme"),
    ]  # fmt: skip
    return [
        {"id": i, "script": s, "argv": argv, "outputs": [], "match": m, "env": {**env, **e}}
        for i, s, argv, e, m in t
    ]


def test_hostile_object_storage_command_lines(
    arena: Path, s3_auth: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Missing key or bucket, a wrong secret, an unknown key, an unreachable endpoint and
    unsupported or read-only URLs: one line naming the URL and never a secret, exit 2,
    nothing written to the bucket or the disk."""
    from segflow.io import remote

    for k, v in s3_auth.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "configs").mkdir()
    table = s3_cases(s3_auth, arena, tmp_path / "configs")
    before, keys = tree_digest(arena), set(remote.list_keys(f"s3://{BUCKET}"))
    results = _run_cases(table, tmp_path)
    failures = [
        f"{c['id']}: exit {results[c['id']]['status']}, stderr:\n{results[c['id']]['stderr'][-2000:]}"
        for c in table
        if not _one_error_line(c, results[c["id"]])
    ]
    assert not failures, "\n\n".join(failures)
    secrets = (s3_auth["AWS_SECRET_ACCESS_KEY"], WRONG_SECRET)
    assert not [r["id"] for r in results.values() if any(x in r["stderr"] for x in secrets)]
    assert set(remote.list_keys(f"s3://{BUCKET}")) == keys  # nothing written
    assert tree_digest(arena) == before
