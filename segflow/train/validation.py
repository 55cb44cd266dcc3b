"""Validation during training: the inference engine over held-out regions, a confusion matrix
summed over the ranks, and the selection of the best step and early stopping."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segflow.config.train import TrainConfig
from segflow.geometry import Window
from segflow.infer.engine import InferenceOptions, StoreReader, predict_units
from segflow.io.store import SceneStore
from segflow.normalization import Normalization
from segflow.stats import train_mask_for_window
from segflow.train.data import split_region
from segflow.train.distributed import DistInfo, sum_over_ranks
from segflow.train.metrics import ConfusionMatrix
from segflow.train.state import LoopState

__all__ = ["ValRegion", "select", "validate"]

SINGLE = DistInfo()  # one process


@dataclass(frozen=True)
class ValRegion:
    """A validation window of a store."""

    path: str
    window: Window


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
    amp: str = "off",
    dist_info: DistInfo = SINGLE,
) -> ConfusionMatrix:
    """Confusion matrix of the model over ``regions`` (this rank's share, then summed).

    The prediction is segment_region's: :func:`~segflow.infer.engine.predict_units` in
    ``crop`` mode, tiles of ``tile`` with ``context`` pixels of real context inside the
    scene and mirrored outside, model inputs grown to a multiple of ``multiple``, invalid
    pixels filled as at inference, class ids from the logits. Only labelled, valid pixels
    count (and in a blocked split only the held-out pixels of the region).
    """
    was_training = model.training
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    region_split = split_region(split)
    options = InferenceOptions(
        tile=tile, halo=context, size_multiple=multiple, device=str(device),
        amp="off" if amp == "none" else amp,  # type: ignore[arg-type]
        output="labels", read_workers=1, prefetch=1,
    )  # fmt: skip
    for i, region in enumerate(regions):
        if i % dist_info.world_size != dist_info.rank:
            continue
        store = SceneStore.open(region.path)

        def score(window: Window, pred: np.ndarray, store: SceneStore = store) -> None:
            target = np.asarray(store.array("labels")[window.slices]).astype(np.int64)
            valid = np.ones(window.shape, bool)
            if store.has("valid"):
                valid &= np.asarray(store.array("valid")[window.slices], bool)
            if region_split is not None:
                shape = (store.height, store.width)
                valid &= ~train_mask_for_window(region_split, window, image_shape=shape)
            cm.update(torch.from_numpy(pred), torch.from_numpy(target),
                      valid=torch.from_numpy(valid))  # fmt: skip

        predict_units(
            StoreReader(store), model, region.window, options=options,
            mean=normalization.mean, std=normalization.std, sink=score, labels=True,
        )  # fmt: skip
    model.train(was_training)
    if dist_info.active:
        counts = sum_over_ranks(torch.from_numpy(cm.counts).to(device), dist_info)
        cm = ConfusionMatrix.from_counts(counts.cpu(), ignore_index=ignore_index)
    return cm


def select(loop: LoopState, row: Mapping[str, Any], cfg: TrainConfig) -> tuple[bool, bool]:
    """Record validation ``row`` in ``loop``: (the best step so far, early stopping says stop).

    The best step has the best ``select_metric`` (``select_mode``); early stopping counts the
    validations in a row whose ``early_stopping.metric`` did not improve on the best before
    it by ``min_delta``, and stops after ``patience`` of them.
    """
    better = False
    value = row.get(cfg.select_metric)
    if value is not None:
        better = loop.best_metric is None or (
            value < loop.best_metric if cfg.select_mode == "min" else value > loop.best_metric
        )
        if better:
            loop.best_metric, loop.best_step = float(value), loop.step
    es = cfg.early_stopping
    stop = False
    if es is not None and row.get(es.metric) is not None:
        v = float(row[es.metric])
        prev = [float(r[es.metric]) for r in loop.history[:-1] if r.get(es.metric) is not None]
        if prev:
            best_prev = min(prev) if es.mode == "min" else max(prev)
            improved = (
                v < best_prev - es.min_delta if es.mode == "min" else v > best_prev + es.min_delta
            )
            loop.bad_validations = 0 if improved else loop.bad_validations + 1
        stop = loop.bad_validations >= es.patience
    return better, stop
