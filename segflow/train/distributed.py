"""Where a training process runs: its device and its place in a torchrun (DDP) job.

Everything that talks to ``torch.distributed`` is here, so the trainer reads the same with one
process or many: :func:`init_distributed` joins the process group torchrun describes (NCCL on
CUDA, gloo on CPU); the helpers below are no-ops for a single process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from segflow.errors import ConfigError, option

__all__ = [
    "DistInfo",
    "barrier",
    "broadcast_from_main",
    "init_distributed",
    "max_over_ranks",
    "mean_over_ranks",
    "resolve_device",
    "sum_over_ranks",
]


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
                f"device {str(spec)!r} asked for but CUDA is not available: use {option('device', 'cpu')}"
            )
        if device.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"unsupported device {str(spec)!r}: use cpu, cuda or cuda:N")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def broadcast_from_main(tensors: Iterable[torch.Tensor], dist_info: DistInfo) -> None:
    """Rank 0's values of ``tensors`` (e.g. BatchNorm buffers) on every rank."""
    if dist_info.active:
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t, 0)


def max_over_ranks(value: float, device: torch.device, dist_info: DistInfo) -> float:
    """The largest ``value`` over the ranks (so that every rank decides alike)."""
    if not dist_info.active:
        return value
    import torch.distributed as dist

    v = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    return float(v.item())


def mean_over_ranks(value: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    """The mean of ``value`` over the ranks."""
    if not dist_info.active:
        return value
    import torch.distributed as dist

    dist.all_reduce(value)
    return value / dist_info.world_size


def sum_over_ranks(value: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    """The sum of ``value`` over the ranks (in place)."""
    if dist_info.active:
        import torch.distributed as dist

        dist.all_reduce(value)
    return value


def barrier(dist_info: DistInfo) -> None:
    """Wait for every rank."""
    if dist_info.active:
        import torch.distributed as dist

        dist.barrier()
