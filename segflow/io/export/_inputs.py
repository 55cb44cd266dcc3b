"""The checked class-id input every label exporter starts from.

Internal module; the public API is re-exported by :mod:`segflow.io.export`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segflow.config import ClassDef
from segflow.io.export._common import (
    ClassTable,
    IdChecker,
    check_integer_dtype,
    check_labels,
    check_nodata,
)

__all__ = ["ClassRaster", "check_class_raster"]


@dataclass(frozen=True)
class ClassRaster:
    """A checked 2-D class-id input: its shape, dtype, class table and nodata value."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    table: ClassTable
    nodata: int | None

    def checker(self, enabled: bool) -> IdChecker | None:
        """An :class:`IdChecker` of the ids and nodata, or ``None`` when not ``enabled``."""
        return IdChecker(self.table, self.dtype, self.nodata) if enabled else None


def check_class_raster(
    labels: Any,
    classes: Iterable[ClassDef | Mapping[str, Any]],
    nodata: int | None,
    *,
    allowed: Sequence[str],
) -> ClassRaster:
    """Check ``labels`` (2-D, an ``allowed`` dtype), the class table and ``nodata``, in order."""
    shape = check_labels(labels)
    dtype = check_integer_dtype(labels.dtype, what="labels", allowed=allowed)
    table = ClassTable(classes)
    return ClassRaster(shape, dtype, table, check_nodata(nodata, dtype, table))
