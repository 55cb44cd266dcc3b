"""segment_region's deliverables, exported from the prediction store window by window.

The class COG first (it also counts the class pixels), then what the request asks for:
instances, probabilities, polygons, OME-TIFF, OME-Zarr, quick-look. Every exporter reads the region's
view of the store a window at a time and writes under a temporary name moved into place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segflow.config import ClassDef
from segflow.config.segment import SegmentRequest
from segflow.geometry import Window
from segflow.infer.store import LABELS, PROBABILITIES
from segflow.instance_split import split_instances
from segflow.instances import INSTANCE_DTYPE, InstanceTable, label_instances, object_classes
from segflow.io.store import GeoRef, SceneStore, SlideInfo

__all__ = [
    "INSTANCES",
    "ClassCounter",
    "ExportJob",
    "RegionView",
    "export_outputs",
    "instance_classes",
    "write_prediction_item",
]

log = logging.getLogger(__name__)

#: The prediction store's instance ids (uint32, 0: no object).
INSTANCES = "prediction/instances"
#: Connected components before an ``instance_split`` (uint32, 0: no object).
COMPONENTS = "prediction/components"


class RegionView:
    """An array-like over ``region`` of a (..., y, x) array: exporters slice it window by
    window, and :func:`~segflow.instances.label_instances` also writes through it."""

    def __init__(self, array: Any, region: Window) -> None:
        self.array = array
        self.region = region
        self.shape = (*array.shape[:-2], region.height, region.width)
        self.dtype = array.dtype
        self.ndim = len(self.shape)

    def _key(self, key: Any) -> tuple[Any, ...]:
        key = key if isinstance(key, tuple) else (key,)
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        *lead, rs, cs = key
        r = slice(*rs.indices(self.region.height))
        c = slice(*cs.indices(self.region.width))
        r = slice(r.start + self.region.row_off, r.stop + self.region.row_off, r.step)
        c = slice(c.start + self.region.col_off, c.stop + self.region.col_off, c.step)
        return (*lead, r, c)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.array[self._key(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        self.array[self._key(key)] = value


class ClassCounter:
    """Pixels per class id, from the windows the COG export streams (no second read)."""

    def __init__(self, classes: Sequence[ClassDef]) -> None:
        from segflow.io.export import count_values  # the export stack loads on first use

        self.classes = tuple(classes)
        self.ids = [c.id for c in self.classes]
        self.counts = dict.fromkeys(self.ids, 0)
        self._count = count_values

    def __call__(self, block: np.ndarray, window: Window) -> None:
        for cid, n in zip(self.ids, self._count(block, self.ids), strict=True):
            self.counts[cid] += n

    def by_name(self) -> dict[str, int]:
        return {c.name: self.counts[c.id] for c in self.classes}


@dataclass(frozen=True)
class ExportJob:
    """What the exports of one segment_region run read and where they put it.

    Attributes
    ----------
    req
        The request (its output paths and options).
    store
        The prediction store; ``view`` is the requested region in its grid.
    view
        The region within the store's grid.
    region
        The region within the image (level-0 offsets of slide outputs).
    georef
        The region's georeference (``None``: slides and plain images).
    slide
        The slide's metadata (pixel size, downsample), if any.
    classes
        The model's class table.
    preview
        The region's image sampled every ``step`` pixels (for the quick-look).
    """

    req: SegmentRequest
    store: SceneStore
    view: Window
    region: Window
    georef: GeoRef | None
    slide: SlideInfo | None
    classes: tuple[ClassDef, ...]
    preview: Callable[[int], np.ndarray]

    def labels(self) -> RegionView:
        return RegionView(self.store.array(LABELS), self.view)


def instance_classes(req: SegmentRequest, classes: Sequence[ClassDef]) -> tuple[int, ...]:
    """The class ids whose objects ``req`` makes instances of (checked against ``classes``)."""
    return object_classes(req.instance_classes, [c.id for c in classes], name="instance_classes")


def export_outputs(job: ExportJob, counter: ClassCounter) -> dict[str, Any]:
    """Write every output ``job.req`` asks for; ``{name: path}``, plus the polygon and
    instance counts under ``polygon_count`` and ``instance_count``."""
    from segflow.io.export import (
        write_cog,
        write_ome_tiff_labels,
        write_ome_zarr_labels,
        write_probability_cog,
    )

    req, labels = job.req, job.labels()
    # the exports run after inference, alone: let GDAL compress on every core
    cog = write_cog(labels, req.out, georef=job.georef, classes=job.classes, nodata=255,
                    threads="ALL_CPUS", observe=counter)  # fmt: skip
    done: dict[str, Any] = {"cog": cog}
    found = _instances(job, labels) if req.instances else None
    if found is not None:
        done["instances"], done["instance_count"] = req.instances, found[1].count
    if req.probabilities:
        probs = RegionView(job.store.array(PROBABILITIES), job.view)
        done["probabilities"] = write_probability_cog(
            probs, req.probabilities, georef=job.georef, classes=job.classes, threads="ALL_CPUS"
        )
    if req.polygons or req.parquet or req.qupath_geojson:
        done.update(_polygons(job, labels, found))
    if req.ome_tiff:
        done["ome_tiff"] = _slide_labels(job, labels, req.ome_tiff, write_ome_tiff_labels)
    if req.ome_zarr:
        done["ome_zarr"] = _slide_labels(job, labels, req.ome_zarr, write_ome_zarr_labels)
    if req.quicklook:
        done["quicklook"] = _quicklook(job, labels)
    if not req.into_store:
        log.info("prediction store kept at %s (delete it to recompute)", job.store.path)
    return done


def _instances(job: ExportJob, labels: RegionView) -> tuple[RegionView, InstanceTable]:
    """Label the region's objects into the store's instance array; write the instance COG."""
    from segflow.io.export.instance_cog import write_instance_cog

    req, store = job.req, job.store
    wanted = instance_classes(req, job.classes)
    array = store.create_array(INSTANCES, dtype=INSTANCE_DTYPE, fill_value=0, overwrite=True)
    view = RegionView(array, job.view)
    if req.instance_split == "none":
        table = label_instances(labels, view, classes=wanted, block=store.write_unit)
    else:  # connected components first, then each split at its necks
        parts = store.create_array(COMPONENTS, dtype=INSTANCE_DTYPE, fill_value=0, overwrite=True)
        components = RegionView(parts, job.view)
        found = label_instances(labels, components, classes=wanted, block=store.write_unit)
        table = split_instances(components, view, classes=found.classes, depth=req.split_depth,
                                block=store.write_unit)  # fmt: skip
    log.info("labelled %d instances of classes %s", table.count, list(wanted))
    assert req.instances is not None
    write_instance_cog(view, req.instances, georef=job.georef, count=table.count,
                       classes=[c for c in job.classes if c.id in wanted],
                       threads="ALL_CPUS")  # fmt: skip
    return view, table


def _polygons(
    job: ExportJob, labels: RegionView, found: tuple[RegionView, InstanceTable] | None
) -> dict[str, Any]:
    from segflow.io.export import vectorize

    req, slide, region = job.req, job.slide, job.region
    res = vectorize(
        labels,
        classes=job.classes,
        georef=job.georef,
        slide=slide,
        nodata=255,
        min_area=req.min_area,
        out_gpkg=req.polygons,
        out_parquet=req.parquet,
        out_geojson_pixels=req.qupath_geojson,
        origin=(float(region.row_off), float(region.col_off)),  # (row, col), like everything
        downsample=slide.downsample if slide else None,
        instances=found[0] if found else None,
        instance_classes=found[1].classes if found else None,
    )
    written = {"polygons": req.polygons, "parquet": req.parquet,
               "qupath_geojson": req.qupath_geojson}  # fmt: skip
    return {"polygon_count": res.n_features, **{k: p for k, p in written.items() if p}}


def _slide_labels(job: ExportJob, labels: RegionView, path: str, writer: Any) -> Any:
    """An OME-TIFF or OME-Zarr label image with the slide's pixel size (if any)."""
    slide = job.slide
    return writer(labels, path, classes=job.classes, nodata=255,
                  mpp_x=slide.mpp_x if slide else None, mpp_y=slide.mpp_y if slide else None)  # fmt: skip


def _quicklook(job: ExportJob, labels: RegionView) -> Any:
    from segflow.io.export import quicklook_png

    assert job.req.quicklook is not None
    region = job.region
    step = max(1, -(-max(region.height, region.width) // 1024))
    return quicklook_png(job.preview(step), labels[::step, ::step], job.req.quicklook,
                         classes=job.classes, nodata=255, max_size=1024)  # fmt: skip


#: STAC asset keys of the outputs, by their key in :func:`export_outputs`'s result.
_ASSETS = {"cog": "mask", "probabilities": "probabilities", "instances": "instances",
           "polygons": "polygons", "parquet": "parquet", "quicklook": "overview"}  # fmt: skip


def write_prediction_item(
    job: ExportJob,
    written: dict[str, Any],
    finals: dict[str, str],
    path: str,
    *,
    class_pixels: dict[str, int],
) -> str:
    """Write the STAC Item of a prediction at the local ``path``.

    ``written`` is :func:`export_outputs`'s result (local files), ``finals`` where each of
    them ends up (``{key: path or URL}``, the Item's own under ``stac``).
    """
    from segflow import __version__
    from segflow.io.export.stac import stac_item, write_stac_item

    req = job.req
    params = req.model_dump(include={"tile", "mode", "overlap", "tta_flips", "tta_set", "level",
                                     "window", "bbox", "bbox_crs", "min_area"})  # fmt: skip
    properties = {
        "segflow:version": __version__,
        "segflow:image": req.image,
        **({"segflow:assets": list(req.assets)} if req.assets else {}),
        "segflow:model": req.model,
        "segflow:parameters": params,
        "segflow:classes": [{"id": c.id, "name": c.name} for c in job.classes],
        "segflow:class_pixels": class_pixels,
    }
    assets = {_ASSETS[k]: finals[k] for k in _ASSETS if k in written and k in finals}
    item = stac_item(written["cog"], item_id=Path(finals["cog"]).stem, href=finals["stac"],
                     assets=assets, properties=properties,
                     derived_from=_source_item(req.image))  # fmt: skip
    write_stac_item(path, item)
    return path


def _source_item(image: str) -> str | None:
    """The image's STAC Item (absolute path or URL), or None when it is not one."""
    from segflow.io.remote import is_url
    from segflow.io.sources.stac import is_stac_item

    if not is_stac_item(image):
        return None
    return image if is_url(image) else str(Path(image).resolve())
