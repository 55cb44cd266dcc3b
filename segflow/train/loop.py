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
5. validates every ``val_interval`` steps and after the last one: whole-region inference of
   the validation stores (or held-out blocks) in tiles with ``halo`` pixels of real or mirrored
   context, a confusion matrix summed over ranks, :func:`segflow.train.metrics.summary`;
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
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from segflow.atomic import atomic_output, write_text_atomic
from segflow.config import ClassDef
from segflow.config.train import (
    OptimizerConfig,
    SamplingConfig,
    ScheduleConfig,
    TrainConfig,
    make_train_config,
)
from segflow.errors import CheckpointError, ConfigError, StoreError
from segflow.geometry import BlockGrid, Window
from segflow.io.store import SceneStore
from segflow.stats import train_mask_for_window
from segflow.train.data import (
    Normalization,
    PatchDataset,
    PatchSampler,
    StepBatchSampler,
    check_store,
    read_window,
    scan_scenes,
    split_region,
)
from segflow.train.losses import build_loss, needs_pixel_weights
from segflow.train.metrics import ConfusionMatrix, summary
from segflow.train.models import build_model, halo, size_multiple

__all__ = [
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

STATE_DIR = "state"
STATE_VERSION = 1
Progress = Callable[[int, int, Mapping[str, Any]], None]


# --------------------------------------------------------------------------- small parts
@dataclass(frozen=True)
class DistInfo:
    """This process's place in a DDP job (``world_size`` 1 = a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group described by torchrun's environment (no-op without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """``spec``, or ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if spec is not None:
        try:
            device = torch.device(spec)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(f"unknown device {str(spec)!r}: use cpu, cuda or cuda:N") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"device {str(spec)!r} asked for but CUDA is not available: use --device cpu"
            )
        if device.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"unsupported device {str(spec)!r}: use cpu, cuda or cuda:N")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


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


@dataclass(frozen=True)
class ValRegion:
    """A validation window of a store."""

    path: str
    window: Window


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


@dataclass
class _Data:
    train_paths: list[str]
    val_regions: list[ValRegion]
    classes: tuple[ClassDef, ...]
    bands: tuple[str, ...]
    ignore_index: int
    normalization: Normalization
    data_hash: str


@dataclass
class _Loop:
    """The mutable scalars of a run (all saved in the state JSON)."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_validations: int = 0
    stopped_early: bool = False
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- data setup
def _store_hash(store: SceneStore) -> dict[str, Any]:
    meta = store.meta
    arrays = meta.get("arrays", {})
    return {
        "source": (meta.get("source") or {}).get("sha256"),
        "labels": arrays.get("labels"),
        "weights": (arrays.get("weights") or {}).get("params"),
    }


def _setup_data(cfg: TrainConfig) -> _Data:  # noqa: C901 (house: to split)
    need_w = needs_pixel_weights(cfg.loss)
    train_paths = [r.store for r in cfg.stores.train]
    val_paths = [r.store for r in cfg.stores.val]
    stores = [SceneStore.open(p) for p in train_paths]
    vstores = [SceneStore.open(p) for p in val_paths]
    classes = cfg.classes or stores[0].classes
    if not classes:
        raise ConfigError(
            f"no class table: store {train_paths[0]!r} has none and the train config gives no "
            "classes: add 'classes' to the config"
        )
    for s in stores:
        check_store(s, in_channels=cfg.model.in_channels, classes=classes,
                    out_channels=cfg.model.out_channels, need_weights=need_w)
    for s in vstores:
        check_store(s, in_channels=cfg.model.in_channels, classes=classes,
                    out_channels=cfg.model.out_channels, need_weights=False)
    ignores = {s.ignore_index for s in (*stores, *vstores)}
    if len(ignores) > 1:
        raise ConfigError(f"the stores use different ignore_index values {sorted(ignores)}: "
                          "re-ingest them with one value")
    ignore = ignores.pop()
    if cfg.normalization == "zscore":
        parts = []
        for s in stores:
            fp = s.meta.get("fingerprint")
            if not fp:
                raise StoreError(f"store {str(s.path)!r} has no fingerprint: run flows/prepare.py "
                                 "on it (or set normalization: none)")
            parts.append((int(fp.get("train_pixels", 1)), fp["mean"], fp["std"]))
        norm = Normalization.pooled(parts)
    else:
        norm = Normalization.identity(cfg.model.in_channels)
    regions: list[ValRegion] = []
    for s in vstores:
        regions.append(ValRegion(str(s.path), Window(0, 0, s.height, s.width)))
    if cfg.stores.split is not None:
        b, every = cfg.stores.split.block, cfg.stores.split.val_every
        for s in stores:
            grid = BlockGrid(s.height, s.width, b)
            for k, (_idx, win) in enumerate(grid):
                if k % every == every - 1:
                    regions.append(ValRegion(str(s.path), win))
    digest = hashlib.sha256(json.dumps(
        {"train": [_store_hash(s) for s in stores], "val": [_store_hash(s) for s in vstores],
         "split": cfg.stores.split.model_dump() if cfg.stores.split else None},
        sort_keys=True, default=str).encode()).hexdigest()
    return _Data(train_paths, regions, tuple(classes), tuple(stores[0].meta.get("bands", [])),
                 ignore, norm, digest)


# --------------------------------------------------------------------------- validation
def _val_tiles(region: ValRegion, tile: int) -> Iterator[Window]:
    w = region.window
    for r in range(w.row_off, w.row_stop, tile):
        for c in range(w.col_off, w.col_stop, tile):
            yield Window.from_bounds(r, c, min(r + tile, w.row_stop), min(c + tile, w.col_stop))


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    regions: Sequence[ValRegion],
    *,
    num_classes: int,
    normalization: Normalization,
    context: int,
    multiple: int,
    tile: int,
    device: torch.device,
    ignore_index: int,
    split: Any = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    dist_info: DistInfo = DistInfo(),
) -> ConfusionMatrix:
    """Confusion matrix of the model over ``regions`` (this rank's share, then summed).

    Each region is cut into ``tile`` x ``tile`` windows; each window is read with
    ``context`` pixels around it (real pixels inside the scene, mirrored outside), grown to a
    multiple of ``multiple``, predicted, and cropped back. Only labelled, valid pixels count
    (and in a blocked split only the held-out pixels of the region).
    """
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    region_split = split_region(split)
    for i, region in enumerate(regions):
        if i % dist_info.world_size != dist_info.rank:
            continue
        store = SceneStore.open(region.path)
        hw = {"height": store.height, "width": store.width}
        for t in _val_tiles(region, tile):
            h = t.height + 2 * context
            w = t.width + 2 * context
            h += -h % multiple
            w += -w % multiple
            win = Window(t.row_off - context, t.col_off - context, h, w)
            x = normalization.apply(read_window(store.array("image"), win, **hw))
            with autocast():
                logits = model(torch.from_numpy(x)[None].to(device))
            pred = logits[0].float().argmax(0)[context:context + t.height,
                                                context:context + t.width]
            target = torch.from_numpy(np.asarray(store.array("labels")[t.slices]).astype(np.int64))
            valid = np.ones(t.shape, bool)
            if store.has("valid"):
                valid &= np.asarray(store.array("valid")[t.slices], bool)
            if region_split is not None:
                valid &= ~train_mask_for_window(region_split, t, image_shape=(store.height,
                                                                             store.width))
            cm.update(pred.cpu(), target, valid=torch.from_numpy(valid))
    if dist_info.active:
        import torch.distributed as dist

        counts = torch.from_numpy(cm.counts).to(device)
        dist.all_reduce(counts)
        cm = ConfusionMatrix.from_counts(counts.cpu(), ignore_index=ignore_index)
    model.train(was_training)
    return cm


# --------------------------------------------------------------------------- state files
def _flatten_optimizer(sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            key = f"{pid}.{name}"
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{key}"] = v.detach().cpu().contiguous()
            else:
                scalars[key] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], doc: Mapping[str, Any]
                         ) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        pid, name = key[len("optim."):].split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for key, v in doc["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": doc["param_groups"]}


def save_state(
    out_dir: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    loop: _Loop,
    config_hash: str,
    ema: AveragedModel | None = None,
) -> Path:
    """Write the resumable state to ``out_dir/state`` atomically (temp dir, then rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".state-", dir=out_dir))
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:  # the average's module and its step count (n_averaged)
        tensors.update(
            {f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
        )
    otensors, odoc = _flatten_optimizer(optimizer.state_dict())
    tensors.update(otensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(tmp / "state.safetensors"))
    doc = {
        "version": STATE_VERSION,
        "config_hash": config_hash,
        "loop": asdict(loop),
        "optimizer": odoc,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    (tmp / "state.json").write_text(json.dumps(doc, default=float))
    final = out_dir / STATE_DIR
    old = out_dir / (STATE_DIR + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def load_state(out_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The saved ``(tensors, document)`` of ``out_dir``, or None when there is none."""
    for name in (STATE_DIR, STATE_DIR + ".old"):
        d = out_dir / name
        if (d / "state.json").is_file() and (d / "state.safetensors").is_file():
            try:
                doc = json.loads((d / "state.json").read_text())
                version = doc.get("version") if isinstance(doc, dict) else None
            except (ValueError, UnicodeDecodeError) as err:
                raise _corrupt_state(d, err) from err
            if version != STATE_VERSION:
                raise CheckpointError(f"training state {str(d)!r} has version {version}"
                                      f", expected {STATE_VERSION}: start a new run")
            try:  # safetensors only: a planted pickle fails to parse, it never runs
                return load_file(str(d / "state.safetensors")), doc
            except Exception as err:  # safetensors raises its own SafetensorError
                raise _corrupt_state(d, err) from err
    return None


def _corrupt_state(d: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"training state {str(d)!r} is unreadable or not segflow's ({type(err).__name__}): "
        "remove it to start the run over, or restore it from a backup"
    )


# --------------------------------------------------------------------------- outputs
def _write_metrics(out_dir: Path, loop: _Loop, total: int) -> None:
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


def _plot(out_dir: Path, loop: _Loop) -> None:
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


def _save_model(
    path: Path,
    model: torch.nn.Module,
    cfg: TrainConfig,
    data: _Data,
    *,
    halo_px: int,
    step: int,
    metrics: Mapping[str, Any],
) -> Path:
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


# --------------------------------------------------------------------------- the loop
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


def recalibrate_batchnorm(
    model: torch.nn.Module,
    images: Iterable[torch.Tensor],
    *,
    device: torch.device | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> None:
    """Reset every BatchNorm layer's running statistics and compute them anew over ``images``.

    Each layer ends with the equal-weight mean over the batches of the batch mean and of the
    (unbiased) batch variance, as ``torch.optim.swa_utils.update_bn`` computes them; that
    function does the work here, under ``torch.no_grad`` (it keeps autograd on) and
    ``autocast``. The model's weights, training flag and momenta are unchanged; a model
    without BatchNorm is left as it is.

    Parameters
    ----------
    model
        The network (not a DDP wrapper: every rank runs this on the same batches).
    images
        Input batches, ``(N, C, H, W)``.
    device
        Where each batch is moved first; None: where it is.
    autocast
        Context manager factory the forward passes run in.
    """
    with torch.no_grad(), autocast():
        torch.optim.swa_utils.update_bn(images, model, device=device)


def _recalibration_batches(
    sampler: PatchSampler, *, patches: int, patch: int, batch_size: int,
    normalization: Normalization, layout: torch.memory_format,
) -> Iterator[torch.Tensor]:
    """The un-augmented training patches :func:`recalibrate_batchnorm` averages over.

    Drawn by the training sampler's scenes and seed with ``random`` sampling (the scenes' own
    class mix, as inference sees them), epoch 0: the same patches on every rank and in a
    resumed run.
    """
    dataset = PatchDataset(PatchSampler(sampler.scenes, SamplingConfig(), sampler.seed),
                           patch=patch, epoch_len=patches, normalization=normalization)
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        yield batch["image"].contiguous(memory_format=layout)


def _worker_init(_: int) -> None:
    from segflow.train import data as _data

    _data._STORES.clear()  # handles opened before the fork are not shared


def _config_hash(cfg: TrainConfig) -> str:
    d = cfg.model_dump(mode="json")
    for k in ("val_interval", "checkpoint_interval", "num_workers", "time_limit_s",
              "early_stopping"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def train(  # noqa: C901, PLR0915 (house: to split)
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
    data = _setup_data(cfg)
    scenes = scan_scenes(data.train_paths, n_classes=cfg.model.out_channels,
                         split=cfg.stores.split, margin=cfg.margin if cfg.stores.split else 0)
    sampler = PatchSampler(tuple(scenes), cfg.sampling, cfg.seed)
    loss_fn = build_loss(cfg.loss)
    ignore_value = cfg.loss.ignore_index if cfg.loss.ignore_index is not None else 0
    dataset = PatchDataset(
        sampler, patch=cfg.patch, epoch_len=cfg.steps_per_epoch * cfg.batch_size,
        normalization=data.normalization, augment=cfg.augment,
        with_weights=needs_pixel_weights(cfg.loss), ignore_value=ignore_value,
        loss_margin=cfg.loss_margin,
    )
    halo_px = halo(cfg.model)
    multiple = size_multiple(cfg.model)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(dev)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)  # type: ignore[call-overload]  # documented, not in the stubs
    if dist_info.active and dev.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    # the weights validation and the checkpoints use: the raw ones, or their moving average
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
        if cfg.ema is not None
        else None
    )
    evaluated = ema.module if ema is not None else model
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a saved state sets them
    autocast, use_scaler = _autocast_factory(dev, cfg.amp)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    torch.manual_seed(cfg.seed + 1 + dist_info.rank)  # dropout etc. per rank

    loop = _Loop()
    chash = _config_hash(cfg)
    saved = load_state(out) if out.exists() else None
    resumed_from: int | None = None
    if saved is not None and not resume:
        raise ConfigError(f"{str(out)!r} holds a training state (step "
                          f"{saved[1]['loop']['step']}): pass --resume to continue it or "
                          "choose another --out")
    if saved is not None:
        tensors, doc = saved
        if doc["config_hash"] != chash:
            raise ConfigError(f"the training config changed since the state in {str(out)!r} was "
                              "written: resume with the same config or choose another --out")
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items()
                               if k.startswith("model.")})
        optimizer.load_state_dict(_unflatten_optimizer(tensors, doc["optimizer"]))
        if ema is not None:
            ema.load_state_dict({k[len("ema."):]: v for k, v in tensors.items()
                                 if k.startswith("ema.")})
        if scaler is not None and doc.get("scaler"):
            scaler.load_state_dict(doc["scaler"])
        torch.set_rng_state(tensors["rng.torch"])
        if torch.cuda.is_available():
            cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
        loop = _Loop(**doc["loop"])
        resumed_from = loop.step
        log.info("resuming %s at step %d", out, loop.step)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)

    net: torch.nn.Module = model
    if dist_info.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    total = cfg.total_steps
    recal = cfg.bn_recalibration
    batch_sampler = StepBatchSampler(start=loop.step, stop=total, batch_size=cfg.batch_size,
                                     rank=dist_info.rank, world_size=dist_info.world_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=cfg.num_workers,
        pin_memory=dev.type == "cuda", worker_init_fn=_worker_init if cfg.num_workers else None,
        persistent_workers=False,
        # spawn, not fork: forking a process that runs threads (zarr's event loop, Prefect's
        # API client) is unsafe; under a Prefect flow forked workers died at shutdown
        multiprocessing_context="spawn" if cfg.num_workers else None,
    )
    val_kw = dict(num_classes=cfg.model.out_channels, normalization=data.normalization,
                  context=halo_px, multiple=multiple, tile=cfg.val_tile, device=dev,
                  ignore_index=data.ignore_index, split=cfg.stores.split, autocast=autocast,
                  dist_info=dist_info)
    time_base = loop.elapsed_s
    t_loop = time.perf_counter()
    last_metrics: dict[str, Any] = {}
    net.train()

    def run_validation(**extra: Any) -> bool:
        """Validate, log, save best; True when early stopping says stop. ``extra`` goes
        into the history row."""
        nonlocal last_metrics
        k0 = len(loop.losses) - min(len(loop.losses), cfg.val_interval)
        recent = loop.losses[k0:]
        row: dict[str, Any] = {"step": loop.step, "epoch": loop.step // cfg.steps_per_epoch,
                               "train_loss": float(np.mean(recent)) if recent else None,
                               "lr": optimizer.param_groups[0]["lr"],
                               "elapsed_s": round(time_base + time.perf_counter() - t_loop, 3),
                               **extra}
        sync_buffers()
        if data.val_regions:
            cm = validate(evaluated, data.val_regions, **val_kw)  # type: ignore[arg-type]
            row.update(summary(cm))
        loop.history.append(row)
        last_metrics = row
        log.info("step %d/%d: train loss %s, %s %s", loop.step, total, row["train_loss"],
                 cfg.select_metric, row.get(cfg.select_metric))
        stop = False
        value = row.get(cfg.select_metric)
        if value is not None:
            better = loop.best_metric is None or (
                value < loop.best_metric if cfg.select_mode == "min" else value > loop.best_metric)
            if better:
                loop.best_metric, loop.best_step = float(value), loop.step
                if dist_info.is_main:
                    _save_model(out / "best", evaluated, cfg, data, halo_px=halo_px,
                                step=loop.step, metrics=row)
        es = cfg.early_stopping
        if es is not None and row.get(es.metric) is not None:
            v = float(row[es.metric])
            prev = [float(r[es.metric]) for r in loop.history[:-1] if r.get(es.metric) is not None]
            if prev:
                best_prev = min(prev) if es.mode == "min" else max(prev)
                improved = (v < best_prev - es.min_delta if es.mode == "min"
                            else v > best_prev + es.min_delta)
                loop.bad_validations = 0 if improved else loop.bad_validations + 1
            stop = loop.bad_validations >= es.patience
        if dist_info.is_main:
            _write_metrics(out, loop, total)
        return stop

    def sync_buffers() -> None:
        """Rank 0's BatchNorm running statistics everywhere (DDP broadcasts them only at
        the start of a forward, so after the last step each rank holds its own)."""
        if dist_info.active:
            import torch.distributed as dist

            for b in (*model.buffers(), *(ema.buffers() if ema is not None else ())):
                dist.broadcast(b, 0)

    def elapsed() -> float:
        """Training seconds so far (the largest over the ranks, so all ranks agree)."""
        t = time_base + time.perf_counter() - t_loop
        if not dist_info.active:
            return t
        import torch.distributed as dist

        v = torch.tensor([t], dtype=torch.float64, device=dev)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return float(v.item())

    for batch in loader:
        step = loop.step
        sched_step = step
        if cfg.schedule.horizon == "time" and cfg.time_limit_s is not None:
            # the schedule runs to the time limit (or the step count, whichever comes first)
            frac = elapsed() / cfg.time_limit_s
            sched_step = max(step, min(total - 1, int(frac * total)))
        f = lr_factor(cfg.schedule, sched_step, total)
        for g, lr0 in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = lr0 * f
        x = batch["image"].to(dev, non_blocking=True).contiguous(memory_format=layout)
        y = batch["labels"].to(dev, non_blocking=True)
        mask = batch["mask"].to(dev, non_blocking=True)
        w = batch["weights"].to(dev, non_blocking=True) if "weights" in batch else None
        with autocast():
            logits = net(x)
        loss = loss_fn(logits.float(), y, w, mask=mask)
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
        if ema is not None:
            ema.update_parameters(model)
        lv = loss.detach()
        if dist_info.active:
            import torch.distributed as dist

            dist.all_reduce(lv)
            lv = lv / dist_info.world_size
        loop.losses.append(float(lv))
        loop.step += 1
        info: dict[str, Any] = {"loss": loop.losses[-1], "lr": optimizer.param_groups[0]["lr"]}
        over_time = cfg.time_limit_s is not None and elapsed() >= cfg.time_limit_s
        last = loop.step >= total or over_time
        stop = False
        # with a BatchNorm recalibration the last validation comes after it (below)
        if (loop.step % cfg.val_interval == 0 or last) and not (last and recal is not None):
            stop = run_validation()
            info.update({k: v for k, v in last_metrics.items() if isinstance(v, int | float)})
            if stop:
                loop.stopped_early = True
        if loop.step % cfg.checkpoint_interval == 0 or last or stop:
            loop.elapsed_s = time_base + time.perf_counter() - t_loop
            if dist_info.is_main:
                save_state(out, model=model, optimizer=optimizer, scaler=scaler, loop=loop,
                           config_hash=chash, ema=ema)
            if on_state_saved is not None:
                on_state_saved(loop.step)
        if progress is not None and dist_info.is_main:
            progress(loop.step, total, info)
        if stop or over_time:
            break
    done = loop.history[-1] if loop.history else {}
    if recal is not None and not (done.get("step") == loop.step and done.get("bn_recalibrated")):
        t0 = time.perf_counter()
        batches = _recalibration_batches(
            sampler, patches=recal.patches, patch=recal.patch or cfg.patch,
            batch_size=cfg.batch_size, normalization=data.normalization, layout=layout,
        )
        # in the precision inference runs at by default: fp32 on a CPU, autocast on CUDA
        recalibrate_batchnorm(evaluated, batches, device=dev,
                              autocast=autocast if dev.type == "cuda" else contextlib.nullcontext)
        took = time.perf_counter() - t0
        log.info("BatchNorm statistics recomputed over %d patches in %.1f s", recal.patches, took)
        run_validation(bn_recalibrated=True, bn_recalibration_s=round(took, 3))
    elif done.get("step") != loop.step:
        run_validation()
    sync_buffers()
    loop.elapsed_s = time_base + time.perf_counter() - t_loop
    last_path = None
    best_path = out / "best" if loop.best_step is not None else None
    if dist_info.is_main:
        last_path = _save_model(out / "last", evaluated, cfg, data, halo_px=halo_px,
                                step=loop.step, metrics=last_metrics)
        save_state(out, model=model, optimizer=optimizer, scaler=scaler, loop=loop,
                   config_hash=chash, ema=ema)
        _write_metrics(out, loop, total)
    if dist_info.active:
        import torch.distributed as dist

        dist.barrier()
    return TrainResult(
        out_dir=out, steps=loop.step, total_steps=total, stopped_early=loop.stopped_early,
        best_step=loop.best_step, best_metric=loop.best_metric,
        final_metrics={k: v for k, v in last_metrics.items()},
        best_checkpoint=best_path, last_checkpoint=last_path,
        wall_s=time.perf_counter() - t_start, resumed_from=resumed_from, model=evaluated,
    )
