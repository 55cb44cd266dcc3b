"""The CUDA path: mixed-precision inference against CPU float32, mixed-precision training
steps (bf16, and fp16 with its gradient scaler), and DDP over NCCL on two GPUs.

Marked ``gpu``: deselected by default, skipped where CUDA is missing. A lent GPU machine runs
them with ``benchmarks/gpu_check.sh`` (with ``benchmarks/bench_gpu.py``).
``SEGFLOW_TEST_DEVICE=cpu`` runs them on the CPU instead (bf16 only), to check the tests.
"""

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

sys.path.insert(0, str(Path(__file__).parent))
from test_train_data import isbi_crop, make_store
from test_train_loop import tiny_config

from segflow.geometry import Window
from segflow.infer import InferenceOptions, predict_array
from segflow.infer.readers import ArrayReader
from segflow.train.checkpoint import load_checkpoint
from segflow.train.loop import train

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda() -> str:
    if os.environ.get("SEGFLOW_TEST_DEVICE") == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return "cuda"


@pytest.fixture(scope="module")
def stores(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("gpu")
    return [make_store(d / f"{i}.zarr", *isbi_crop(samples, i, 256), chunk=64) for i in range(3)]


def _config(stores: list[Path], **over: Any) -> dict[str, Any]:
    cfg = tiny_config(stores, steps=300, patch=96, batch_size=8, val_interval=300,
                      checkpoint_interval=300, deterministic=False, loss={"name": "ce"},
                      schedule={"name": "constant"}, optimizer={"name": "adam", "lr": 0.003})  # fmt: skip
    cfg["model"] = {**cfg["model"], "features": 16, "norm": "batch"}
    return {**cfg, **over}


@pytest.fixture(scope="module")
def trained(cuda: str, stores: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A U-Net trained 300 bf16 steps on the GPU: its output directory."""
    out = tmp_path_factory.mktemp("gpu_run") / "bf16"
    train(_config(stores, amp="bf16"), out_dir=out, device=cuda)
    return out


def _losses(out: Path) -> list[float]:
    return list(json.loads((out / "metrics.json").read_text())["train_loss"])


def test_mixed_precision_training_steps_learn(
    cuda: str, trained: Path, stores: list[Path], tmp_path: Path
) -> None:
    """bf16 autocast, and fp16 with its GradScaler: finite losses that fall, finite weights."""
    runs = [trained]
    if cuda != "cpu":  # fp16 autocast is CUDA's
        runs.append(tmp_path / "fp16")
        train(_config(stores, amp="fp16", steps=60, val_interval=60, checkpoint_interval=60),
              out_dir=runs[-1], device=cuda)  # fmt: skip
    for out in runs:
        loss = _losses(out)
        assert np.isfinite(loss).all(), out.name
        assert np.mean(loss[-10:]) < 0.8 * np.mean(loss[:10]), (out.name, loss[:10], loss[-10:])
        model, _ = load_checkpoint(out / "last")
        assert all(torch.isfinite(p).all() for p in model.parameters()), out.name


@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_cuda_inference_with_amp_agrees_with_cpu_float32(
    cuda: str, trained: Path, samples: Path, amp: str
) -> None:
    """A whole ISBI slice (512^2, not trained on): labels on the GPU under autocast (``auto``:
    bf16 where the GPU has it) equal the CPU's float32 labels on >= 99.99 % of the pixels."""
    if cuda == "cpu" and amp == "fp16":
        pytest.skip("fp16 autocast is CUDA's")
    model, meta = load_checkpoint(trained / "best")
    image, _ = isbi_crop(samples, 5, 512)
    reader = ArrayReader(image)
    region = Window(0, 0, *image.shape[1:])
    labels = {}
    amp = "bf16" if cuda == "cpu" else amp  # checked on a CPU: its own bf16 autocast
    for device, mode in (("cpu", "off"), (cuda, amp)):
        opts = InferenceOptions(tile=128, halo=meta.halo, size_multiple=meta.size_multiple,
                                batch_size=8, device=device, amp=mode)  # fmt: skip
        norm = meta.normalization
        probs = predict_array(reader, model, region, options=opts, mean=norm.mean, std=norm.std)
        labels[device] = probs.argmax(0)
    agree = float((labels["cpu"] == labels[cuda]).mean())
    print(f"CUDA amp={amp} vs CPU float32: labels agree on {agree:.6%} of the pixels")
    assert agree >= 0.9999
    assert 0.05 < float(labels["cpu"].mean()) < 0.95  # a real prediction, not one class


def test_ddp_over_nccl_on_two_gpus(cuda: str, stores: list[Path], tmp_path: Path) -> None:
    """torchrun with 2 ranks on 2 GPUs (NCCL, SyncBatchNorm): it trains, every rank ends
    with the same weights, and the loss falls."""
    if cuda == "cpu" or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    cfg = _config(stores, amp="bf16", steps=40, val_interval=40, checkpoint_interval=40)
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, os
        import torch
        from safetensors.torch import save_file
        from segflow.train.loop import train
        res = train(json.loads({json.dumps(json.dumps(cfg))}), out_dir={str(out)!r})
        sd = {{k: v.contiguous().cpu() for k, v in res.model.state_dict().items()}}
        save_file(sd, os.path.join({str(out)!r}, f"rank{{os.environ['RANK']}}.safetensors"))
    """)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    loss = _losses(out)
    assert np.isfinite(loss).all() and np.mean(loss[-5:]) < np.mean(loss[:5])
