"""Checkpoint format: round trip, atomic writes, and every refusal (never unpickling)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from segflow.config import ClassDef
from segflow.errors import CheckpointError
from segflow.train import models
from segflow.train.checkpoint import (
    ENV_CACHE_DIR,
    META_FILE,
    WEIGHTS_FILE,
    CheckpointMeta,
    build_meta,
    check_halo,
    halo_cache_dir,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from segflow.train.models import ModelConfig, build_model
from segflow.train.models import halo as model_halo

CLASSES = (ClassDef(id=0, name="background", color="#000000"),
           ClassDef(id=1, name="membrane", color="#ffffff"),
           ClassDef(id=2, name="cell", color="#ff0000"))


@pytest.fixture(autouse=True)
def _halo_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured halos are cached under the test's own directory, not the user's."""
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading must never reach torch.load (which unpickles)."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", forbidden)


@pytest.fixture
def cfg() -> ModelConfig:
    return ModelConfig(arch="unet", in_channels=2, out_channels=3, features=4, depth=2,
                       num_res_units=1)


@pytest.fixture
def meta(cfg: ModelConfig) -> CheckpointMeta:
    return build_meta(cfg, bands=["red", "nir"], mean=[0.1, 0.2], std=[1.5, 2.5], tile=64,
                      classes=CLASSES, halo=20,
                      training={"data_hashes": ["sha256:abc"], "epochs": 3, "seed": 7},
                      metrics={"mean_iou": 0.5, "per_class_iou": [0.4, None, 0.6]})


@pytest.fixture
def saved(tmp_path: Path, cfg: ModelConfig, meta: CheckpointMeta) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randn(4, 2, 32, 32)
    model.train()
    model(x)  # move BatchNorm running statistics away from their defaults
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, meta)
    return path, model.eval()


def _edit_json(path: Path, change: dict) -> None:
    raw = json.loads((path / META_FILE).read_text())
    raw.update(change)
    (path / META_FILE).write_text(json.dumps(raw))


def test_round_trip(saved: tuple[Path, torch.nn.Module], meta: CheckpointMeta) -> None:
    path, model = saved
    assert sorted(p.name for p in path.iterdir()) == [META_FILE, WEIGHTS_FILE]
    loaded, meta2 = load_checkpoint(path)
    assert not loaded.training
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert meta2.model_copy(update={"tensors": {}}) == meta
    assert meta2.tensors == {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
                             for k, v in model.state_dict().items()}
    assert read_meta(path) == meta2
    # also reachable through either file of the directory
    assert load_checkpoint(path / META_FILE)[1] == meta2


def test_json_document(saved: tuple[Path, torch.nn.Module]) -> None:
    path, _ = saved
    raw = json.loads((path / META_FILE).read_text())
    assert raw["format"] == "segflow-checkpoint" and raw["format_version"] == 1
    assert raw["model"]["arch"] == "unet" and raw["model"]["num_res_units"] == 1
    assert raw["classes"][1] == {"id": 1, "name": "membrane", "color": "#ffffff"}
    assert raw["bands"] == ["red", "nir"]
    assert raw["normalization"] == {"mean": [0.1, 0.2], "std": [1.5, 2.5]}
    assert (raw["tile"], raw["halo"], raw["size_multiple"], raw["tile_independent"]) == (
        64, 20, 4, True)
    assert raw["training"]["seed"] == 7 and raw["metrics"]["per_class_iou"][1] is None
    assert raw["ignore_index"] == 255 and raw["segflow_version"]
    _, (shape, dtype) = next(iter(raw["tensors"].items()))
    assert isinstance(shape, list) and dtype in ("float32", "int64")


def test_meta_rules(cfg: ModelConfig) -> None:
    kw = dict(bands=["a", "b"], mean=[0, 0], std=[1, 1], tile=64, classes=CLASSES, halo=3)
    assert build_meta(cfg, **kw).halo == 3
    with pytest.raises(CheckpointError, match="1 bands"):
        build_meta(cfg, **{**kw, "bands": ["a"]})
    with pytest.raises(CheckpointError, match="normalization has 3 values"):
        build_meta(cfg, **{**kw, "mean": [0, 0, 0], "std": [1, 1, 1]})
    with pytest.raises(CheckpointError, match="std"):
        build_meta(cfg, **{**kw, "std": [1, 0]})
    with pytest.raises(CheckpointError, match="not a multiple of size_multiple 4"):
        build_meta(cfg, **{**kw, "tile": 66})
    with pytest.raises(CheckpointError, match=r"classes must have ids 0..2"):
        build_meta(cfg, **{**kw, "classes": CLASSES[:2]})
    with pytest.raises(CheckpointError, match="ignore_index 2 is also a class id"):
        build_meta(cfg, **{**kw, "ignore_index": 2})
    measured = build_meta(cfg, **{**kw, "halo": None})
    assert measured.halo > 0


def test_save_is_atomic_and_refuses_to_clobber(saved: tuple[Path, torch.nn.Module],
                                               meta: CheckpointMeta) -> None:
    path, model = saved
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(path, model, meta)
    before = (path / WEIGHTS_FILE).read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(path, model, meta, overwrite=True)
    assert (path / WEIGHTS_FILE).read_bytes() != before
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]  # no temporaries left


def test_failed_save_leaves_nothing(tmp_path: Path, meta: CheckpointMeta,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt", build_model(meta.model), meta)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_model_that_does_not_match_the_config(tmp_path: Path,
                                                              meta: CheckpointMeta) -> None:
    other = build_model(meta.model.model_copy(update={"features": 8}))
    with pytest.raises(CheckpointError, match=r"model does not match meta.model"):
        save_checkpoint(tmp_path / "ckpt", other, meta)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ refusals


def test_missing_paths(tmp_path: Path, saved: tuple[Path, torch.nn.Module]) -> None:
    path, _ = saved
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope")
    (path / META_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"has no {META_FILE}"):
        load_checkpoint(path)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"has no {WEIGHTS_FILE}"):
        load_checkpoint(path)


def test_refuses_torch_save_files(tmp_path: Path, saved: tuple[Path, torch.nn.Module]) -> None:
    path, model = saved
    pt = tmp_path / "model.pt"
    torch.save(model.state_dict(), pt)  # zip format
    with pytest.raises(CheckpointError, match=r"is a zip file .*could run arbitrary code"):
        load_checkpoint(pt)
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=2))
    with pytest.raises(CheckpointError, match="is a pickle file"):
        load_checkpoint(legacy)
    # a pickle renamed to model.safetensors
    (path / WEIGHTS_FILE).write_bytes(pt.read_bytes())
    with pytest.raises(CheckpointError, match="is a zip file"):
        load_checkpoint(path)
    (path / WEIGHTS_FILE).write_bytes(legacy.read_bytes())
    with pytest.raises(CheckpointError, match="is a pickle file"):
        load_checkpoint(path)
    # a directory holding a .pt instead of safetensors
    (path / WEIGHTS_FILE).unlink()
    (path / "model.pt").write_bytes(pt.read_bytes())
    with pytest.raises(CheckpointError, match=r"model\.pt.*could run arbitrary code"):
        load_checkpoint(path)


def test_refuses_damaged_weights(saved: tuple[Path, torch.nn.Module]) -> None:
    path, _ = saved
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(path)
    (path / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(path)


def test_refuses_bad_json(saved: tuple[Path, torch.nn.Module]) -> None:
    path, _ = saved
    good = (path / META_FILE).read_text()
    (path / META_FILE).write_text(good[:-10])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)
    (path / META_FILE).write_text(good)
    _edit_json(path, {"format": "something-else"})
    with pytest.raises(CheckpointError, match="not a segflow checkpoint"):
        load_checkpoint(path)
    (path / META_FILE).write_text(good)
    _edit_json(path, {"format_version": 2})
    with pytest.raises(CheckpointError, match="format_version 2 is not supported"):
        load_checkpoint(path)
    (path / META_FILE).write_text(good)
    _edit_json(path, {"surprise": 1})
    with pytest.raises(CheckpointError, match="unknown key 'surprise'"):
        load_checkpoint(path)
    (path / META_FILE).write_text(good)
    _edit_json(path, {"bands": ["red"]})
    with pytest.raises(CheckpointError, match="1 bands"):
        load_checkpoint(path)
    (path / META_FILE).write_text(good)
    _edit_json(path, {"size_multiple": 8})
    with pytest.raises(CheckpointError, match="size_multiple 8 does not match"):
        load_checkpoint(path)


def test_refuses_listing_that_disagrees_with_the_file(saved: tuple[Path, torch.nn.Module]
                                                       ) -> None:
    path, _ = saved
    raw = json.loads((path / META_FILE).read_text())
    name = next(iter(raw["tensors"]))
    good = (path / META_FILE).read_text()
    tensors = dict(raw["tensors"])
    tensors[name] = [[1, 2, 3], tensors[name][1]]
    _edit_json(path, {"tensors": tensors})
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has shape"):
        load_checkpoint(path)
    (path / META_FILE).write_text(good)
    tensors = dict(raw["tensors"])
    del tensors[name]
    _edit_json(path, {"tensors": tensors})
    with pytest.raises(CheckpointError, match="1 unexpected"):
        load_checkpoint(path)
    (path / META_FILE).write_text(good)
    tensors = dict(raw["tensors"])
    tensors[name] = [tensors[name][0], "float16"]
    _edit_json(path, {"tensors": tensors})
    with pytest.raises(CheckpointError, match="dtype float32, expected float16"):
        load_checkpoint(path)


def test_refuses_tensors_that_do_not_fit_the_network(saved: tuple[Path, torch.nn.Module],
                                                      cfg: ModelConfig) -> None:
    path, _ = saved
    raw = json.loads((path / META_FILE).read_text())
    # a JSON that lists the file faithfully but describes a wider network
    _edit_json(path, {"model": {**raw["model"], "features": 8}})
    with pytest.raises(CheckpointError, match=r"does not fit the 'unet' network.*has shape"):
        load_checkpoint(path)
    # a file with a renamed tensor, listed faithfully
    state = build_model(cfg).state_dict()
    key = next(iter(state))
    state = {("renamed." + k if k == key else k): v.contiguous() for k, v in state.items()}
    save_file(state, str(path / WEIGHTS_FILE))
    listing = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()}
    _edit_json(path, {"model": raw["model"], "tensors": listing})
    with pytest.raises(CheckpointError, match=r"1 missing.*1 unexpected"):
        load_checkpoint(path)


def test_refuses_a_plain_file(tmp_path: Path) -> None:
    f = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(f))
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(f)


def test_refuses_a_halo_below_the_receptive_field(saved: tuple[Path, torch.nn.Module],
                                                  cfg: ModelConfig) -> None:
    """An edited halo (0, or one pixel short) is refused on load; the recorded one loads."""
    path, model = saved
    measured = model_halo(cfg)
    assert 0 < measured <= 20  # the fixture records 20
    assert load_checkpoint(path)[1].halo == 20  # unedited: loads
    for short in (0, measured - 1):
        _edit_json(path, {"halo": short})
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        text = str(err.value)
        assert "\n" not in text  # one line
        assert f"checkpoint {str(path)!r} records halo {short} px" in text
        assert f"below the {measured} px receptive-field radius measured for its 'unet'" in text
        assert f'restore "halo": {measured}' in text and "re-export the checkpoint" in text
        # inspecting the weights without tiling stays possible
        assert load_checkpoint(path, verify_halo=False)[1].halo == short
    _edit_json(path, {"halo": measured})  # exactly the receptive field: seamless, accepted
    loaded, meta = load_checkpoint(path)
    assert meta.halo == measured and check_halo(meta, path) == measured
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_halo_is_measured_once_per_config(saved: tuple[Path, torch.nn.Module],
                                          cfg: ModelConfig, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads reuse the measurement: in the process, then from the disk cache in a new one."""
    path, _ = saved
    calls: list[int] = []
    real = models.receptive_field

    def counting(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "receptive_field", counting)
    models._halo.cache_clear()
    for _ in range(3):
        load_checkpoint(path)
    assert len(calls) == 1
    cached = list((tmp_path / "cache" / "halo").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["halo"] == model_halo(cfg)

    models._halo.cache_clear()  # as a new process: the file answers
    load_checkpoint(path)
    assert len(calls) == 1
    cached[0].write_text("{damaged")  # a damaged entry is measured again and rewritten
    models._halo.cache_clear()
    load_checkpoint(path)
    assert len(calls) == 2 and json.loads(cached[0].read_text())["halo"] == model_halo(cfg)

    monkeypatch.setenv(ENV_CACHE_DIR, "none")  # no cache on disk
    assert halo_cache_dir() is None
    models._halo.cache_clear()
    load_checkpoint(path)
    assert len(calls) == 3


def test_an_unwritable_halo_cache_is_no_error(saved: tuple[Path, torch.nn.Module],
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = saved
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(ENV_CACHE_DIR, str(blocker))  # a file where the directory should be
    models._halo.cache_clear()
    assert load_checkpoint(path)[1].halo == 20
