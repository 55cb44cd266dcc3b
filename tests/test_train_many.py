"""Training from a glob of scenes: the stores are built in parallel (one Dask task each), a
second run builds none, and both runs train on the same patches (the same weights)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

from segflow.config import load_config
from segflow.stages.training import build_training_stores, training_config
from tests.test_pipeline import _write_config

ROOT = Path(__file__).resolve().parents[1]


def _flow() -> Any:
    spec = importlib.util.spec_from_file_location(
        "segflow_flow_train_many", ROOT / "flows" / "train.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grid_scenes(chip: Path, folder: Path, n: int = 5) -> None:
    """The chip as n x n adjoining GeoTIFF scenes."""
    import rasterio
    from rasterio.windows import Window

    folder.mkdir(parents=True)
    with rasterio.open(chip) as src:
        side = src.width // n
        for i in range(n):
            for j in range(n):
                win = Window(j * side, i * side, side, side)
                profile = dict(src.profile, height=side, width=side,
                               transform=src.window_transform(win))  # fmt: skip
                with rasterio.open(folder / f"t{i}{j}.tif", "w", **profile) as dst:
                    dst.write(src.read(window=win))


def test_training_from_a_glob_of_25_scenes(samples: Path, tmp_path: Path) -> None:
    chip = samples / "spacenet_atlanta"
    grid_scenes(chip / "sample_geotiff.tif", tmp_path / "scenes")
    path = _write_config(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["train"]["stores"] = {"train": [{
        "glob": str(tmp_path / "scenes" / "*.tif"),
        "store": str(tmp_path / "stores" / "{stem}.zarr"),
        "labels": str(chip / "geotiff_labels.geojson"),
    }]}  # fmt: skip
    doc["train"].update(steps=3, val_interval=3, checkpoint_interval=3)
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    tcfg = training_config(cfg, steps=None, time_limit_s=None, source=str(path))
    assert len(tcfg.stores.train) == 25  # every scene is a store

    seen: list[dict[str, str]] = []
    first = build_training_stores(cfg, tcfg, on_store=seen.append, workers=2)
    assert {e["action"] for e in first} == {"ingested+prepared"} and len(seen) == 25
    assert [e["store"] for e in first] == [r.store for r in tcfg.stores.train]  # listed order
    assert len({e["pid"] for e in first}) == 2  # two worker processes built them
    again = build_training_stores(cfg, tcfg)
    assert {e["action"] for e in again} == {"current"}

    flow = _flow()
    for out in ("a", "b"):
        flow.main(["--config", str(path), "--out", str(tmp_path / out), "--no-prefect",
                   "--device", "cpu"])  # fmt: skip
    weights = [(tmp_path / o / "last" / "model.safetensors").read_bytes() for o in ("a", "b")]
    assert weights[0] == weights[1]


def test_glob_and_list_entries_and_their_errors(tmp_path: Path) -> None:
    from segflow.config.train import StoresConfig

    for name in ("b.tif", "a.tif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "l.txt").write_text("a.tif\n# a comment\nb.tif\n")
    by_glob = StoresConfig.model_validate(
        {
            "train": [
                {
                    "glob": str(tmp_path / "*.tif"),
                    "store": "s/{stem}.zarr",
                    "labels": "l/{stem}.gpkg",
                }
            ]
        }
    )
    assert [(r.store, Path(r.source or "").name, r.labels) for r in by_glob.train] == [
        ("s/a.zarr", "a.tif", "l/a.gpkg"), ("s/b.zarr", "b.tif", "l/b.gpkg"),
    ]  # fmt: skip
    by_list = StoresConfig.model_validate(
        {"train": [{"list": str(tmp_path / "l.txt"), "store": "s/{stem}.zarr"}]}
    )
    assert [r.store for r in by_list.train] == ["s/a.zarr", "s/b.zarr"]
    for bad, match in (({"glob": str(tmp_path / "*.png"), "store": "x"}, "matches no file"),
                       ({"list": str(tmp_path / "gone.txt"), "store": "x"}, "does not exist"),
                       ({"glob": str(tmp_path / "*.tif")}, "needs store")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            StoresConfig.model_validate({"train": [bad]})
