"""Typed pipeline configuration, loaded from ``pipelines/*.yaml``.

Every model forbids unknown keys and is frozen. A config file is one
:class:`PipelineConfig`; its sections configure the stages. Relative paths are kept as
written and resolved against the working directory by the code that opens them.

Examples
--------
>>> cfg = IngestConfig(source="scene.tif", chunk=256)
>>> cfg.chunk
256
>>> IngestConfig(source="scene.tif", chunk=0)
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for IngestConfig
...
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from segflow.errors import ConfigError

__all__ = [
    "SCHEMA_VERSION",
    "ClassDef",
    "IngestConfig",
    "PipelineConfig",
    "PrepareConfig",
    "SegmentConfig",
    "TrainRegion",
    "format_validation_error",
    "load_config",
]

SCHEMA_VERSION = 1

_HEX_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassDef(_Model):
    """One entry of the class table."""

    id: Annotated[int, Field(ge=0, le=65534)]
    name: Annotated[str, Field(min_length=1)]
    color: str = "#808080"

    @field_validator("color")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _HEX_COLOUR.match(value):
            raise ValueError(f"colour must look like '#rrggbb', got {value!r}")
        return value.lower()

    @property
    def rgb(self) -> tuple[int, int, int]:
        return (int(self.color[1:3], 16), int(self.color[3:5], 16), int(self.color[5:7], 16))


DEFAULT_CLASSES: tuple[ClassDef, ...] = (
    ClassDef(id=0, name="background", color="#000000"),
    ClassDef(id=1, name="foreground", color="#ff0000"),
)


class IngestConfig(_Model):
    """How a source image (and its labels) become a scene store."""

    source: str
    labels: str | None = None
    instances: str | None = None
    class_field: str | None = None
    class_value: Annotated[int, Field(ge=0, le=65534)] = 1
    class_map: dict[int, int] | None = None
    chunk: Annotated[int, Field(gt=0, le=16384)] = 512
    shard: Annotated[int, Field(gt=0)] | None = None
    level: Annotated[int, Field(ge=0)] = 0
    compression_level: Annotated[int, Field(ge=0, le=22)] = 3

    @model_validator(mode="after")
    def _shard_multiple_of_chunk(self) -> IngestConfig:
        if self.shard is not None and self.shard % self.chunk:
            raise ValueError(f"shard ({self.shard}) must be a multiple of chunk ({self.chunk})")
        return self


class TrainRegion(_Model):
    """The part of a scene used for training statistics, in level-0 pixels.

    Either a pixel window (``bbox`` = row_start, col_start, row_stop, col_stop) or a
    spatial block split (every ``every``-th block of ``block`` pixels, counting row-major,
    is held out for validation).
    """

    bbox: tuple[int, int, int, int] | None = None
    block: Annotated[int, Field(gt=0)] | None = None
    holdout_every: Annotated[int, Field(ge=2)] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> TrainRegion:
        if self.bbox is None and self.block is None:
            raise ValueError("give either bbox or block (+ holdout_every)")
        if (self.block is None) != (self.holdout_every is None):
            raise ValueError("block and holdout_every go together")
        if self.bbox is not None:
            r0, c0, r1, c1 = self.bbox
            if r1 <= r0 or c1 <= c0:
                raise ValueError(
                    f"bbox must have row_stop > row_start and col_stop > col_start, got {self.bbox}"
                )
        return self


class PrepareConfig(_Model):
    """Training targets: U-Net border weights, class weights, the fingerprint."""

    w0: Annotated[float, Field(ge=0)] = 10.0
    sigma: Annotated[float, Field(gt=0)] = 5.0
    eps: Annotated[float, Field(gt=0, lt=1)] = 1e-3
    class_weights: Literal["none", "inverse", "median", "explicit"] = "none"
    explicit_class_weights: dict[int, float] | None = None
    train_region: TrainRegion | None = None


class SegmentConfig(_Model):
    """segment_region inside a pipeline: which image and region, how, and which outputs.

    ``image`` defaults to the ingest source and the model to the pipeline's trained
    checkpoint; outputs go to the pipeline's ``work_dir``.
    """

    image: str | None = None
    model: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    bbox_crs: str | None = None
    window: tuple[int, int, int, int] | None = None
    tile: Annotated[int, Field(gt=0)] = 512
    mode: Literal["crop", "gaussian"] = "crop"
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.5
    batch_size: Annotated[int, Field(ge=1)] = 8
    tta_flips: bool = False
    polygons: bool = True
    parquet: bool = True
    probabilities: bool = False
    quicklook: bool = True
    ome_tiff: bool = False
    qupath: bool = False


class PipelineConfig(_Model):
    """A whole pipeline: one data set or use case."""

    schema_version: Literal[1] = 1  # == SCHEMA_VERSION
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    classes: tuple[ClassDef, ...] = DEFAULT_CLASSES
    ignore_index: Annotated[int, Field(ge=0, le=65535)] = 255
    work_dir: str = "outputs/{name}"
    ingest: IngestConfig
    prepare: PrepareConfig = PrepareConfig()
    # validated by load_config with segflow.train.config.TrainConfig (which imports torch)
    train: dict[str, Any] | None = None
    segment: SegmentConfig = SegmentConfig()

    @model_validator(mode="after")
    def _classes_unique(self) -> PipelineConfig:
        ids = [c.id for c in self.classes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"class ids must be unique, got {ids}")
        if self.ignore_index in ids:
            raise ValueError(f"ignore_index {self.ignore_index} is also a class id")
        return self

    @property
    def work_path(self) -> Path:
        """The pipeline's output directory (``work_dir`` with ``{name}`` filled in)."""
        return Path(self.work_dir.format(name=self.name))


def format_validation_error(err: ValidationError, *, source: str, prefix: str = "") -> str:
    """Turn a pydantic error into one line: where, what, the value, what to do."""
    first = err.errors()[0]
    where = prefix + ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{where}': remove it or check its spelling"
    if first["type"] == "missing":
        return f"{source}: missing required key '{where}': add it"
    value = first.get("input")
    more = f" (and {err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
    return f"{source}: '{where}' = {value!r} is invalid: {first['msg']}{more}"


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline YAML file.

    Raises
    ------
    ConfigError
        The file is missing, is not YAML, or does not match the schema.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {str(p)!r}: check the path")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(
            f"{p}: not valid YAML ({err.__class__.__name__}): fix the syntax"
        ) from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=str(p))) from err
    if cfg.train is not None:  # validated here, not in the model: TrainConfig needs torch
        from segflow.train.config import TrainConfig

        try:
            TrainConfig.model_validate(cfg.train)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, source=str(p), prefix="train.")) from err
    return cfg
