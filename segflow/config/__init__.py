"""Typed configuration: every schema a pipeline YAML or a command line is validated against.

No module here imports torch, so a config loads (and its reference renders) without it.

- :mod:`segflow.config.base`: the schema base, the class table, one-line error messages;
- :mod:`segflow.config.pipeline`: the pipeline YAML and its ingest, prepare and segment
  sections, and :func:`load_config`;
- :mod:`segflow.config.train`, :mod:`segflow.config.model`, :mod:`segflow.config.loss`: the
  ``train`` section, its network and its loss.

The names of :mod:`segflow.config.pipeline` and :mod:`segflow.config.base` are available here.
"""

from segflow.config.base import DEFAULT_CLASSES, ClassDef, format_validation_error
from segflow.config.pipeline import (
    SCHEMA_VERSION,
    IngestConfig,
    PipelineConfig,
    PrepareConfig,
    SegmentConfig,
    TrainRegion,
    load_config,
)

__all__ = [
    "DEFAULT_CLASSES",
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
