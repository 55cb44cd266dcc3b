"""The weights a run evaluates and saves: an exponential moving average of the trained
weights (``ema``) and BatchNorm statistics recomputed for the final weights
(``bn_recalibration``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from segflow.config.train import SamplingConfig
from segflow.train.data import Normalization, PatchDataset, PatchSampler

__all__ = ["build_ema", "recalibrate_batchnorm", "recalibration_batches"]


def build_ema(model: torch.nn.Module, decay: float | None) -> AveragedModel | None:
    """The moving average of ``model``'s weights and buffers (None without ``decay``)."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


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


def recalibration_batches(
    sampler: PatchSampler,
    *,
    patches: int,
    patch: int,
    batch_size: int,
    normalization: Normalization,
    layout: torch.memory_format,
) -> Iterator[torch.Tensor]:
    """The un-augmented training patches :func:`recalibrate_batchnorm` averages over.

    Drawn by the training sampler's scenes and seed with ``random`` sampling (the scenes' own
    class mix, as inference sees them), epoch 0: the same patches on every rank and in a
    resumed run.
    """
    dataset = PatchDataset(
        PatchSampler(sampler.scenes, SamplingConfig(), sampler.seed),
        patch=patch,
        epoch_len=patches,
        normalization=normalization,
    )
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        yield batch["image"].contiguous(memory_format=layout)
