"""evaluate's options, declared once (the command line, the flow and the pipeline derive them).

Examples
--------
>>> EvaluateRequest(prediction="mask.tif", reference="labels.geojson").iou
0.5
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from segflow.config.segment import RegionOptions

__all__ = ["EvaluateOptions", "EvaluateRequest"]


class EvaluateOptions(RegionOptions):
    """How a prediction is compared with reference labels (a pipeline's ``evaluate`` section).

    Attributes
    ----------
    reference
        Reference labels: a class-id raster on the prediction's grid (or one covering it, in
        the same CRS and pixel size), an instance raster (``reference_kind: instances``), or
        polygons (GeoJSON, GeoPackage, GeoParquet: every feature one object).
    reference_kind
        How a reference raster is read: ``classes`` (class ids; objects are their 4-connected
        regions of one class) or ``instances`` (object ids, 0 none; their class is
        ``reference_class``); ``auto``: ``instances`` for uint16/uint32 rasters without a
        class table, else ``classes``. Polygons are always objects.
    reference_class
        Class of reference objects that carry none (instance rasters, polygons without
        ``class_column``).
    class_column
        Attribute of reference polygons holding their class id.
    object_classes
        Class ids whose objects are matched; null: every class but 0.
    min_pixels
        Predicted objects smaller than this many pixels are not counted (speckle); the pixel
        metrics count every pixel.
    iou
        IoU at which objects match for tp/fp/fn, precision, recall and F1 (SpaceNet: 0.5);
        average precision always averages 0.5 .. 0.95.
    block
        Side of the windows read at a time (memory: a few windows).
    """

    reference: str
    reference_kind: Literal["auto", "classes", "instances"] = "auto"
    reference_class: Annotated[int, Field(ge=0, le=254)] = 1
    class_column: str = "class_id"
    object_classes: Annotated[
        tuple[Annotated[int, Field(ge=0)], ...] | None, Field(min_length=1)
    ] = None
    min_pixels: Annotated[int, Field(ge=0)] = 0
    iou: Annotated[float, Field(ge=0.5, lt=1)] = 0.5
    block: Annotated[int, Field(ge=64)] = 2048


class EvaluateRequest(EvaluateOptions):
    """One evaluation: a prediction, the reference, the report paths and the options.

    Attributes
    ----------
    prediction
        segment_region's class COG, its prediction store (``OUT.predictions.zarr``), or
        polygons with a ``class_id`` (rasterized on the reference's grid).
    out_json
        JSON report to write; null: none.
    out_markdown
        Markdown report to write; null: none.
    overwrite
        Replace existing report files.
    """

    prediction: str
    out_json: str | None = None
    out_markdown: str | None = None
    overwrite: bool = False
