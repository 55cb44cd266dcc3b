"""Inference: stream a model over a region of a large image into a prediction store.

See :mod:`segflow.infer.engine` for the design (tiling, mirroring, merging, resume) and
:mod:`segflow.tiling` for the geometry. The parts, by role:

- :mod:`~segflow.infer.options`: what a run is asked to do, and its report;
- :mod:`~segflow.infer.readers`: window readers and the tile normalizer;
- :mod:`~segflow.infer.forward`: device, AMP, test-time flips, logits to classes;
- :mod:`~segflow.infer.merger`: tiles into write units (crop copy or Gaussian sum);
- :mod:`~segflow.infer.store`: the prediction store and its write-unit size;
- :mod:`~segflow.infer.engine`: scheduling and streaming (:func:`predict_region`).
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
    predict_units,
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
    "predict_units",
    "predict_region",
    "prediction_unit",
]
