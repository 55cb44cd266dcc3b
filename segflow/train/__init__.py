"""Training core: networks from config, losses, metrics and the checkpoint format.

Pure torch (plus MONAI and scipy); no file reading except :mod:`.checkpoint`, which owns
the checkpoint directory format (DESIGN.md section 5). Patch sampling, the training loop
and DDP build on these pieces.

- :mod:`segflow.train.models`: :class:`ModelConfig`, :func:`build_model`,
  :func:`size_multiple`, :func:`tile_independent`, :func:`receptive_field`, :func:`halo`.
- :mod:`segflow.train.losses`: :class:`LossConfig`, :func:`build_loss`,
  :func:`needs_pixel_weights`.
- :mod:`segflow.train.metrics`: :class:`ConfusionMatrix` and metric functions.
- :mod:`segflow.train.checkpoint`: :class:`CheckpointMeta`, :func:`save_checkpoint`,
  :func:`load_checkpoint`.
"""

from __future__ import annotations

from segflow.train.checkpoint import (
    CheckpointMeta,
    Normalization,
    build_meta,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from segflow.train.losses import LossConfig, build_loss, needs_pixel_weights
from segflow.train.metrics import ConfusionMatrix, summary
from segflow.train.models import (
    ModelConfig,
    build_model,
    halo,
    receptive_field,
    size_multiple,
    tile_independent,
)

__all__ = [
    "CheckpointMeta",
    "ConfusionMatrix",
    "LossConfig",
    "ModelConfig",
    "Normalization",
    "build_loss",
    "build_meta",
    "build_model",
    "halo",
    "load_checkpoint",
    "needs_pixel_weights",
    "read_meta",
    "receptive_field",
    "save_checkpoint",
    "size_multiple",
    "summary",
    "tile_independent",
]
