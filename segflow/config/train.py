"""Typed training configuration (the ``train`` section of a pipeline YAML).

Every model forbids unknown keys and is frozen. :class:`TrainConfig` is the whole section;
:func:`make_train_config` validates a mapping into one and turns pydantic's report into one
:class:`~segflow.errors.ConfigError` line.

Data
----
``stores.train`` / ``stores.val`` list scene stores. An entry is a store path, or a mapping
``{store, source, labels}`` that also says where the store comes from (``flows/train.py``
ingests and prepares missing stores from it), or such a mapping with ``ids: [start, stop]`` and ``{i}``
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

from segflow.config.base import ClassDef, format_validation_error
from segflow.config.loss import LossConfig
from segflow.config.model import ModelConfig
from segflow.config.stores import SplitConfig, StoreRef, StoresConfig
from segflow.errors import ConfigError

Metric = Literal[
    "pixel_error",
    "pixel_accuracy",
    "mean_class_accuracy",
    "mean_iou",
    "frequency_weighted_iou",
    "mean_dice",
]
# which way is better for each validation metric: a mismatched mode keeps the worst model
METRIC_MODE: dict[str, Literal["min", "max"]] = {
    "pixel_error": "min",
    "pixel_accuracy": "max",
    "mean_class_accuracy": "max",
    "mean_iou": "max",
    "frequency_weighted_iou": "max",
    "mean_dice": "max",
}


def _check_mode(metric: str, mode: str, *, key: str) -> None:
    want = METRIC_MODE[metric]
    if mode != want:
        better = "lower" if want == "min" else "higher"
        raise ValueError(
            f"{key} {mode!r} would keep the worst {metric} ({better} is better): use {want!r}"
        )


def _check_range(value: tuple[float, float], *, name: str, positive: bool) -> None:
    lo, hi = value
    if lo > hi or (positive and lo <= 0):
        need = "0 < low <= high" if positive else "low <= high"
        raise ValueError(f"{name} must be [low, high] with {need}, got {list(value)}")


__all__ = [
    "AugmentConfig",
    "BatchNormRecalibrationConfig",
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


class OptimizerConfig(_Model):
    """The optimizer: ``adam``, ``adamw`` or ``sgd`` (with momentum).

    Attributes
    ----------
    name
        ``adam``, ``adamw`` (Adam with decoupled weight decay) or ``sgd`` (with momentum,
        as in the U-Net paper).
    lr
        Base learning rate; every step uses ``lr`` times the schedule's factor (its peak
        value for ``cosine``, ``poly``, ``step`` and ``onecycle``).
    weight_decay
        Weight decay: an L2 term added to the gradient (``adam``, ``sgd``) or a decoupled
        shrink of the weights (``adamw``, where 1e-2 is a usual value); 0 turns it off.
    momentum
        ``sgd`` only: momentum factor (the U-Net paper uses 0.99); ignored by Adam.
    nesterov
        ``sgd`` only: Nesterov momentum.
    betas
        ``adam`` / ``adamw`` only: decay rates of the first and second moment averages,
        each in ``[0, 1)``.
    """

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.99
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)

    @model_validator(mode="after")
    def _check_betas(self) -> OptimizerConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(
                f"betas must each be in [0, 1), got {list(self.betas)}: e.g. [0.9, 0.999]"
            )
        return self


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

    Attributes
    ----------
    name
        The shape of the learning-rate factor over the run (see above); ``constant`` keeps
        ``optimizer.lr`` after the warm-up.
    warmup_steps
        Steps of linear ramp-up (factor ``(step + 1) / (warmup_steps + 1)``) before the
        schedule, which then spans the remaining steps; ignored by ``onecycle``.
    min_lr_ratio
        Final factor of ``cosine`` and ``onecycle`` and lower bound of ``poly``, as a
        fraction of ``optimizer.lr``; not used by ``step`` and ``constant``.
    power
        ``poly`` only: exponent of ``(1 - t)``; 1 is a linear decay.
    step_size
        ``step`` only: steps (after the warm-up) between multiplications by ``gamma``.
    gamma
        ``step`` only: factor applied every ``step_size`` steps.
    pct_start
        ``onecycle`` only: fraction of the run spent ramping up to ``optimizer.lr``.
    div_factor
        ``onecycle`` only: the run starts at ``optimizer.lr / div_factor``.
    horizon
        ``steps``: the schedule spans ``steps``; ``time``: it also advances with the wall
        clock to reach its end at ``time_limit_s`` (required then; not bit-reproducible).
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

    Attributes
    ----------
    mode
        ``random``: centres uniform over the eligible pixels (valid, in the training part,
        labelled or not); ``class_balanced``: a class first, then a labelled pixel of it,
        for rare classes. Patch ``k`` of epoch ``e`` depends only on ``(seed, e, k)``.
    class_probs
        ``class_balanced`` only: ``{class id: relative probability}``, renormalised over
        the classes present in the training pixels (unlisted classes: 0). Null: equal
        over the classes present.
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
    lattice (standard deviation ``sigma`` pixels), interpolated bicubically to every pixel.

    Attributes
    ----------
    p
        Probability that a patch is deformed.
    grid
        Nodes per side of the displacement lattice, which spans the patch plus its
        context; more nodes give finer, more local distortions.
    sigma
        Standard deviation (pixels) of each node's displacement; each patch is also read
        with ``ceil(3 * sigma)`` pixels of context, cropped after warping. 0: no change.
    order
        Interpolation of the image: 3 (bicubic spline) or 1 (bilinear, faster); labels and
        weights always take the nearest pixel.
    """

    p: Annotated[float, Field(ge=0, le=1)] = 0.5
    grid: Annotated[int, Field(ge=2)] = 3
    sigma: Annotated[float, Field(ge=0)] = 10.0
    order: Literal[1, 3] = 3


class IntensityConfig(_Model):
    """Intensity changes on the normalized image: gamma (on the patch's min-max range),
    brightness (added, in std units) and contrast (scaled about the patch mean).

    Applied per band in this order: gamma, contrast, brightness; one draw per patch.

    Attributes
    ----------
    p
        Probability that a patch gets the three changes.
    gamma
        ``[low, high]`` range (both > 0) of the exponent, drawn log-uniformly and applied
        to each band rescaled to ``[0, 1]`` over the patch; above 1 darkens mid-tones.
    brightness
        Offset drawn uniformly from ``[-brightness, brightness]`` and added to every band,
        in normalized units (standard deviations under ``zscore``).
    contrast
        ``[low, high]`` range of the factor, drawn uniformly, scaling each band about its
        patch mean.
    """

    p: Annotated[float, Field(ge=0, le=1)] = 0.5
    gamma: tuple[float, float] = (0.7, 1.5)
    brightness: Annotated[float, Field(ge=0)] = 0.1
    contrast: tuple[float, float] = (0.75, 1.25)

    @model_validator(mode="after")
    def _check_ranges(self) -> IntensityConfig:
        _check_range(self.gamma, name="gamma", positive=True)
        _check_range(self.contrast, name="contrast", positive=True)
        return self


class AugmentConfig(_Model):
    """Patch augmentation (see :mod:`segflow.train.augment`).

    Applied in a fixed order (elastic, flip/rotation, intensity), every draw from the
    patch's own generator, so the patches do not depend on ``num_workers`` or DDP ranks.

    Attributes
    ----------
    flips
        Mirror left-right with probability 0.5 (with ``rot90``: all 8 orientations).
    rot90
        Rotate by 0, 1, 2 or 3 quarter turns, equally likely.
    elastic
        U-Net elastic deformation; null: off.
    intensity
        Random gamma, contrast and brightness; null: off.
    """

    flips: bool = True
    rot90: bool = True
    elastic: ElasticConfig | None = None
    intensity: IntensityConfig | None = None


class EarlyStoppingConfig(_Model):
    """Stop after ``patience`` validations without improvement of ``metric`` by ``min_delta``.

    Attributes
    ----------
    metric
        Validation metric to watch: ``pixel_error``, ``pixel_accuracy``, ``mean_iou``,
        ``mean_dice``, ``mean_class_accuracy`` or ``frequency_weighted_iou``. Without
        validation data it never stops.
    mode
        ``min`` for ``pixel_error``, ``max`` for accuracies, IoU and Dice (checked).
    patience
        Validations in a row (one every ``val_interval`` steps) without improvement before
        training stops (with a state and ``last`` checkpoint written).
    min_delta
        A validation improves only if it beats the best earlier value by more than this
        (in the metric's units).
    """

    metric: Metric = "pixel_error"
    mode: Literal["min", "max"] = "min"
    patience: Annotated[int, Field(ge=1)] = 10
    min_delta: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _check_mode(self) -> EarlyStoppingConfig:
        _check_mode(self.metric, self.mode, key="early_stopping.mode")
        return self


class BatchNormRecalibrationConfig(_Model):
    """Recompute the final model's BatchNorm statistics over training patches ("precise BN").

    During training each BatchNorm layer keeps a running mean and variance with momentum
    0.1, so the statistics of the final model come mostly from its last few (small) batches,
    computed with weights that were still changing. After the last step these are reset and
    computed again with the final weights: the equal-weight average over ``patches``
    un-augmented training patches, drawn at random (``torch.optim.swa_utils.update_bn``,
    as SWA does after averaging weights), in the precision inference uses by default (fp32
    on a CPU, the training autocast on CUDA). Then the run validates once more and writes
    ``last/``. Models without BatchNorm are unchanged.

    Attributes
    ----------
    patches
        Training patches the statistics average over.
    patch
        Their side in pixels (a multiple of the model's size multiple). Larger patches see
        more context, closer to inference's tiles. Null: the training ``patch``. With a
        blocked split at most the training ``patch`` or twice ``stores.split.margin``,
        whichever is larger, so that no patch reaches validation pixels.
    """

    patches: Annotated[int, Field(ge=1)] = 256
    patch: Annotated[int, Field(ge=8)] | None = None


class TrainConfig(_Model):
    """Everything a training run depends on (with the stores' contents).

    ``steps`` or ``epochs`` (times ``steps_per_epoch``) set the run length; an epoch is
    only the unit of the data seeding (patch ``k`` of epoch ``e`` is a pure function of
    ``(seed, e, k)``). A run writes ``best/`` and ``last/`` checkpoints, ``state/`` (to
    resume), ``metrics.csv``/``metrics.json`` and ``curve.png``. A resumed run must keep the
    config, except ``val_interval``, ``checkpoint_interval``, ``num_workers``,
    ``time_limit_s`` and ``early_stopping``.

    Attributes
    ----------
    stores
        The scene stores to train and validate on.
    model
        The network; ``in_channels`` must equal the stores' bands and ``out_channels``
        exceed every class id (normally: the number of classes).
    classes
        The class table every train and validation store must have (same ids); saved in
        the checkpoints, whose names and colours the predictions use. Left out:
        ``flows/train.py`` fills in the pipeline's top-level ``classes``; elsewhere
        (``flows/pipeline.py``, the library) the first train store's table is used.
    loss
        The loss; only ``pixel_weighted_ce`` reads prepare's weight map (border and class
        weights).
    optimizer
        The optimizer and its base learning rate.
    schedule
        The learning-rate factor over the run.
    patch
        Side (pixels) of the square training patches, centred on sampled pixels and
        mirrored past the scene edges; a multiple of the model's size multiple (``2 **
        depth``). Sets the default split margin (``patch // 2``).
    loss_margin
        Pixels along each side of a patch left out of the loss (set to ``ignore_index``):
        the network sees zero padding there, where tiled inference gives it real context
        (the U-Net paper trains with valid convolutions, so its loss only covers pixels
        with full context). 0: every pixel; must leave pixels: ``2 * loss_margin < patch``.
    batch_size
        Patches per optimizer step over all processes: under DDP each of ``W`` ranks takes
        ``batch_size / W`` (must divide evenly).
    steps
        Run length in optimizer steps; give exactly one of ``steps`` and ``epochs``
        (``flows/train.py --steps`` overrides both).
    epochs
        Run length in epochs of ``steps_per_epoch`` steps.
    steps_per_epoch
        Steps per epoch: the unit of ``epochs``, of the patch seeding and of the
        ``epoch`` column of the metrics; not a pass over the data.
    sampling
        How patch centres are drawn.
    augment
        Random changes of each patch.
    normalization
        ``zscore``: ``(x - mean) / std`` per band, pooled from the train stores'
        fingerprints (prepare, over ``prepare.train_region``), saved in the checkpoint and
        applied again at inference; ``none``: raw values as float32.
    seed
        Seeds patch centres and augmentation (per patch, from ``(seed, epoch, k)``), the
        model's initial weights and dropout (``seed + 1 + rank``).
    grad_clip
        Largest L2 norm of all gradients together, clipped before each step (after
        unscaling under fp16); null: no clipping.
    amp
        Mixed precision: ``auto`` = on CUDA bf16 where supported, else fp16 with a gradient
        scaler, and float32 on the CPU; ``bf16`` also on the CPU (about 1.6x faster steps
        on CPUs with AVX512-BF16 or AMX, measured on this project's 2-core machines; slow on
        others); ``fp16`` needs CUDA; ``none`` = float32.
    channels_last
        Keep the model's weights and activations in NHWC memory layout: faster convolutions
        on CPUs (oneDNN) and on tensor cores; same results within rounding.
    early_stopping
        Stop when the validation metric stops improving; null: run every step.
    select_metric
        Validation metric whose best value saves the ``best/`` checkpoint (names as in
        ``early_stopping.metric``). Without validation data no ``best/`` is saved (the
        pipeline's segment stage needs it), only ``last/``.
    select_mode
        Whether lower (``min``) or higher (``max``) ``select_metric`` is better: ``min``
        for ``pixel_error``, ``max`` for ``mean_iou`` and the other scores (checked).
    val_interval
        Steps between validations (one also follows the last step), each over the whole
        validation region; also the window of the ``train_loss`` mean logged with it.
    val_tile
        Side (pixels) of the tiles validation predicts, each with the model's halo of
        context; a multiple of the model's size multiple. Larger is faster, uses more memory.
    checkpoint_interval
        Steps between writes of the resumable ``state/`` (also written at the end or on
        stopping); ``best/`` and ``last/`` are separate.
    num_workers
        DataLoader worker processes (spawned) reading and augmenting patches; 0 reads them
        in the training process. The patches are the same for any value.
    deterministic
        Use only deterministic torch kernels (``torch.use_deterministic_algorithms``; on
        CUDA also a fixed cuBLAS workspace and no cuDNN benchmarking): slower, but a
        resumed CPU run then ends with the uninterrupted run's weights bit for bit.
    ema
        Decay of an exponential moving average of the weights and BatchNorm statistics
        (``ema = decay * ema + (1 - decay) * weights`` after every step, starting from the
        first step's weights), which validation, ``best/`` and ``last/`` then use; e.g.
        0.998 averages over about the last 500 steps, smoothing the step-to-step noise of
        small-batch training. Averaged BatchNorm statistics do not fit the averaged
        weights well: add ``bn_recalibration`` to compute them anew for the final model
        (as SWA does). Null: the raw weights.
    time_limit_s
        Stop after this many seconds of the training loop (summed over resumes,
        validations included, set-up not), after the step in progress, with a validation,
        ``state/`` and ``last/``; required by ``schedule.horizon: time``. Null: no limit.
        The BatchNorm recalibration comes after it and is not counted.
    bn_recalibration
        Recompute the BatchNorm statistics of the final weights over training patches
        before the last validation and ``last/``. Null: keep the running statistics.
    """

    stores: StoresConfig
    model: ModelConfig
    classes: tuple[ClassDef, ...] | None = None
    loss: LossConfig = Field(default_factory=lambda: LossConfig())
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    patch: Annotated[int, Field(ge=8)] = 256
    loss_margin: Annotated[int, Field(ge=0)] = 0
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
    channels_last: bool = False
    early_stopping: EarlyStoppingConfig | None = None
    select_metric: Metric = "pixel_error"
    select_mode: Literal["min", "max"] = "min"
    val_interval: Annotated[int, Field(ge=1)] = 100
    val_tile: Annotated[int, Field(ge=16)] = 1024
    checkpoint_interval: Annotated[int, Field(ge=1)] = 100
    num_workers: Annotated[int, Field(ge=0)] = 0
    deterministic: bool = False
    ema: Annotated[float, Field(gt=0, lt=1)] | None = None
    time_limit_s: Annotated[float, Field(gt=0)] | None = None
    bn_recalibration: BatchNormRecalibrationConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        if self.schedule.horizon == "time" and self.time_limit_s is None:
            raise ValueError("schedule.horizon 'time' needs time_limit_s")
        m = self.model.size_multiple
        if self.patch % m:
            raise ValueError(
                f"patch {self.patch} must be a multiple of the model's size multiple {m}"
            )
        if 2 * self.loss_margin >= self.patch:
            raise ValueError(
                f"loss_margin {self.loss_margin} leaves no pixel of a {self.patch}-pixel patch:"
                f" use less than {self.patch // 2}"
            )
        if self.val_tile % m:
            raise ValueError(f"val_tile {self.val_tile} must be a multiple of {m}")
        recal = self.bn_recalibration
        if recal is not None and recal.patch is not None:
            if recal.patch % m:
                raise ValueError(
                    f"bn_recalibration.patch {recal.patch} must be a multiple of the model's "
                    f"size multiple {m}"
                )
            reach = max(self.patch, 2 * self.margin)  # what training patches may cover
            if self.stores.split is not None and recal.patch > reach:
                raise ValueError(
                    f"bn_recalibration.patch {recal.patch} would reach validation pixels "
                    f"(training centres keep {self.margin} px from them): use at most {reach} "
                    "or raise stores.split.margin"
                )
        _check_mode(self.select_metric, self.select_mode, key="select_mode")
        return self

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return (
            self.steps if self.steps is not None else int(self.epochs or 0) * self.steps_per_epoch
        )

    @property
    def margin(self) -> int:
        """Distance kept between training patch centres and validation pixels."""
        if self.stores.split is not None and self.stores.split.margin is not None:
            return self.stores.split.margin
        return self.patch // 2


def make_train_config(
    data: TrainConfig | Mapping[str, Any], *, source: str = "train config"
) -> TrainConfig:
    """Validate ``data`` into a :class:`TrainConfig`; bad values raise one-line ConfigError."""
    if isinstance(data, TrainConfig):
        return data
    try:
        return TrainConfig.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=source)) from None
