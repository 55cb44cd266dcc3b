"""The GPU check: segment_region and training on one device, each against the model alone.

    python benchmarks/bench_gpu.py [--device auto|cuda|cpu] [--size 8192] [--steps 60]
        [--workdir bench-data]

1. segment_region over a ``--size``^2 GeoTIFF with the default small U-Net
   (``bench_segment_scale.py`` on the device, with segment_region's default mixed precision):
   Mpx/s end to end, and the ratio to the pure forward of the same windows on the device.
2. Training with the train section of ``pipelines/isbi2012_membranes.yaml`` (BasicUNet 16,
   patch 192, batch 4; bf16/fp16 autocast on CUDA) on 4 of its slices, validation off:
   steps/s of the real loop (sampling, reading, augmenting, normalising, transfer, forward,
   backward, optimizer) and of the pure step (the same model, loss and optimizer on one batch
   already on the device); the device is busy at most pure / real of the loop's time.
3. The loader alone, as the loop runs it (``num_workers`` 0: one core): patches/s from the
   sharded stores with the config's augmentations and with the U-Net paper's (flips, quarter
   turns, elastic deformation), and the cores it would take to feed the pure step.

Prints JSON. ``--device cpu`` runs the same script on a CPU (a check of the script itself;
its ratios are then the CPU's). ``benchmarks/gpu_check.sh`` runs it with the gpu tests.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import python

ROOT = Path(__file__).resolve().parents[1]

#: The ISBI slices trained on (the loader and the steps do not depend on how many).
SLICES = [0, 4]


def segment_part(args: argparse.Namespace) -> dict[str, Any]:
    """bench_segment_scale.py on the device: its JSON."""
    out = subprocess.run(
        python(str(ROOT / "benchmarks" / "bench_segment_scale.py"), "--size", str(args.size),
               "--workdir", args.workdir, "--device", args.device),
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return json.loads(out[out.index("{") :])


def isbi_training_config(work: Path, steps: int) -> Any:
    """The ISBI pipeline's train section on ``SLICES``, stores in ``work``, no validation."""
    from segflow.config import PipelineConfig
    from segflow.stages.training import build_training_stores, training_config

    doc = yaml.safe_load((ROOT / "pipelines" / "isbi2012_membranes.yaml").read_text())
    data = ROOT / "data" / "samples" / "isbi2012" / "train"
    ref = {"store": str(work / "stores" / "{i}.zarr"), "ids": SLICES,
           "source": str(data / "images" / "{i}.png"), "labels": str(data / "labels" / "{i}.png")}  # fmt: skip
    doc["train"]["stores"] = {"train": [ref], "val": []}
    doc["train"].update(time_limit_s=None, bn_recalibration=None, ema=None,
                        schedule={"name": "constant"})  # fmt: skip
    doc["work_dir"] = str(work)
    cfg = PipelineConfig.model_validate(doc)
    tcfg = training_config(cfg, steps=steps)
    build_training_stores(cfg, tcfg)
    return tcfg


def loop_steps_per_s(tcfg: Any, device: str, out: Path) -> float:
    """The training loop's own steps/s (the first 10 steps, warm-up, not counted)."""
    from segflow.train.loop import train

    stamps: dict[int, float] = {}

    def progress(step: int, total: int, info: Any) -> None:
        stamps[step] = time.perf_counter()

    shutil.rmtree(out, ignore_errors=True)
    train(tcfg, out_dir=out, device=device, progress=progress)
    first, last = 10, max(stamps)
    return (last - first) / (stamps[last] - stamps[first])


def pure_steps_per_s(tcfg: Any, device: str, steps: int) -> float:
    """Steps/s of forward, loss, backward and optimizer on one resident batch, with the
    loop's own model, loss, optimizer and autocast."""
    import torch

    from segflow.train.loop import _autocast_factory, build_optimizer
    from segflow.train.losses import build_loss
    from segflow.train.models import build_model

    dev = torch.device(device)
    layout = torch.channels_last if tcfg.channels_last else torch.contiguous_format
    model = build_model(tcfg.model).to(dev).to(memory_format=layout).train()
    opt = build_optimizer(tcfg.optimizer, model.parameters())
    loss_fn = build_loss(tcfg.loss)
    autocast, use_scaler = _autocast_factory(dev, tcfg.amp)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    b, p = tcfg.batch_size, tcfg.patch
    x = torch.randn(b, tcfg.model.in_channels, p, p, device=dev).to(memory_format=layout)
    y = torch.randint(0, tcfg.model.out_channels, (b, p, p), device=dev)
    mask = torch.ones_like(y, dtype=torch.bool)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = model(x)
        loss = loss_fn(logits.float(), y, None, mask=mask)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    for _ in range(5):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps / (time.perf_counter() - t)


def loader_patches_per_s(tcfg: Any, augment: Any, batches: int) -> float:
    """Patches/s the loop's dataset delivers in this process (one core, as num_workers 0)."""
    import torch

    from segflow.train.data import PatchDataset, PatchSampler, scan_scenes
    from segflow.train.inputs import setup_inputs

    data = setup_inputs(tcfg)
    scenes = scan_scenes(data.train_paths, n_classes=tcfg.model.out_channels, split=None,
                         margin=0)  # fmt: skip
    ds = PatchDataset(PatchSampler(tuple(scenes), tcfg.sampling, tcfg.seed), patch=tcfg.patch,
                      epoch_len=10**6, normalization=data.normalization, augment=augment)  # fmt: skip
    torch.set_num_threads(1)
    n = batches * tcfg.batch_size
    ds[0]
    t = time.perf_counter()
    for i in range(1, n + 1):
        ds[i]
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="cuda, cuda:N, cpu; auto: CUDA if any")
    ap.add_argument("--size", type=int, default=8192, help="segment_region image side")
    ap.add_argument("--steps", type=int, default=60, help="training steps timed")
    ap.add_argument("--workdir", default=str(ROOT / "bench-data"))
    args = ap.parse_args()
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    from segflow.config.train import AugmentConfig, ElasticConfig

    work = Path(args.workdir) / "gpu"
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(args.device) if "cuda" in args.device else "cpu",
        "segment_region": segment_part(args),
    }
    tcfg = isbi_training_config(work, args.steps + 10)
    loop = loop_steps_per_s(tcfg, args.device, work / "train")
    pure = pure_steps_per_s(tcfg, args.device, args.steps)
    paper = AugmentConfig(flips=True, rot90=True, elastic=ElasticConfig(),
                          intensity=tcfg.augment.intensity if tcfg.augment else None)  # fmt: skip
    per_core = {name: loader_patches_per_s(tcfg, aug, 20)
                for name, aug in (("config", tcfg.augment), ("paper", paper))}  # fmt: skip
    need = pure * tcfg.batch_size
    report["training"] = {
        "model": tcfg.model.arch, "patch": tcfg.patch, "batch_size": tcfg.batch_size,
        "amp": tcfg.amp, "loop_steps_per_s": round(loop, 2), "pure_steps_per_s": round(pure, 2),
        "busy_fraction_at_most": round(loop / pure, 3),
        "loader_patches_per_s_per_core": {k: round(v, 1) for k, v in per_core.items()},
        "patches_per_s_the_pure_step_takes": round(need, 1),
        "loader_cores_to_feed_it": {k: round(need / v, 2) for k, v in per_core.items()},
    }  # fmt: skip
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
