"""What a training run writes besides its state: ``metrics.csv``, ``metrics.json``,
``curve.png`` (rank 0 only) and the ``best`` / ``last`` model checkpoints."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segflow.atomic import atomic_output, write_text_atomic
from segflow.config.train import TrainConfig
from segflow.train.inputs import TrainInputs
from segflow.train.state import LoopState

__all__ = ["save_model", "write_metrics"]


def write_metrics(out_dir: Path, loop: LoopState, total: int) -> None:
    """``metrics.csv`` (one row per validation), ``metrics.json`` and ``curve.png``."""
    rows = loop.history
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and not isinstance(v, list | dict):
                keys.append(k)
    with atomic_output(out_dir / "metrics.csv") as tmp, tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    doc = {
        "steps": loop.step,
        "total_steps": total,
        "best_step": loop.best_step,
        "best_metric": loop.best_metric,
        "stopped_early": loop.stopped_early,
        "history": rows,
        "train_loss": loop.losses,
    }
    write_text_atomic(out_dir / "metrics.json", json.dumps(doc, indent=1, default=float))
    _plot(out_dir, loop)


def _plot(out_dir: Path, loop: LoopState) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot(1, 2, 1)
    if loop.losses:
        y = np.asarray(loop.losses)
        ax.plot(np.arange(1, len(y) + 1), y, lw=0.5, alpha=0.4, label="step")
        k = max(1, len(y) // 50)
        if k > 1:
            sm = np.convolve(y, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(k, len(y) + 1), sm, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend(loc="upper right", fontsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    for key in ("pixel_error", "mean_iou"):
        pts = [(r["step"], r[key]) for r in loop.history if r.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts, strict=True), marker=".", label=key)
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    with atomic_output(out_dir / "curve.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def save_model(
    path: Path,
    model: torch.nn.Module,
    cfg: TrainConfig,
    data: TrainInputs,
    *,
    halo_px: int,
    step: int,
    metrics: Mapping[str, Any],
) -> Path:
    """Write ``model`` as a checkpoint at ``path`` with what it was trained on and ``metrics``."""
    from segflow.train.checkpoint import build_meta, save_checkpoint

    meta = build_meta(
        cfg.model,
        bands=data.bands or tuple(f"band{i}" for i in range(cfg.model.in_channels)),
        mean=data.normalization.mean,
        std=data.normalization.std,
        tile=cfg.patch,
        classes=data.classes,
        ignore_index=data.ignore_index,
        halo=halo_px,
        training={
            "data_hash": data.data_hash,
            "train_stores": data.train_paths,
            "val_regions": len(data.val_regions),
            "normalization": cfg.normalization,
            "step": step,
            "seed": cfg.seed,
            "loss": cfg.loss.model_dump(mode="json"),
            "config": cfg.model_dump(mode="json"),
        },
        metrics={k: v for k, v in metrics.items() if not k.startswith("_")},
    )
    save_checkpoint(path, model, meta, overwrite=True)
    return path
