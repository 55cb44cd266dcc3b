"""evaluate: a prediction against reference labels, pixel and object metrics, in bounded memory.

:func:`evaluate` opens both sides (:mod:`segflow.evaluation.inputs`), labels class maps into
objects where needed, and streams :func:`segflow.evaluation.metrics.evaluate_layers` over the
region; the report is a JSON-ready dict, also written as JSON and markdown.

Examples
--------
>>> from segflow.config.evaluate import EvaluateRequest
>>> report = evaluate(EvaluateRequest(prediction="m.tif", reference="f.geojson"))  # doctest: +SKIP
>>> report["objects"]["f1"]  # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segflow.config import ClassDef
from segflow.config.evaluate import EvaluateRequest
from segflow.errors import ConfigError
from segflow.evaluation.inputs import (
    Grid,
    Side,
    check_options,
    is_vector,
    object_side,
    open_prediction,
    open_raster,
    open_reference,
    raster_grid,
    rasterizer,
    read_vector,
)
from segflow.evaluation.metrics import (
    ObjectLayer,
    evaluate_arrays,
    evaluate_layers,
    labelled_layer,
    report_markdown,
    write_report,
)
from segflow.geometry import Window
from segflow.outputs import plan_outputs
from segflow.region import resolve_region

__all__ = ["check_request", "evaluate", "evaluate_arrays", "report_markdown"]


@dataclass(frozen=True)
class _Opened:
    """An evaluation's checked inputs and outputs."""

    plan: dict[str, Path]
    classes: tuple[ClassDef, ...]
    pred: Side
    ref: Side
    region: Window
    wanted: tuple[int, ...]


def check_request(req: EvaluateRequest) -> _Opened:
    """Check and open every input and output of ``req`` (fast: reads no pixels)."""
    plan = plan_outputs({"out_json": req.out_json, "out_markdown": req.out_markdown},
                        inputs=[req.prediction, req.reference], overwrite=req.overwrite)  # fmt: skip
    grid, classes, pred = _prediction(req)
    ref = open_reference(req, grid)
    region = resolve_region(height=grid.height, width=grid.width, georef=grid.georef,
                            bbox=req.bbox, bbox_crs=req.bbox_crs, window=req.window)  # fmt: skip
    return _Opened(plan, classes, pred, ref, region, check_options(req, classes))


def evaluate(req: EvaluateRequest) -> dict[str, Any]:
    """Evaluate ``req.prediction`` against ``req.reference`` over the requested region.

    Returns the report (``pixels``, ``objects``, ``region``, the inputs and the time) and
    writes it to ``out_json`` / ``out_markdown`` when given. Every input and output is
    checked (:func:`check_request`) before anything is read at length.
    """
    import rasterio

    t0 = time.perf_counter()
    # every window is read once: GDAL's block cache (5 % of RAM by default) would only hold
    # memory (it takes this size where this process is the first to use GDAL)
    with (
        rasterio.Env(GDAL_CACHEMAX=64),
        tempfile.TemporaryDirectory(prefix="segflow-evaluate-") as tmp,
    ):
        job = check_request(req)
        layers = [_layer(side, job.region, job.wanted, Path(tmp), name, req.block)
                  for side, name in ((job.pred, "prediction"), (job.ref, "reference"))]  # fmt: skip
        report = evaluate_layers(*layers, region=job.region, classes=job.classes, iou=req.iou,
                                 block=req.block, min_pixels=req.min_pixels)  # fmt: skip
    report.update(prediction=req.prediction, reference=req.reference,
                  object_classes=list(job.wanted), seconds=time.perf_counter() - t0)  # fmt: skip
    write_report(report, json_path=job.plan.get("out_json"),
                 markdown_path=job.plan.get("out_markdown"))  # fmt: skip
    return report


def _prediction(req: EvaluateRequest) -> tuple[Grid, tuple[ClassDef, ...], Side]:
    """The prediction's grid, class table and reader (polygons: on the reference's grid)."""
    if not is_vector(req.prediction):
        return open_prediction(req.prediction)
    if is_vector(req.reference):
        raise ConfigError(
            "both the prediction and the reference are polygons: give one as a raster (the "
            "grid to compare them on), e.g. segment_region's COG"
        )
    grid = raster_grid(open_raster(req.reference, "reference"))
    gdf = read_vector(req.prediction, grid)
    if "class_id" not in gdf.columns:
        raise ConfigError(f"prediction polygons {req.prediction!r} have no class_id attribute")
    cls = np.concatenate(([0], gdf["class_id"].to_numpy(dtype="int64")))
    names = dict(zip(gdf["class_id"], gdf.get("class_name", gdf["class_id"].astype(str)),
                     strict=True))  # fmt: skip
    table = (ClassDef(id=0, name="background"),
             *(ClassDef(id=int(i), name=str(names[i])) for i in sorted(names)))  # fmt: skip
    return grid, table, object_side(rasterizer(gdf, grid), lambda i: cls[i])


def _layer(side: Side, region: Window, wanted: tuple[int, ...], scratch: Path, name: str,
           block: int) -> ObjectLayer:  # fmt: skip
    """``side`` read in region coordinates, its objects labelled if it has no ids."""

    def shifted(read: Any) -> Any:
        return lambda w: read(w.translate(region.row_off, region.col_off))

    if side.ids is None:
        return labelled_layer(shifted(side.classes), region=region, object_classes=wanted,
                              scratch=scratch, name=name, block=block)  # fmt: skip
    assert side.class_of is not None
    return ObjectLayer(classes=shifted(side.classes), ids=shifted(side.ids),
                       class_of=side.class_of)  # fmt: skip
