"""The training loop: a tiny end-to-end run, checkpoints, metrics files, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from segflow.config.train import ScheduleConfig, make_train_config
from segflow.errors import ConfigError
from segflow.train.checkpoint import load_checkpoint
from segflow.train.loop import lr_factor, recalibrate_batchnorm, train

sys.path.insert(0, str(Path(__file__).parent))
from test_train_data import isbi_crop, make_store


@pytest.fixture(scope="module")
def isbi_stores(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> list[Path]:
    d = tmp_path_factory.mktemp("isbi")
    return [make_store(d / f"{i}.zarr", *isbi_crop(samples, i, 64), chunk=32) for i in range(3)]


def tiny_config(paths: list[Path], **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "stores": {"train": [str(paths[0]), str(paths[1])], "val": [str(paths[2])]},
        "model": {"arch": "unet", "in_channels": 1, "out_channels": 2, "features": 4,
                  "depth": 2, "num_res_units": 0},
        "loss": {"name": "pixel_weighted_ce"},
        "patch": 32, "batch_size": 2, "steps": 6, "steps_per_epoch": 4,
        "val_interval": 3, "checkpoint_interval": 2, "seed": 7, "deterministic": True,
        "augment": {"flips": True, "rot90": True, "elastic": {"p": 0.5, "sigma": 3},
                    "intensity": {"p": 0.5}},
        "schedule": {"name": "cosine", "warmup_steps": 1},
        "optimizer": {"name": "adamw", "lr": 0.01},
    }
    cfg.update(over)
    return cfg


def test_lr_schedules() -> None:
    for name in ("constant", "cosine", "poly", "step", "onecycle"):
        s = ScheduleConfig(name=name, warmup_steps=2, step_size=3)
        f = [lr_factor(s, i, 10) for i in range(10)]
        assert all(0 <= v <= 1 for v in f), name
    assert lr_factor(ScheduleConfig(name="step", step_size=3, gamma=0.5), 7, 10) == 0.25


def test_tiny_train_end_to_end(isbi_stores: list[Path], tmp_path: Path) -> None:
    seen: list[int] = []
    res = train(make_train_config(tiny_config(isbi_stores)), out_dir=tmp_path / "run",
                progress=lambda s, t, info: seen.append(s))
    assert res.steps == 6 and seen == list(range(1, 7))
    out = tmp_path / "run"
    for name in ("metrics.csv", "metrics.json", "curve.png", "best", "last", "state"):
        assert (out / name).exists(), name
    doc = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in doc["history"]] == [3, 6]
    assert 0 <= doc["history"][-1]["pixel_error"] <= 1 and len(doc["train_loss"]) == 6
    model, meta = load_checkpoint(out / "last")
    assert meta.tile == 32 and meta.halo > 0 and meta.bands == ("b0",)
    assert [c.name for c in meta.classes] == ["membrane", "cell"]
    assert meta.training["data_hash"] and meta.metrics["step"] == 6
    assert len(meta.normalization.mean) == 1
    x = torch.zeros(1, 1, 32, 32)
    assert model.eval()(x).shape == (1, 2, 32, 32)
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_config(isbi_stores), out_dir=out)


def test_split_and_class_balanced(isbi_stores: list[Path], tmp_path: Path) -> None:
    cfg = tiny_config(isbi_stores, steps=2, val_interval=2,
                      stores={"train": [str(p) for p in isbi_stores],
                              "split": {"block": 32, "val_every": 4, "margin": 4}},
                      sampling={"mode": "class_balanced", "class_probs": {0: 0.7, 1: 0.3}},
                      loss={"name": "dice_ce"}, early_stopping={"patience": 1})
    res = train(cfg, out_dir=tmp_path / "split")
    assert res.final_metrics["pixels"] == 3 * 32 * 32  # one held-out 32-px block per store


def test_cpu_bf16_channels_last_tracks_float32(isbi_stores: list[Path], tmp_path: Path) -> None:
    """bf16 autocast + NHWC on the CPU: same run within bf16 rounding; fp16 is refused."""
    ref = train(tiny_config(isbi_stores, steps=4, val_interval=4), out_dir=tmp_path / "f32")
    fast = train(
        tiny_config(isbi_stores, steps=4, val_interval=4, amp="bf16", channels_last=True),
        out_dir=tmp_path / "bf16",
    )
    a = json.loads((tmp_path / "f32" / "metrics.json").read_text())["train_loss"]
    b = json.loads((tmp_path / "bf16" / "metrics.json").read_text())["train_loss"]
    assert np.isfinite(b).all() and np.allclose(a, b, rtol=0.05), (a, b)
    assert ref.steps == fast.steps == 4
    model, _ = load_checkpoint(tmp_path / "bf16" / "last")  # NHWC weights saved as plain ones
    assert all(t.is_contiguous() for t in model.state_dict().values())
    with pytest.raises(ConfigError, match="amp 'fp16' needs a CUDA device"):
        train(tiny_config(isbi_stores, amp="fp16"), out_dir=tmp_path / "fp16", device="cpu")


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "state" / "state.safetensors"))


@pytest.mark.parametrize("ema", [None, 0.9])
def test_resume_after_kill_is_exact(
    isbi_stores: list[Path], tmp_path: Path, ema: float | None
) -> None:
    cfg = tiny_config(isbi_stores, ema=ema)
    full = tmp_path / "full"
    train(cfg, out_dir=full)
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, json, sys
        from segflow.train.loop import train
        cfg = json.loads({json.dumps(json.dumps(cfg))})
        def kill(step):
            if step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
        train(cfg, out_dir={str(killed)!r}, on_state_saved=kill)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert proc.returncode == -9, proc.stderr
    assert json.loads((killed / "state" / "state.json").read_text())["loop"]["step"] == 4
    res = train(cfg, out_dir=killed, resume=True)
    assert res.resumed_from == 4 and res.steps == 6
    a, b = _state(full), _state(killed)
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith(("model.", "optim.", "ema.")):
            assert torch.equal(a[k], b[k]), k
    assert any(k.startswith("ema.") for k in a) == (ema is not None)
    ja = json.loads((full / "metrics.json").read_text())
    jb = json.loads((killed / "metrics.json").read_text())
    assert ja["train_loss"] == jb["train_loss"]
    la, _ = load_checkpoint(full / "last")
    lb, _ = load_checkpoint(killed / "last")
    for (ka, va), (_, vb) in zip(la.state_dict().items(), lb.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka
    assert np.isclose(ja["history"][-1]["pixel_error"], jb["history"][-1]["pixel_error"])


def test_flow_cli_reports_one_line_errors(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    cfg = tmp_path / "p.yaml"
    cfg.write_text("schema_version: 1\nname: x\ningest: {source: a.png}\n"
                   "train: {stores: {train: [nowhere.zarr]}, steps: 1, patch: 64,\n"
                   "  model: {arch: unet, in_channels: 1, out_channels: 2, depth: 2}}\n")
    proc = subprocess.run([sys.executable, str(root / "flows" / "train.py"), "--config", str(cfg),
                           "--no-prefect", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no scene store at")


def test_training_stores_use_the_template_instances_only_for_their_own_image(
    samples: Path, tmp_path: Path
) -> None:
    """The pipeline's ingest.instances raster must not be laid over other stores' images."""
    from segflow.config import PipelineConfig
    from segflow.io.store import SceneStore
    from segflow.stages import build_training_stores

    isbi = samples / "isbi2012" / "train"
    img = lambda i: str(isbi / "images" / f"{i}.png")  # noqa: E731
    lab = lambda i: str(isbi / "labels" / f"{i}.png")  # noqa: E731
    stores = [{"store": str(tmp_path / f"{i}.zarr"), "source": img(i), "labels": lab(i)}
              for i in (0, 1)]
    cfg = PipelineConfig.model_validate({
        "schema_version": 1, "name": "t",
        "classes": [{"id": 0, "name": "membrane"}, {"id": 1, "name": "cell"}],
        "ingest": {"source": img(0), "labels": lab(0), "instances": lab(0),
                   "class_map": {0: 0, 255: 1}, "chunk": 256},
    })
    tcfg = make_train_config({
        "stores": {"train": stores}, "steps": 1, "patch": 64,
        "model": {"arch": "unet", "in_channels": 1, "out_channels": 2, "depth": 2},
    })
    build_training_stores(cfg, tcfg)
    inst = [np.asarray(SceneStore.open(tmp_path / f"{i}.zarr").array("instances")[...])
            for i in (0, 1)]
    assert set(np.unique(inst[0]).tolist()) == {0, 255}  # the given raster, as it is
    # store 1 did not get image 0's raster: its objects are its own cells (prepare's
    # connected components of the non-membrane class)
    labels1 = np.asarray(SceneStore.open(tmp_path / "1.zarr").array("labels")[...])
    assert len(np.unique(inst[1])) > 100
    np.testing.assert_array_equal(inst[1] > 0, labels1 == 1)



def test_loss_margin_must_leave_pixels(isbi_stores: list[Path]) -> None:
    assert make_train_config(tiny_config(isbi_stores, loss_margin=15)).loss_margin == 15
    with pytest.raises(ConfigError, match="loss_margin 16 leaves no pixel of a 32-pixel patch"):
        make_train_config(tiny_config(isbi_stores, loss_margin=16))


def test_ema_is_the_moving_average_of_the_weights(isbi_stores: list[Path], tmp_path: Path) -> None:
    """ema_1 = w_1, ema_t = d * ema_(t-1) + (1 - d) * w_t (numpy, from each step's raw weights);
    validation and ``last/`` use it."""
    from safetensors.torch import load_file

    d = 0.75
    cfg = tiny_config(isbi_stores, ema=d, steps=3, checkpoint_interval=1, val_interval=3)
    raw: list[dict[str, np.ndarray]] = []

    def grab(step: int) -> None:
        t = load_file(str(tmp_path / "run" / "state" / "state.safetensors"))
        raw.append({k[len("model."):]: v.numpy() for k, v in t.items() if k.startswith("model.")})

    res = train(cfg, out_dir=tmp_path / "run", on_state_saved=grab)
    assert len(raw) == 3
    floats = [k for k, v in raw[0].items() if v.dtype.kind == "f"]
    expected = {k: raw[0][k].astype(np.float64) for k in floats}
    for w in raw[1:]:
        expected = {k: d * expected[k] + (1 - d) * w[k] for k in floats}
    last, _ = load_checkpoint(tmp_path / "run" / "last")
    got = {k: v.numpy() for k, v in last.state_dict().items()}
    assert any(not np.allclose(raw[-1][k], expected[k], atol=1e-6) for k in floats)
    for k in floats:  # parameters and BatchNorm running statistics alike
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert res.model is not None
    for k, v in res.model.state_dict().items():
        if k in expected:
            np.testing.assert_allclose(v.numpy(), expected[k], rtol=1e-5, atol=1e-6)


def test_recalibrate_batchnorm_is_the_mean_of_the_batch_statistics() -> None:
    """Running mean/var = the equal-weight mean over batches of each batch's mean and unbiased
    variance (numpy, from the layer inputs); weights, momenta and the eval flag unchanged."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3),
                              torch.nn.ReLU(), torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2))
    net.eval()
    params = {k: v.clone() for k, v in net.named_parameters()}
    batches = [torch.randn(n, 2, 8, 8) * 3 + 1 for n in (4, 4, 2)]  # the last one smaller
    inputs: dict[int, list[np.ndarray]] = {1: [], 4: []}
    for x in batches:  # each layer's input when the network runs in training mode
        with torch.no_grad():
            h = net[0](x)
            inputs[1].append(h.numpy())
            h = torch.nn.functional.batch_norm(h, None, None, net[1].weight, net[1].bias,
                                               training=True, eps=net[1].eps)
            inputs[4].append(net[3](net[2](h)).numpy())
    recalibrate_batchnorm(net, batches)
    for i, xs in inputs.items():
        mean = np.mean([x.mean(axis=(0, 2, 3)) for x in xs], axis=0)
        var = np.mean([x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).var(axis=1, ddof=1)
                       for x in xs], axis=0)
        np.testing.assert_allclose(net[i].running_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(net[i].running_var.numpy(), var, rtol=1e-5, atol=1e-6)
        assert net[i].momentum == 0.1 and int(net[i].num_batches_tracked) == 3
    assert not net.training
    for k, v in net.named_parameters():
        assert torch.equal(v, params[k]), k
    plain = torch.nn.Conv2d(2, 2, 1)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    recalibrate_batchnorm(plain, batches)
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())


def test_bn_recalibration_ends_the_run(isbi_stores: list[Path], tmp_path: Path) -> None:
    """Same weights as a run without it, new BatchNorm statistics (used by the last validation
    and ``last/``); a resumed finished run does not do it twice; a bad patch is refused."""
    plain = train(tiny_config(isbi_stores), out_dir=tmp_path / "plain")
    cfg = tiny_config(isbi_stores, bn_recalibration={"patches": 5, "patch": 48})
    res = train(cfg, out_dir=tmp_path / "recal")
    hist = json.loads((tmp_path / "recal" / "metrics.json").read_text())["history"]
    assert [r["step"] for r in hist] == [3, 6]  # step 6 validated once, after recalibrating
    assert hist[-1]["bn_recalibrated"] is True and hist[-1]["bn_recalibration_s"] > 0
    assert res.final_metrics["bn_recalibrated"] is True
    a, _ = load_checkpoint(tmp_path / "plain" / "last")
    b, _ = load_checkpoint(tmp_path / "recal" / "last")
    sa, sb = a.state_dict(), b.state_dict()
    names = dict(a.named_parameters())
    stats = [k for k in sa if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(sa[k], sb[k]) for k in names)
    assert all(not torch.allclose(sa[k], sb[k]) for k in stats)
    assert all(int(sb[k]) == 3 for k in sb if k.endswith("num_batches_tracked"))  # 5 = 2+2+1
    assert plain.final_metrics["pixel_error"] != res.final_metrics["pixel_error"]
    again = train(cfg, out_dir=tmp_path / "recal", resume=True)
    assert again.steps == 6
    assert json.loads((tmp_path / "recal" / "metrics.json").read_text())["history"] == hist
    c, _ = load_checkpoint(tmp_path / "recal" / "last")
    assert all(torch.equal(v, sb[k]) for k, v in c.state_dict().items())
    with pytest.raises(ConfigError, match=r"bn_recalibration\.patch 30 must be a multiple"):
        make_train_config(tiny_config(isbi_stores, bn_recalibration={"patch": 30}))
    split = {"train": [str(p) for p in isbi_stores], "split": {"block": 32, "val_every": 4, "margin": 4}}
    with pytest.raises(ConfigError, match=r"would reach validation pixels.*use at most 32"):
        make_train_config(tiny_config(isbi_stores, stores=split,
                                      bn_recalibration={"patch": 48}))
