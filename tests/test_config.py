"""Pipeline configs: every shipped YAML validates; unknown keys and bad values fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from segflow.config import load_config
from segflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_pipelines_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name and cfg.ingest.source
    assert (ROOT / cfg.ingest.source).exists()


def _write(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


BASE = {"name": "x", "ingest": {"source": "a.tif"}}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({**BASE, "colour": 1}, "unknown key 'colour'"),
        ({**BASE, "ingest": {"source": "a.tif", "chunkk": 5}}, "unknown key 'ingest.chunkk'"),
        ({**BASE, "ingest": {"source": "a.tif", "chunk": 0}}, "'ingest.chunk' = 0 is invalid"),
        ({**BASE, "prepare": {"sigma": -1}}, "'prepare.sigma' = -1"),
        (
            {**BASE, "classes": [{"id": 0, "name": "a"}, {"id": 0, "name": "b"}]},
            "class ids must be unique",
        ),
        ({**BASE, "classes": [{"id": 255, "name": "a"}]}, "ignore_index 255 is also a class id"),
        ({**BASE, "schema_version": 2}, "schema_version"),
        ({**BASE, "train": {"patch": 64}}, "missing required key 'train.stores'"),
        ({"ingest": {"source": "a.tif"}}, "missing required key 'name'"),
        ({**BASE, "segment": {"tta_set": "horizontal"}}, "needs tta_flips: true"),
    ],
)
def test_bad_configs(tmp_path: Path, doc: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, doc))
    text = str(info.value)
    assert message in text and "\n" not in text


def test_not_yaml_and_missing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
