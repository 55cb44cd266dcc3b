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

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from segflow.config.base import DEFAULT_CLASSES, ClassDef, SchemaModel, format_validation_error
from segflow.config.collection import CollectionConfig
from segflow.config.evaluate import EvaluateOptions
from segflow.config.segment import InstanceOptions, OutputChoices, SegmentOptions
from segflow.config.train import TrainConfig
from segflow.errors import ConfigError

__all__ = [
    "SCHEMA_VERSION",
    "IngestConfig",
    "PipelineConfig",
    "PrepareConfig",
    "SegmentConfig",
    "TrainRegion",
    "load_config",
]

SCHEMA_VERSION = 1


class IngestConfig(SchemaModel):
    """How a source image (and its labels) become a scene store.

    Attributes
    ----------
    source
        Image file to ingest (anything GDAL opens, PNG/JPEG/TIFF, whole-slide images, a STAC
        Item ``.json``; nodata, alpha or non-tissue pixels become invalid);
        ``flows/pipeline.py`` ingests it into ``{work_dir}/scene.zarr``, and it is
        ``segment.image``'s default. ``flows/train.py`` uses this section as the template
        for ``train.stores`` entries and replaces this path with theirs.
    assets
        With a STAC Item as ``source``: the keys of the assets read as the image's bands, in
        this order (several band assets are stacked on the finest one's grid); empty: the
        Item's only raster asset.
    labels
        Class labels: a vector file (``.geojson``, ``.gpkg``, ``.shp``, ``.parquet``,
        ``.fgb``..., rasterized by pixel centre, later features winning, uncovered pixels
        class 0) or a raster of class values on the image's grid (or georeferenced and
        reprojected, nearest). Vector features also give one instance each. Null: no labels.
    instances
        Raster of object ids (0 = none) on the image's grid, for prepare's border weights.
        Null: vector ``labels`` give instances, else prepare derives them from raster
        labels as 4-connected components of the non-0, labelled classes.
    class_field
        Vector labels only: the feature attribute holding each feature's class (integer
        ids, or class names for a text field). Null: every feature is ``class_value``.
    class_value
        Vector labels without ``class_field``: the class id burnt for every feature (must
        be in ``classes``).
    class_map
        Raster labels only: raw value -> class id (or ``ignore_index``), e.g. ``{0: 0,
        255: 1}``; any other value is an error. Null: raw values must already be class
        ids or ``ignore_index``. The raster's nodata reads as ``ignore_index`` unless mapped.
    chunk
        Side (pixels) of the square Zarr chunks of every store array (all bands together
        for ``image``); the unit of training-patch reads and sampling. Smaller chunks mean
        less over-reading per patch but more files.
    shard
        Side (pixels, a multiple of ``chunk``) of Zarr shards that pack chunks into one
        file, e.g. for object storage; shards then become the write units of ingest,
        prepare and progress. Null: no sharding.
    level
        Pyramid level of the source to ingest (0 = full resolution): the store holds that
        level's pixel grid, so every pixel size and region downstream is at this level.
    compression_level
        Zstandard level (Blosc, bitshuffle) of every store array: higher is smaller and
        slower to write; reading speed barely changes.
    """

    source: str
    assets: tuple[str, ...] = ()
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


class TrainRegion(SchemaModel):
    """The part of a scene used for training statistics, in the store's pixels.

    Either a pixel window (``bbox`` = row_start, col_start, row_stop, col_stop) or a
    spatial block split (every ``holdout_every``-th block of ``block`` x ``block`` pixels,
    counting row-major, is held out for validation). Pixels are those of the scene store,
    i.e. of the ingested ``ingest.level``.

    Attributes
    ----------
    bbox
        ``[row_start, col_start, row_stop, col_stop]`` (stops exclusive) of the only
        pixels counted; must overlap the store. Give either this or ``block``.
    block
        Side (pixels) of the square blocks of a held-out split, numbered row-major from 0;
        needs ``holdout_every``.
    holdout_every
        Block ``k`` is held out when ``k % holdout_every == holdout_every - 1``. Use the
        ``block`` / ``val_every`` of ``train.stores.split`` so statistics skip the
        validation blocks (nothing checks that they agree).
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


class PrepareConfig(SchemaModel):
    """Training targets: U-Net border weights, class weights, the fingerprint.

    The store's ``weights`` array is ``w_c + w0 * exp(-(d1 + d2)**2 / (2 * sigma**2))``
    (border term on background pixels between objects, 0 on unlabelled and invalid pixels);
    only ``train.loss.name: pixel_weighted_ce`` reads it. The fingerprint (per-band
    statistics) feeds ``train.normalization: zscore``.

    Attributes
    ----------
    w0
        Height of the U-Net border term, in weight units added to the class weight of
        background pixels squeezed between two objects; 0 turns the border term off.
    sigma
        Width (pixels) of the border term's decay with ``d1 + d2``, the distances to the
        nearest and second-nearest object; larger spreads the weight over wider gaps.
    eps
        Cut-off: the border term is set to 0 where it would be below ``eps``, which bounds
        the halo ``ceil(sigma * sqrt(2 ln(w0 / eps)))`` (22 px for the defaults); smaller
        is closer to the exact formula and slower.
    class_weights
        Per-class weight ``w_c`` in the weight map, from label counts over the valid,
        labelled pixels of ``train_region``: ``none`` (1), ``inverse`` (1 / frequency,
        mean 1 over present classes), ``median`` (median frequency / frequency) or
        ``explicit``. Not ``none`` needs ``labels`` in the store.
    explicit_class_weights
        ``{class id: weight >= 0}`` for ``class_weights: explicit`` (required then, ignored
        otherwise); every class present must be listed, others get 1; weight 0 removes a
        class's pixels from the loss.
    train_region
        The pixels class counts and the fingerprint are computed over (the weight map
        covers the whole store); null: every valid pixel.
    """

    w0: Annotated[float, Field(ge=0)] = 10.0
    sigma: Annotated[float, Field(gt=0)] = 5.0
    eps: Annotated[float, Field(gt=0, lt=1)] = 1e-3
    class_weights: Literal["none", "inverse", "median", "explicit"] = "none"
    explicit_class_weights: dict[int, float] | None = None
    train_region: TrainRegion | None = None


class SegmentConfig(SegmentOptions, InstanceOptions, OutputChoices):
    """segment_region inside a pipeline: which image and region, how, and which outputs.

    ``image`` defaults to the ingest source and the model to the pipeline's trained
    checkpoint; outputs go to the pipeline's ``work_dir``: ``prediction.tif`` (a class-id
    Cloud-Optimized GeoTIFF) always, the others as switched on below. The region and
    inference options are segment_region's own (:class:`~segflow.config.segment.SegmentOptions`).

    Attributes
    ----------
    image
        Image to segment: a source file (read at ``level``) or a scene store directory
        (read only: the predictions go to the work store). Null: ``ingest.source``.
    level
        Pyramid level of ``image`` to read (slides, GeoTIFF overviews); must be the scale
        the model was trained at. Null: ``ingest.level`` when ``image`` is null (the
        ingested source), else 0.
    model
        Checkpoint directory (as training writes, e.g. ``outputs/x/train/best``). Null:
        ``{work_dir}/train/best``, which needs a ``train`` section.
    """

    image: str | None = None
    level: Annotated[int, Field(ge=0)] | None = None
    model: str | None = None


class PipelineConfig(SchemaModel):
    """A whole pipeline: one data set or use case.

    Attributes
    ----------
    schema_version
        Version of this configuration schema; only 1 exists.
    name
        The pipeline's name: fills ``{name}`` in ``work_dir`` and titles the flows'
        summaries; ``flows/train.py`` writes to ``outputs/{name}/train`` by default.
    classes
        The class table: label values are checked against it at ingest, it is stored in
        every scene store, and ``train.classes`` defaults to it in ``flows/train.py``.
    ignore_index
        Label value of unlabelled pixels in the stores (not a class id); no loss, class
        count or metric uses them. Values above 255 (or a class id above 255) make the
        labels uint16.
    work_dir
        Output directory of ``flows/pipeline.py`` (``{name}`` is replaced; relative to
        the working directory): scene store, fingerprint, ``train/``, predictions and the
        stage records.
    ingest
        The source image and its labels.
    prepare
        Border weights, class weights and the training region of the statistics.
    train
        The training run; null: the pipeline does not train, and ``segment.model`` must
        name a checkpoint.
    segment
        Inference over the image and the outputs written.
    evaluate
        The prediction against reference labels (``evaluation.json`` and ``evaluation.md``
        in ``work_dir``: pixel and object metrics); null: no evaluation.
    collection
        More scenes segmented with the pipeline's model, after training
        (:class:`~segflow.config.collection.CollectionConfig`: a folder per scene, the
        summary tables and the mosaic in ``{work_dir}/collection``); null: none.
    """

    schema_version: Literal[1] = 1  # == SCHEMA_VERSION
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    classes: tuple[ClassDef, ...] = DEFAULT_CLASSES
    ignore_index: Annotated[int, Field(ge=0, le=65535)] = 255
    work_dir: str = "outputs/{name}"
    ingest: IngestConfig
    prepare: PrepareConfig = PrepareConfig()
    train: TrainConfig | None = None
    segment: SegmentConfig = SegmentConfig()
    evaluate: EvaluateOptions | None = None
    collection: CollectionConfig | None = None

    @model_validator(mode="after")
    def _classes_unique(self) -> PipelineConfig:
        ids = [c.id for c in self.classes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"class ids must be unique, got {ids}")
        if self.ignore_index in ids:
            raise ValueError(f"ignore_index {self.ignore_index} is also a class id")
        return self

    @property
    def work_path(self) -> Path | str:
        """The pipeline's output directory (``work_dir`` with ``{name}`` filled in): a path,
        or a URL (``s3://bucket/prefix``, no trailing slash) on object storage."""
        work = self.work_dir.format(name=self.name)
        return work.rstrip("/") if "://" in work else Path(work)


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
    return cfg
