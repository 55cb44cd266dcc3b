"""What a pipeline is refused for in a second, before any stage starts."""

from __future__ import annotations

from segflow.config import PipelineConfig
from segflow.errors import ConfigError, options_named
from segflow.io import locations, remote
from segflow.stages.collection import collection_request, list_scenes

__all__ = ["check_pipeline_inputs"]


def check_pipeline_inputs(cfg: PipelineConfig) -> None:
    """Refuse a pipeline whose ingest source or evaluation reference is missing, whose
    collection names no scene, or whose ``work_dir`` on object storage cannot be written (an
    unsupported scheme, a missing bucket, no access), in a second, before anything starts."""
    work = cfg.work_path
    if isinstance(work, str):
        remote.check_prefix(remote.check_location(work, what="work_dir", write=True),
                            what="work_dir")  # fmt: skip
    if not locations.exists(cfg.ingest.source):
        raise ConfigError(
            f"ingest.source not found: {cfg.ingest.source!r} (paths are relative to the "
            "working directory)"
        )
    if cfg.evaluate is not None and not locations.exists(cfg.evaluate.reference):
        raise ConfigError(
            f"evaluate.reference not found: {cfg.evaluate.reference!r} (paths are relative "
            "to the working directory)"
        )
    if cfg.collection is not None:  # a glob or list that names no image fails here
        with options_named("yaml", prefix="collection."):
            list_scenes(collection_request(cfg))
