"""The instance raster as a uint32 Cloud-Optimized GeoTIFF (0: no object)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from segflow.config import ClassDef
from segflow.errors import ConfigError
from segflow.io.export._common import ClassTable, check_labels
from segflow.io.export.cog import _check_block, _CogContent, _CogOptions, _stream_to_cog
from segflow.io.store import GeoRef

__all__ = ["write_instance_cog"]


def write_instance_cog(
    instances: Any,
    path: str | Path,
    *,
    georef: GeoRef | None,
    classes: Iterable[ClassDef | Mapping[str, Any]],
    count: int,
    block: int = 512,
    read_size: int = 2048,
    threads: int | str = 1,
) -> Path:
    """Write ``(y, x)`` uint32 instance ids (0: no object) as a DEFLATE COG.

    Overviews pick the nearest pixel (ids must never be averaged); the class table and the
    instance count are dataset tags (``SEGFLOW_KIND=instances``). Each instance's class and
    size are in the polygon outputs, keyed by ``instance_id``.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> ids = np.zeros((64, 64), "uint32"); ids[2:9, 2:9] = 1; ids[20:30, 5:9] = 2
    >>> write_instance_cog(ids, tempfile.mkdtemp() + "/i.tif", georef=None,
    ...                    classes=[{"id": 1, "name": "nucleus"}], count=2, block=32).suffix
    '.tif'
    """
    shape = check_labels(instances, what="instances")
    if np.dtype(instances.dtype) != np.uint32:
        raise ConfigError(f"instance ids must be uint32, got {np.dtype(instances.dtype).name}")
    table = ClassTable(classes)
    content = _CogContent(
        shape=shape,
        dtype=np.dtype("uint32"),
        georef=georef,
        nodata=None,  # 0 is "no object", a value like any other to a GIS
        tags={**table.tags(), "SEGFLOW_KIND": "instances", "SEGFLOW_INSTANCES": str(count)},
        band_tags={},
        descriptions=("instance",),
    )
    options = _CogOptions(
        block=_check_block(block),
        resampling="nearest",
        compress="DEFLATE",
        level=None,
        read_size=read_size,
        cache_mb=64,
        threads=threads,
        predictor=1,
    )
    return _stream_to_cog(instances, path, content, options)
