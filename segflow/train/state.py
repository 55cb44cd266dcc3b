"""A training run's resumable state: ``state/`` beside the checkpoints.

Model, optimizer (and EMA, GradScaler) tensors and the torch RNG state go to safetensors,
everything else (the loop's scalars, history and losses) to JSON; nothing is pickled. The
directory is written under a temporary name and renamed into place, the previous one kept
as ``state.old`` until the new one is complete. :func:`restore_state` resumes a run exactly:
on CPU with ``deterministic: true`` the final weights equal an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel

from segflow.config.train import TrainConfig
from segflow.errors import CheckpointError, ConfigError, option

__all__ = [
    "STATE_DIR",
    "STATE_VERSION",
    "LoopState",
    "config_hash",
    "load_state",
    "restore_state",
    "save_state",
]

log = logging.getLogger(__name__)

STATE_DIR = "state"
STATE_VERSION = 1


@dataclass
class LoopState:
    """The mutable scalars of a run (all saved in the state JSON)."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_validations: int = 0
    stopped_early: bool = False
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def config_hash(cfg: TrainConfig) -> str:
    """The hash of what a resumed run must not change (not intervals, workers or limits)."""
    d = cfg.model_dump(mode="json")
    for k in (
        "val_interval",
        "checkpoint_interval",
        "num_workers",
        "time_limit_s",
        "early_stopping",
    ):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


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


def _unflatten_optimizer(
    tensors: Mapping[str, torch.Tensor], doc: Mapping[str, Any]
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        pid, name = key[len("optim.") :].split(".", 1)
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
    loop: LoopState,
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
                raise CheckpointError(
                    f"training state {str(d)!r} has version {version}"
                    f", expected {STATE_VERSION}: start a new run"
                )
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


def restore_state(
    out: Path,
    *,
    resume: bool,
    chash: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: AveragedModel | None,
    scaler: torch.amp.GradScaler | None,
) -> LoopState | None:
    """Load ``out``'s state into the parts and return its loop state (None: a fresh run).

    Raises :class:`ConfigError` for a state without ``resume`` (a run is never silently
    overwritten) and for a state written with another config.
    """
    saved = load_state(out) if out.exists() else None
    if saved is None:
        return None
    tensors, doc = saved
    if not resume:
        raise ConfigError(
            f"{str(out)!r} holds a training state (step "
            f"{doc['loop']['step']}): pass {option('resume')} to continue it or "
            f"choose another {option('out')}"
        )
    if doc["config_hash"] != chash:
        raise ConfigError(
            f"the training config changed since the state in {str(out)!r} was "
            f"written: resume with the same config or choose another {option('out')}"
        )
    model.load_state_dict(
        {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    )
    optimizer.load_state_dict(_unflatten_optimizer(tensors, doc["optimizer"]))
    if ema is not None:
        ema.load_state_dict(
            {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
        )
    if scaler is not None and doc.get("scaler"):
        scaler.load_state_dict(doc["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    loop = LoopState(**doc["loop"])
    log.info("resuming %s at step %d", out, loop.step)
    return loop
