"""The training loop: patches from scene stores -> a segflow checkpoint, resumable, DDP-ready.

:func:`train` composes the pieces; nothing is read or detected in a constructor. It

1. joins the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1: NCCL on CUDA,
   gloo on CPU) and picks the device (:func:`resolve_device`, or the one passed);
2. opens and checks the stores (bands vs ``model.in_channels``, class tables, ``weights`` when
   the loss needs them), scans the train labels once per chunk for the sampler
   (:func:`segflow.train.data.scan_scenes`) and pools the fingerprints' mean/std;
3. builds model, loss, optimizer; the learning rate is a pure function of the step
   (:func:`lr_factor`), so the schedule needs no saved state;
4. runs ``total_steps`` optimizer steps on batches of :class:`~segflow.train.data.PatchDataset`
   (each rank takes its slice of the global batch), with autocast (bf16, or fp16 with a
   ``GradScaler``) on CUDA only, gradient clipping, and DDP gradient averaging;
5. validates every ``val_interval`` steps and after the last one: segment_region's inference
   engine over the validation stores (or held-out blocks), tiles with ``halo`` pixels of real
   or mirrored context, a confusion matrix summed over ranks, :func:`segflow.train.metrics.summary`;
   with ``bn_recalibration`` the last validation comes after :func:`recalibrate_batchnorm`
   has recomputed the final weights' BatchNorm statistics over training patches;
6. writes ``metrics.csv``, ``metrics.json`` and ``curve.png`` (rank 0 only), the ``best`` and
   ``last`` model checkpoints (:mod:`segflow.train.checkpoint`), and every
   ``checkpoint_interval`` steps a resumable ``state/`` directory: model, optimizer and
   scaler tensors and the torch RNG state in safetensors, everything else in JSON (no
   pickle), written to a temporary directory and renamed into place.

Resuming (``resume=True``) loads ``state/`` and continues at the next step with the same
patches, learning rates and RNG state: on CPU with ``deterministic: true`` the final weights
equal an uninterrupted run's bit for bit (tested).

DDP with BatchNorm: per-rank batch statistics differ from a single process's; on CUDA the
BatchNorm layers become ``SyncBatchNorm`` (global statistics); PyTorch's SyncBatchNorm does
not run on CPU, so CPU/gloo runs keep per-rank statistics (ranks still end with identical
weights: buffers are broadcast from rank 0).

Launch under torchrun with ``torchrun --nproc_per_node=N flows/train.py --config X --no-prefect``.

The parts: :mod:`~segflow.train.inputs` (stores, normalization, validation regions),
:mod:`~segflow.train.distributed` (device, process group, collectives),
:mod:`~segflow.train.state` (resumable state), :mod:`~segflow.train.validation` (the
inference engine over held-out regions, best step, early stopping),
:mod:`~segflow.train.averaging` (EMA, BatchNorm recalibration) and
:mod:`~segflow.train.records` (metrics, curves, checkpoints); :func:`train` composes them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segflow.config.train import OptimizerConfig, ScheduleConfig, TrainConfig, make_train_config
from segflow.errors import ConfigError
from segflow.train.averaging import build_ema, recalibrate_batchnorm, recalibration_batches
from segflow.train.data import PatchDataset, PatchSampler, StepBatchSampler, scan_scenes
from segflow.train.distributed import (
    DistInfo,
    barrier,
    broadcast_from_main,
    init_distributed,
    max_over_ranks,
    mean_over_ranks,
    resolve_device,
)
from segflow.train.inputs import setup_inputs
from segflow.train.losses import build_loss, needs_pixel_weights
from segflow.train.metrics import summary
from segflow.train.models import build_model, halo, size_multiple
from segflow.train.records import save_model, write_metrics
from segflow.train.state import (
    STATE_DIR,
    STATE_VERSION,
    LoopState,
    config_hash,
    load_state,
    restore_state,
    save_state,
)
from segflow.train.validation import ValRegion, select, validate

__all__ = [
    "STATE_DIR",
    "STATE_VERSION",
    "DistInfo",
    "TrainResult",
    "ValRegion",
    "init_distributed",
    "load_state",
    "lr_factor",
    "recalibrate_batchnorm",
    "resolve_device",
    "save_state",
    "train",
    "validate",
]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, Mapping[str, Any]], None]


@dataclass
class TrainResult:
    """What :func:`train` did."""

    out_dir: Path
    steps: int
    total_steps: int
    stopped_early: bool
    best_step: int | None
    best_metric: float | None
    final_metrics: dict[str, Any]
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    wall_s: float
    resumed_from: int | None = None
    model: torch.nn.Module | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """The result as JSON-ready values (no model; final metrics without lists)."""
        return {
            "out_dir": str(self.out_dir), "steps": self.steps, "total_steps": self.total_steps,
            "stopped_early": self.stopped_early, "best_step": self.best_step,
            "best_metric": self.best_metric, "wall_s": round(self.wall_s, 1),
            "best_checkpoint": str(self.best_checkpoint) if self.best_checkpoint else None,
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "final": {k: v for k, v in self.final_metrics.items() if not isinstance(v, list)},
        }  # fmt: skip


def lr_factor(schedule: ScheduleConfig, step: int, total: int) -> float:
    """The learning-rate multiplier for 0-based ``step`` of ``total`` (pure).

    >>> round(lr_factor(ScheduleConfig(name="cosine"), 50, 100), 3)
    0.5
    >>> lr_factor(ScheduleConfig(name="constant", warmup_steps=10), 4, 100)
    0.5
    """
    s = schedule
    total = max(total, 1)
    if s.name == "onecycle":
        up = max(1, round(s.pct_start * total))
        lo = 1.0 / s.div_factor
        if step < up:
            return lo + (1.0 - lo) * step / up
        t = (step - up) / max(1, total - up)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if step < s.warmup_steps:
        return (step + 1) / (s.warmup_steps + 1)
    span = max(1, total - s.warmup_steps)
    t = min(1.0, (step - s.warmup_steps) / span)
    if s.name == "cosine":
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if s.name == "poly":
        return max(s.min_lr_ratio, (1 - t) ** s.power)
    if s.name == "step":
        return float(s.gamma ** ((step - s.warmup_steps) // s.step_size))
    return 1.0


def build_optimizer(cfg: OptimizerConfig, params: Any) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD with momentum, from the config."""
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def _autocast_factory(device: torch.device, amp: str) -> tuple[Callable[[], Any], bool]:
    """(context manager factory, needs a GradScaler) for this device and amp choice."""
    if device.type == "cpu" and amp == "bf16":
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), False
    if device.type == "cpu" and amp == "fp16":
        raise ConfigError("amp 'fp16' needs a CUDA device: use 'bf16' or 'none' on the CPU")
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext, False
    bf16 = amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if bf16 else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), not bf16


def _worker_init(_: int) -> None:
    from segflow.train import data as _data

    _data._STORES.clear()  # handles opened before the fork are not shared


def train(
    config: TrainConfig | Mapping[str, Any],
    *,
    out_dir: str | Path,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    on_state_saved: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train a model as ``config`` says, writing everything into ``out_dir``.

    Parameters
    ----------
    config
        A :class:`TrainConfig` (or a mapping validated into one).
    out_dir
        Output directory: ``best/`` and ``last/`` checkpoints, ``state/``, metrics files.
    resume
        Continue from ``out_dir/state`` (a fresh start when there is none). Without it, an
        existing state is an error (so a run is never silently overwritten).
    device
        Where to train (default :func:`resolve_device`: ``cuda:LOCAL_RANK`` or the CPU).
    progress
        Called after every step as ``progress(step, total_steps, info)`` (rank 0 only);
        ``info`` has ``loss``, ``lr`` and, after validations, the metrics.
    on_state_saved
        Called with the step after each resumable state is written (tests use it).

    Raises
    ------
    ConfigError, StoreError, LabelError, CheckpointError
        Bad config or stores, found before training starts.
    """
    t_start = time.perf_counter()
    cfg = make_train_config(config)
    out = Path(out_dir)
    dev = resolve_device(device)
    dist_info = init_distributed(dev)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        if dev.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
    run = _Run(cfg, out, dev, dist_info, resume=resume, progress=progress,
               on_state_saved=on_state_saved)
    for batch in run.loader():
        if run.step(batch):
            break
    run.finish()
    if dist_info.is_main:
        run.save_last()
    barrier(dist_info)
    loop = run.loop
    return TrainResult(
        out_dir=out, steps=loop.step, total_steps=cfg.total_steps,
        stopped_early=loop.stopped_early, best_step=loop.best_step, best_metric=loop.best_metric,
        final_metrics=dict(run.last_metrics),
        best_checkpoint=out / "best" if loop.best_step is not None else None,
        last_checkpoint=out / "last" if dist_info.is_main else None,
        wall_s=time.perf_counter() - t_start, resumed_from=run.resumed_from, model=run.evaluated,
    )  # fmt: skip


class _Run:
    """One training run: its parts, built in a fixed order (the seeds and a resumed state
    depend on it), and what one step, one validation and the end of the run do."""

    def __init__(
        self,
        cfg: TrainConfig,
        out: Path,
        dev: torch.device,
        dist_info: DistInfo,
        *,
        resume: bool,
        progress: Progress | None,
        on_state_saved: Callable[[int], None] | None,
    ) -> None:
        self.cfg, self.out, self.dev, self.dist_info = cfg, out, dev, dist_info
        self.progress, self.on_state_saved = progress, on_state_saved
        self.data = setup_inputs(cfg)
        scenes = scan_scenes(self.data.train_paths, n_classes=cfg.model.out_channels,
                             split=cfg.stores.split, margin=cfg.margin if cfg.stores.split else 0)
        self.sampler = PatchSampler(tuple(scenes), cfg.sampling, cfg.seed)
        self.loss_fn = build_loss(cfg.loss)
        ignore_value = cfg.loss.ignore_index if cfg.loss.ignore_index is not None else 0
        self.dataset = PatchDataset(
            self.sampler, patch=cfg.patch, epoch_len=cfg.steps_per_epoch * cfg.batch_size,
            normalization=self.data.normalization, augment=cfg.augment,
            with_weights=needs_pixel_weights(cfg.loss), ignore_value=ignore_value,
            loss_margin=cfg.loss_margin,
        )
        self.halo_px = halo(cfg.model)
        self._build_model()
        self.chash = config_hash(cfg)
        self.resumed_from: int | None = None
        loop = restore_state(out, resume=resume, chash=self.chash, model=self.model,
                             optimizer=self.optimizer, ema=self.ema, scaler=self.scaler)
        if loop is not None:
            self.resumed_from = loop.step
        self.loop = loop or LoopState()
        if dist_info.is_main:
            out.mkdir(parents=True, exist_ok=True)
        self.net: torch.nn.Module = self.model
        if dist_info.active:
            from torch.nn.parallel import DistributedDataParallel

            ids = [dev.index] if dev.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.time_base = self.loop.elapsed_s
        self.t_loop = time.perf_counter()
        self.last_metrics: dict[str, Any] = {}

    def _build_model(self) -> None:
        cfg, dev = self.cfg, self.dev
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model).to(dev)
        self.layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = model.to(memory_format=self.layout)  # type: ignore[call-overload]  # documented, not in the stubs
        if self.dist_info.active and dev.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.optimizer = build_optimizer(cfg.optimizer, model.parameters())
        # the weights validation and the checkpoints use: the raw ones, or their moving average
        self.ema = build_ema(model, cfg.ema)
        self.evaluated = self.ema.module if self.ema is not None else model
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]  # before a state sets them
        self.autocast, use_scaler = _autocast_factory(dev, cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        torch.manual_seed(cfg.seed + 1 + self.dist_info.rank)  # dropout etc. per rank

    def loader(self) -> torch.utils.data.DataLoader[Any]:
        cfg, dist_info = self.cfg, self.dist_info
        batch_sampler = StepBatchSampler(start=self.loop.step, stop=cfg.total_steps,
                                         batch_size=cfg.batch_size, rank=dist_info.rank,
                                         world_size=dist_info.world_size)
        self.net.train()
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batch_sampler, num_workers=cfg.num_workers,
            pin_memory=self.dev.type == "cuda",
            worker_init_fn=_worker_init if cfg.num_workers else None, persistent_workers=False,
            # spawn, not fork: forking a process that runs threads (zarr's event loop, Prefect's
            # API client) is unsafe; under a Prefect flow forked workers died at shutdown
            multiprocessing_context="spawn" if cfg.num_workers else None,
        )

    def elapsed(self) -> float:
        """Training seconds so far (the largest over the ranks, so all ranks agree)."""
        t = self.time_base + time.perf_counter() - self.t_loop
        return max_over_ranks(t, self.dev, self.dist_info)

    def _learning_rate(self) -> None:
        cfg, step, total = self.cfg, self.loop.step, self.cfg.total_steps
        sched_step = step
        if cfg.schedule.horizon == "time" and cfg.time_limit_s is not None:
            # the schedule runs to the time limit (or the step count, whichever comes first)
            frac = self.elapsed() / cfg.time_limit_s
            sched_step = max(step, min(total - 1, int(frac * total)))
        f = lr_factor(cfg.schedule, sched_step, total)
        for g, lr0 in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = lr0 * f

    def _optimize(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cfg, dev, model, optimizer, scaler = self.cfg, self.dev, self.model, self.optimizer, self.scaler
        x = batch["image"].to(dev, non_blocking=True).contiguous(memory_format=self.layout)
        y = batch["labels"].to(dev, non_blocking=True)
        mask = batch["mask"].to(dev, non_blocking=True)
        w = batch["weights"].to(dev, non_blocking=True) if "weights" in batch else None
        with self.autocast():
            logits = self.net(x)
        loss = self.loss_fn(logits.float(), y, w, mask=mask)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(model)
        return mean_over_ranks(loss.detach(), self.dist_info)

    def step(self, batch: Mapping[str, torch.Tensor]) -> bool:
        """One optimizer step, and the validation and state it is due; True: stop here."""
        cfg, loop = self.cfg, self.loop
        self._learning_rate()
        loop.losses.append(float(self._optimize(batch)))
        loop.step += 1
        info: dict[str, Any] = {"loss": loop.losses[-1], "lr": self.optimizer.param_groups[0]["lr"]}
        over_time = cfg.time_limit_s is not None and self.elapsed() >= cfg.time_limit_s
        last = loop.step >= cfg.total_steps or over_time
        stop = False
        # with a BatchNorm recalibration the last validation comes after it (finish)
        if (loop.step % cfg.val_interval == 0 or last) and not (
            last and cfg.bn_recalibration is not None
        ):
            stop = self.validate()
            info.update({k: v for k, v in self.last_metrics.items() if isinstance(v, int | float)})
            loop.stopped_early = loop.stopped_early or stop
        if loop.step % cfg.checkpoint_interval == 0 or last or stop:
            self.save_state()
            if self.on_state_saved is not None:
                self.on_state_saved(loop.step)
        if self.progress is not None and self.dist_info.is_main:
            self.progress(loop.step, cfg.total_steps, info)
        return stop or over_time

    def save_state(self) -> None:
        self.loop.elapsed_s = self.time_base + time.perf_counter() - self.t_loop
        if self.dist_info.is_main:
            save_state(self.out, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                       loop=self.loop, config_hash=self.chash, ema=self.ema)

    def validate(self, **extra: Any) -> bool:
        """Validate, log, save best; True when early stopping says stop. ``extra`` goes
        into the history row."""
        cfg, loop = self.cfg, self.loop
        k0 = len(loop.losses) - min(len(loop.losses), cfg.val_interval)
        recent = loop.losses[k0:]
        row: dict[str, Any] = {"step": loop.step, "epoch": loop.step // cfg.steps_per_epoch,
                               "train_loss": float(np.mean(recent)) if recent else None,
                               "lr": self.optimizer.param_groups[0]["lr"],
                               "elapsed_s": round(self.time_base + time.perf_counter()
                                                  - self.t_loop, 3),
                               **extra}  # fmt: skip
        self.sync_buffers()
        if self.data.val_regions:
            cm = validate(
                self.evaluated, self.data.val_regions, num_classes=cfg.model.out_channels,
                normalization=self.data.normalization, context=self.halo_px,
                multiple=size_multiple(cfg.model), tile=cfg.val_tile, device=self.dev,
                ignore_index=self.data.ignore_index, split=cfg.stores.split,
                amp=cfg.amp if self.dev.type == "cuda" else "off", dist_info=self.dist_info,
            )  # fmt: skip
            row.update(summary(cm))
        loop.history.append(row)
        self.last_metrics = row
        log.info("step %d/%d: train loss %s, %s %s", loop.step, cfg.total_steps,
                 row["train_loss"], cfg.select_metric, row.get(cfg.select_metric))
        better, stop = select(loop, row, cfg)
        if better and self.dist_info.is_main:
            save_model(self.out / "best", self.evaluated, cfg, self.data, halo_px=self.halo_px,
                       step=loop.step, metrics=row)
        if self.dist_info.is_main:
            write_metrics(self.out, loop, cfg.total_steps)
        return stop

    def sync_buffers(self) -> None:
        """Rank 0's BatchNorm running statistics everywhere (DDP broadcasts them only at
        the start of a forward, so after the last step each rank holds its own)."""
        ema = self.ema
        broadcast_from_main([*self.model.buffers(), *(ema.buffers() if ema else ())],
                            self.dist_info)

    def finish(self) -> None:
        """The last validation (after a BatchNorm recalibration), unless the last step had it."""
        cfg, loop = self.cfg, self.loop
        recal = cfg.bn_recalibration
        done = loop.history[-1] if loop.history else {}
        if recal is not None and not (done.get("step") == loop.step
                                      and done.get("bn_recalibrated")):
            t0 = time.perf_counter()
            batches = recalibration_batches(
                self.sampler, patches=recal.patches, patch=recal.patch or cfg.patch,
                batch_size=cfg.batch_size, normalization=self.data.normalization,
                layout=self.layout,
            )
            # in the precision inference runs at by default: fp32 on a CPU, autocast on CUDA
            recalibrate_batchnorm(self.evaluated, batches, device=self.dev,
                                  autocast=self.autocast if self.dev.type == "cuda"
                                  else contextlib.nullcontext)  # fmt: skip
            took = time.perf_counter() - t0
            log.info("BatchNorm statistics recomputed over %d patches in %.1f s",
                     recal.patches, took)
            self.validate(bn_recalibrated=True, bn_recalibration_s=round(took, 3))
        elif done.get("step") != loop.step:
            self.validate()
        self.sync_buffers()

    def save_last(self) -> None:
        """``last/``, the final state and metrics (rank 0)."""
        save_model(self.out / "last", self.evaluated, self.cfg, self.data,
                   halo_px=self.halo_px, step=self.loop.step, metrics=self.last_metrics)
        self.save_state()
        write_metrics(self.out, self.loop, self.cfg.total_steps)
