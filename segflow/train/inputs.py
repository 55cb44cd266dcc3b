"""What a training run reads: its stores, checked, with their classes, bands, normalization,
validation regions and a hash of their contents (recorded in every checkpoint)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from segflow.config import ClassDef
from segflow.config.train import TrainConfig
from segflow.errors import ConfigError, StoreError
from segflow.geometry import BlockGrid, Window
from segflow.io.store import SceneStore
from segflow.train.data import Normalization, check_store
from segflow.train.losses import needs_pixel_weights
from segflow.train.validation import ValRegion

__all__ = ["TrainInputs", "setup_inputs"]


@dataclass(frozen=True)
class TrainInputs:
    """The checked inputs of a run."""

    train_paths: list[str]
    val_regions: list[ValRegion]
    classes: tuple[ClassDef, ...]
    bands: tuple[str, ...]
    ignore_index: int
    normalization: Normalization
    data_hash: str


def setup_inputs(cfg: TrainConfig) -> TrainInputs:
    """Open and check the stores of ``cfg`` (bands, classes, weights when the loss needs
    them, one ``ignore_index``); pool the normalization; list the validation regions."""
    train_paths = [r.store for r in cfg.stores.train]
    stores = [SceneStore.open(p) for p in train_paths]
    vstores = [SceneStore.open(r.store) for r in cfg.stores.val]
    classes = cfg.classes or stores[0].classes
    if not classes:
        raise ConfigError(
            f"no class table: store {train_paths[0]!r} has none and the train config gives no "
            "classes: add 'classes' to the config"
        )
    need_w = needs_pixel_weights(cfg.loss)
    for s, weights in [*((s, need_w) for s in stores), *((s, False) for s in vstores)]:
        check_store(
            s,
            in_channels=cfg.model.in_channels,
            classes=classes,
            out_channels=cfg.model.out_channels,
            need_weights=weights,
        )
    ignores = {s.ignore_index for s in (*stores, *vstores)}
    if len(ignores) > 1:
        raise ConfigError(
            f"the stores use different ignore_index values {sorted(ignores)}: "
            "re-ingest them with one value"
        )
    return TrainInputs(
        train_paths, validation_regions(cfg, stores, vstores), tuple(classes),
        tuple(stores[0].meta.get("bands", [])), ignores.pop(), _normalization(cfg, stores),
        _data_hash(cfg, stores, vstores),
    )  # fmt: skip


def _normalization(cfg: TrainConfig, stores: list[SceneStore]) -> Normalization:
    """The train stores' pooled mean and std (``zscore``), or the identity."""
    if cfg.normalization != "zscore":
        return Normalization.identity(cfg.model.in_channels)
    parts = []
    for s in stores:
        fp = s.meta.get("fingerprint")
        if not fp:
            raise StoreError(
                f"store {str(s.path)!r} has no fingerprint: run flows/prepare.py "
                "on it (or set normalization: none)"
            )
        parts.append((int(fp.get("train_pixels", 1)), fp["mean"], fp["std"]))
    return Normalization.pooled(parts)


def validation_regions(
    cfg: TrainConfig, stores: list[SceneStore], vstores: list[SceneStore]
) -> list[ValRegion]:
    """Every validation store whole, and in a blocked split every ``val_every``-th block of
    the train stores."""
    regions = [ValRegion(str(s.path), Window(0, 0, s.height, s.width)) for s in vstores]
    if cfg.stores.split is not None:
        b, every = cfg.stores.split.block, cfg.stores.split.val_every
        for s in stores:
            grid = BlockGrid(s.height, s.width, b)
            for k, (_idx, win) in enumerate(grid):
                if k % every == every - 1:
                    regions.append(ValRegion(str(s.path), win))
    return regions


def _store_hash(store: SceneStore) -> dict[str, Any]:
    meta = store.meta
    arrays = meta.get("arrays", {})
    return {
        "source": (meta.get("source") or {}).get("sha256"),
        "labels": arrays.get("labels"),
        "weights": (arrays.get("weights") or {}).get("params"),
    }


def _data_hash(cfg: TrainConfig, stores: list[SceneStore], vstores: list[SceneStore]) -> str:
    """What the stores hold (source, labels, weights) and the split, hashed."""
    return hashlib.sha256(json.dumps(
        {"train": [_store_hash(s) for s in stores], "val": [_store_hash(s) for s in vstores],
         "split": cfg.stores.split.model_dump() if cfg.stores.split else None},
        sort_keys=True, default=str).encode()).hexdigest()  # fmt: skip
