"""Atomic writes: the old file or the new one, whole; nothing left behind on failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segflow import atomic
from segflow.atomic import atomic_output, write_json_atomic, write_text_atomic
from segflow.errors import ConfigError


def test_write_json_atomic_replaces_whole_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "stages" / "x.json"
    write_json_atomic(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 1}  # the old document, whole
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]  # no temporary left behind


def test_a_failing_writer_leaves_the_old_file_and_no_siblings(tmp_path: Path) -> None:
    out = tmp_path / "m.gpkg"
    write_text_atomic(out, "old")
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        assert tmp.parent == out.parent and tmp.suffix == ".gpkg" and tmp.name.startswith(".")
        tmp.write_text("half")
        (tmp.parent / (tmp.name + "-journal")).write_text("driver debris")
        raise RuntimeError("driver failed")
    assert out.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["m.gpkg"]


def test_nothing_written_or_a_directory_is_refused(tmp_path: Path) -> None:
    with (
        pytest.raises(FileNotFoundError, match="nothing was written"),
        atomic_output(tmp_path / "a.txt"),
    ):
        pass
    assert not (tmp_path / "a.txt").exists()
    with pytest.raises(ConfigError, match="is a directory"), atomic_output(tmp_path):
        pass
