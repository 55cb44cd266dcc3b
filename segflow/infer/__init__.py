"""Inference: stream a model over a region of a large image into a prediction store.

See :mod:`segflow.infer.engine` for the design (tiling, mirroring, merging, resume) and
:mod:`segflow.tiling` for the geometry.
"""

from __future__ import annotations

from segflow.infer.engine import (
    ArrayReader,
    InferenceOptions,
    InferenceReport,
    StoreReader,
    WindowReader,
    build_layout,
    open_prediction_store,
    predict_array,
    predict_region,
    prediction_unit,
)

__all__ = [
    "ArrayReader",
    "InferenceOptions",
    "InferenceReport",
    "StoreReader",
    "WindowReader",
    "build_layout",
    "open_prediction_store",
    "predict_array",
    "predict_region",
    "prediction_unit",
]
