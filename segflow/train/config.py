"""Typed training configuration (the ``train`` section of a pipeline YAML).

Every model forbids unknown keys and is frozen. :class:`TrainConfig` is the whole section;
:func:`make_train_config` validates a mapping into one and turns pydantic's report into one
:class:`~segflow.errors.ConfigError` line.

Data
----
``stores.train`` / ``stores.val`` list scene stores. An entry is a store path, or a mapping
``{store, source, labels}`` that also says where the store comes from (a flow ingests and
prepares missing stores from it), or such a mapping with ``ids: [start, stop]`` and ``{i}``
in its strings, which expands to one entry per ``i`` in ``range(start, stop)``::

    train:
      - {store: "out/stores/{i}.zarr", source: "images/{i}.png", labels: "labels/{i}.png",
         ids: [0, 24]}

Instead of ``val`` stores, ``split: {block, val_every}`` holds out a spatially blocked part of
every train store: blocks of ``block`` x ``block`` pixels are numbered row-major and block
``k`` is validation when ``k % val_every == val_every - 1`` (the same rule as
:class:`segflow.config.TrainRegion`, so prepare's statistics can use the same split). Patch
centres are sampled only at least ``margin`` pixels (default: half the patch) away from
every validation pixel, so no training patch overlaps validation pixels.

Normalization
-------------
``normalization: zscore`` uses per-band mean and std of the *training* stores' fingerprints
(written by prepare), pooled over all train stores weighted by their training pixel counts
(the exact mean/std of the union). ``none`` feeds raw values (as float32).

Examples
--------
>>> cfg = make_train_config({
...     "stores": {"train": ["a.zarr"], "split": {"block": 256, "val_every": 4}},
...     "model": {"arch": "unet", "in_channels": 1, "out_channels": 2, "features": 8,
...               "depth": 2},
...     "steps": 10})
>>> cfg.total_steps, cfg.stores.split.margin is None
(10, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from segflow.config import ClassDef, format_validation_error
from segflow.errors import ConfigError
from segflow.train.losses import LossConfig
from segflow.train.models import ModelConfig

__all__ = [
    "AugmentConfig",
    "EarlyStoppingConfig",
    "ElasticConfig",
    "IntensityConfig",
    "OptimizerConfig",
    "SamplingConfig",
    "ScheduleConfig",
    "SplitConfig",
    "StoreRef",
    "StoresConfig",
    "TrainConfig",
    "make_train_config",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreRef(_Model):
    """One scene store, and optionally where it is built from (source image + labels)."""

    store: Annotated[str, Field(min_length=1)]
    source: str | None = None
    labels: str | None = None


def _expand(entries: Any) -> Any:
    """Expand ``ids: [start, stop]`` entries and plain strings into StoreRef mappings."""
    if not isinstance(entries, list | tuple):
        return entries
    out: list[Any] = []
    for e in entries:
        if isinstance(e, str):
            out.append({"store": e})
        elif isinstance(e, Mapping) and "ids" in e:
            ids = e["ids"]
            if (
                not isinstance(ids, list | tuple)
                or len(ids) != 2
                or not all(isinstance(i, int) for i in ids)
                or ids[1] <= ids[0]
            ):
                raise ValueError(f"ids must be [start, stop] with stop > start, got {ids!r}")
            rest = {k: v for k, v in e.items() if k != "ids"}
            for i in range(ids[0], ids[1]):
                out.append({k: v.format(i=i) if isinstance(v, str) else v for k, v in rest.items()})
        else:
            out.append(e)
    return out


class SplitConfig(_Model):
    """A spatially blocked train/validation split of each train store."""

    block: Annotated[int, Field(gt=0)]
    val_every: Annotated[int, Field(ge=2)]
    margin: Annotated[int, Field(ge=0)] | None = None


class StoresConfig(_Model):
    """Which stores train and validate."""

    train: tuple[StoreRef, ...]
    val: tuple[StoreRef, ...] = ()
    split: SplitConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _expand_entries(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data = dict(data)
            for key in ("train", "val"):
                if key in data:
                    data[key] = _expand(data[key])
        return data

    @model_validator(mode="after")
    def _check(self) -> StoresConfig:
        if not self.train:
            raise ValueError("stores.train must list at least one store")
        if self.val and self.split is not None:
            raise ValueError("give either stores.val or stores.split, not both")
        return self


class OptimizerConfig(_Model):
    """The optimizer: ``adam``, ``adamw`` or ``sgd`` (with momentum)."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.99
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(_Model):
    """The learning-rate schedule, a pure function of the step (see :func:`lr_factor`).

    ``cosine``: half cosine from 1 to ``min_lr_ratio``; ``poly``: ``(1 - t) ** power``;
    ``step``: times ``gamma`` every ``step_size`` steps; ``onecycle``: linear up from
    ``1 / div_factor`` to 1 over ``pct_start`` of the run, then cosine down to
    ``min_lr_ratio``; ``constant``. ``warmup_steps`` ramps linearly from 0 first (not for
    ``onecycle``, which has its own ramp). ``horizon: time`` (with the train config's
    ``time_limit_s``) stretches the schedule over the time budget instead: the schedule's
    position is the larger of ``step / steps`` and ``elapsed / time_limit_s``, so the rate
    is annealed when the time runs out (learning rates then depend on the wall clock: such
    a run is not bit-reproducible, and a resumed one follows its own clock).
    """

    name: Literal["constant", "cosine", "poly", "step", "onecycle"] = "cosine"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    power: Annotated[float, Field(gt=0)] = 0.9
    step_size: Annotated[int, Field(gt=0)] = 1000
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    pct_start: Annotated[float, Field(gt=0, lt=1)] = 0.3
    div_factor: Annotated[float, Field(ge=1)] = 25.0
    horizon: Literal["steps", "time"] = "steps"


class SamplingConfig(_Model):
    """How patch centres are chosen.

    ``random``: uniformly over the training pixels of all train stores. ``class_balanced``:
    first a class with ``class_probs`` (default: equal over the classes present), then a
    pixel of that class.
    """

    mode: Literal["random", "class_balanced"] = "random"
    class_probs: dict[int, Annotated[float, Field(ge=0)]] | None = None

    @model_validator(mode="after")
    def _check(self) -> SamplingConfig:
        if self.class_probs is not None and sum(self.class_probs.values()) <= 0:
            raise ValueError(f"class_probs must have a positive sum, got {self.class_probs}")
        if self.class_probs is not None and self.mode != "class_balanced":
            raise ValueError("class_probs apply only to mode 'class_balanced'")
        return self


class ElasticConfig(_Model):
    """U-Net elastic deformation: random displacements on a coarse ``grid`` x ``grid``
    lattice (standard deviation ``sigma`` pixels), interpolated bicubically to every pixel."""

    p: Annotated[float, Field(ge=0, le=1)] = 0.5
    grid: Annotated[int, Field(ge=2)] = 3
    sigma: Annotated[float, Field(ge=0)] = 10.0
    order: Literal[1, 3] = 3


class IntensityConfig(_Model):
    """Intensity changes on the normalized image: gamma (on the patch's min-max range),
    brightness (added, in std units) and contrast (scaled about the patch mean)."""

    p: Annotated[float, Field(ge=0, le=1)] = 0.5
    gamma: tuple[float, float] = (0.7, 1.5)
    brightness: Annotated[float, Field(ge=0)] = 0.1
    contrast: tuple[float, float] = (0.75, 1.25)


class AugmentConfig(_Model):
    """Patch augmentation (see :mod:`segflow.train.augment`)."""

    flips: bool = True
    rot90: bool = True
    elastic: ElasticConfig | None = None
    intensity: IntensityConfig | None = None


class EarlyStoppingConfig(_Model):
    """Stop after ``patience`` validations without improvement of ``metric`` by ``min_delta``."""

    metric: str = "pixel_error"
    mode: Literal["min", "max"] = "min"
    patience: Annotated[int, Field(ge=1)] = 10
    min_delta: Annotated[float, Field(ge=0)] = 0.0


class TrainConfig(_Model):
    """Everything a training run depends on (with the stores' contents).

    ``steps`` or ``epochs`` (times ``steps_per_epoch``) set the run length; an epoch is
    only the unit of the data seeding (patch ``k`` of epoch ``e`` is a pure function of
    ``(seed, e, k)``). ``batch_size`` is the *global* batch: under DDP every rank takes
    ``batch_size / world_size`` of it. ``amp``: ``auto`` = bf16 on CUDA where supported
    (else fp16 with a gradient scaler), nothing on CPU. ``val_interval`` and
    ``checkpoint_interval`` are in steps; validation and a resumable state are also written
    after the last step. ``classes`` is the class table every store must have (None: the
    first train store's). ``select_metric`` picks the "best" checkpoint (and early stopping
    uses its own metric).
    """

    stores: StoresConfig
    model: ModelConfig
    classes: tuple[ClassDef, ...] | None = None
    loss: LossConfig = Field(default_factory=lambda: LossConfig())
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    patch: Annotated[int, Field(ge=8)] = 256
    batch_size: Annotated[int, Field(ge=1)] = 4
    steps: Annotated[int, Field(ge=1)] | None = None
    epochs: Annotated[int, Field(ge=1)] | None = None
    steps_per_epoch: Annotated[int, Field(ge=1)] = 100
    sampling: SamplingConfig = SamplingConfig()
    augment: AugmentConfig = AugmentConfig()
    normalization: Literal["zscore", "none"] = "zscore"
    seed: int = 0
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    early_stopping: EarlyStoppingConfig | None = None
    select_metric: str = "pixel_error"
    select_mode: Literal["min", "max"] = "min"
    val_interval: Annotated[int, Field(ge=1)] = 100
    val_tile: Annotated[int, Field(ge=16)] = 1024
    checkpoint_interval: Annotated[int, Field(ge=1)] = 100
    num_workers: Annotated[int, Field(ge=0)] = 0
    deterministic: bool = False
    time_limit_s: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        if self.schedule.horizon == "time" and self.time_limit_s is None:
            raise ValueError("schedule.horizon 'time' needs time_limit_s")
        from segflow.train.models import size_multiple

        m = size_multiple(self.model)
        if self.patch % m:
            raise ValueError(
                f"patch {self.patch} must be a multiple of the model's size multiple {m}"
            )
        if self.val_tile % m:
            raise ValueError(f"val_tile {self.val_tile} must be a multiple of {m}")
        return self

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return self.steps if self.steps is not None else int(self.epochs or 0) * self.steps_per_epoch

    @property
    def margin(self) -> int:
        """Distance kept between training patch centres and validation pixels."""
        if self.stores.split is not None and self.stores.split.margin is not None:
            return self.stores.split.margin
        return self.patch // 2


def make_train_config(data: TrainConfig | Mapping[str, Any], *, source: str = "train config") -> TrainConfig:
    """Validate ``data`` into a :class:`TrainConfig`; bad values raise one-line ConfigError."""
    if isinstance(data, TrainConfig):
        return data
    try:
        return TrainConfig.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=source)) from None
