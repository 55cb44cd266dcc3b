"""segment_region's options, declared once.

:class:`SegmentOptions` holds what a pipeline's ``segment`` section and a segment_region
request share (the region and how inference runs); :class:`SegmentRequest` is one whole
job: the image, the model, the outputs and the options. The pipeline YAML schema, the
command line (:mod:`segflow.config.cli`), the Prefect flow's parameters and the
configuration reference all derive from these two declarations: each option's type, default,
bounds and description is written here and nowhere else.

Examples
--------
>>> SegmentRequest(image="scene.tif", model="ckpt/", out="mask.tif").tile
512
>>> SegmentRequest(image="scene.tif", model="ckpt/", out="mask.tif").work_store.name
'mask.predictions.zarr'
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from segflow.config.base import SchemaModel

__all__ = [
    "FLAGS",
    "OUTPUT_NAMES",
    "InstanceOptions",
    "OutputChoices",
    "RegionOptions",
    "SegmentOptions",
    "SegmentRequest",
]

#: Command-line flags that are not ``--option-name``: ``--qupath``, and ``--tta [SET]`` for
#: ``tta_flips`` and ``tta_set`` together.
FLAGS = {
    "assets": "--asset",
    "qupath_geojson": "--qupath",
    "tta_flips": "--tta",
    "tta_set": "--tta",
}


class RegionOptions(SchemaModel):
    """The region of an image a job covers (segment_region, evaluate).

    Attributes
    ----------
    bbox
        Region ``[minx, miny, maxx, maxy]``: map units of ``bbox_crs`` for georeferenced
        images, microns from the top-left corner for slides, pixels (x = column) otherwise;
        every pixel it touches is included. Null (with ``window`` null): the whole image.
    bbox_crs
        CRS of ``bbox`` (``EPSG:4326``, a PROJ string or WKT) for georeferenced images,
        default the image's; ``um`` or ``px`` for slides and plain images.
    window
        Region as a pixel window ``[col, row, width, height]`` (note: not the
        ``train_region.bbox`` order), clipped to the image; exclusive with ``bbox``.
    """

    bbox: Annotated[
        tuple[float, float, float, float] | None,
        Field(json_schema_extra={"metavar": ["MINX", "MINY", "MAXX", "MAXY"]}),
    ] = None
    bbox_crs: str | None = None
    window: Annotated[
        tuple[int, int, int, int] | None,
        Field(json_schema_extra={"metavar": ["COL", "ROW", "WIDTH", "HEIGHT"]}),
    ] = None


class SegmentOptions(RegionOptions):
    """Where and how segment_region infers: the region, the tiling and test-time augmentation.

    Attributes
    ----------
    tile
        Output tile side (pixels): each model input is ``tile + 2 * halo`` (the
        checkpoint's halo) rounded up to the model's size multiple. A multiple of that size
        multiple, and at least ``2 * halo`` for ``crop``; larger is faster, needs more memory.
    mode
        ``crop``: each output pixel from exactly one tile core with real context (equals
        whole-image inference for ``norm`` ``batch``/``none`` models); ``gaussian``:
        overlapping windows blended by a Gaussian importance map (for instance/group norm).
    overlap
        ``gaussian`` only (ignored by ``crop``): overlap fraction of neighbouring windows,
        stride ``int(window * (1 - overlap))``; more overlap smooths seams, costs tiles.
    batch_size
        Tiles per forward pass; raise it to fill a GPU, lower it when memory runs out.
    tta_flips
        Average the softmax over flipped copies of each window: the flips the model was
        trained with (identity, left-right, up-down and both after flips and quarter turns:
        four times the inference work; identity and left-right after flips only); refused
        for a model trained without flips unless ``tta_set`` names the flips.
    tta_set
        The flips ``tta_flips`` averages over, overriding the training record: ``flips``
        (all four), ``horizontal`` (identity and left-right) or ``rot180`` (identity and
        both axes), for flips that keep the labels right although the model was not trained
        with them (ISBI 2012's labels sit below the membranes, so left-right keeps them);
        null: those the model was trained with.
    """

    tile: Annotated[int, Field(gt=0)] = 512
    mode: Literal["crop", "gaussian"] = "crop"
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.5
    batch_size: Annotated[int, Field(ge=1)] = 8
    tta_flips: bool = False
    tta_set: Literal["flips", "horizontal", "rot180"] | None = None

    @model_validator(mode="after")
    def _tta_set_needs_tta(self) -> SegmentOptions:
        if self.tta_set is not None and not self.tta_flips:
            raise ValueError(f"tta_set {self.tta_set!r} needs tta_flips: true (or drop tta_set)")
        return self


class InstanceOptions(SchemaModel):
    """Which objects become instances, and whether touching ones are split.

    Attributes
    ----------
    instance_classes
        The class ids whose objects are instances; null: every class but 0.
    instance_split
        ``none``: an instance is a 4-connected region of one class; ``distance``: each is
        also split at its necks, by a watershed on its own distance transform from its
        h-maxima (touching nuclei or buildings the prediction merged; about a millisecond
        per object).
    split_depth
        ``distance`` split: the least depth (pixels of distance) of a neck that splits;
        larger splits less.
    """

    instance_classes: Annotated[
        tuple[Annotated[int, Field(ge=0)], ...] | None, Field(min_length=1)
    ] = None
    instance_split: Literal["none", "distance"] = "none"
    split_depth: Annotated[float, Field(gt=0)] = 2.0


class SegmentRequest(SegmentOptions, InstanceOptions):
    """One segment_region job: the image, the model, the outputs, and :class:`SegmentOptions`.

    Attributes
    ----------
    image
        GeoTIFF/COG/VRT, SVS/OME-TIFF slide, PNG/TIFF, a STAC Item (``.json``; see
        ``assets``), or a scene store directory (read only: the predictions go to ``work``
        unless ``into_store``). Paths or URLs (``s3://``, ``gs://``, ``https://``).
    assets
        With a STAC Item as ``image``: the keys of the assets read as the image's bands, in
        this order (several band assets are stacked on the finest one's grid); empty: the
        Item's only raster asset.
    model
        Checkpoint directory written by training (e.g. ``outputs/x/train/best``).
    out
        Class-id Cloud-Optimized GeoTIFF to write.
    level
        Pyramid level of ``image`` to read (slides, GeoTIFF overviews); must be the scale
        the model was trained at.
    device
        ``cpu``, ``cuda`` or ``cuda:1``; null: CUDA when available.
    amp
        Mixed precision of the forward pass: ``auto`` is bf16 on CUDA devices that support
        it, else fp16, and off on CPU.
    polygons
        GeoPackage of predicted polygons (every class but 0, with ``class_id``,
        ``class_name`` and ``area``), in the image's CRS.
    parquet
        GeoParquet of the same polygons.
    probabilities
        uint8 class-probability COG (``round(p * 255)``).
    quicklook
        PNG of the mask over the image, at most 1024 pixels a side.
    ome_tiff
        Pyramidal OME-TIFF label image with the slide's pixel size (slide viewers).
    ome_zarr
        OME-Zarr (NGFF 0.4) directory holding the class ids as a multiscale label image
        (``labels/classes``) with the slide's pixel size, named classes and colours, for
        napari, OMERO, vizarr and other NGFF viewers.
    qupath_geojson
        GeoJSON polygons in level-0 slide pixels with QuPath classification names and colours.
    instances
        uint32 COG of object instances (0: none): each 4-connected region of one of
        ``instance_classes`` gets an id, unique over the region and numbered in raster order
        of its first pixel (the same whatever the tile, chunk or worker count); also written
        into the prediction store. With it, the polygon outputs hold one feature per instance
        (``instance_id``, ``class_id``, ``class_name``, ``area``, ``centroid_x``,
        ``centroid_y``; QuPath detections).
    work
        Prediction store; null: ``OUT.predictions.zarr`` beside ``out``.
    min_area
        Polygons smaller than this (map units squared, pixels without a CRS) are dropped.
    into_store
        With a scene store as ``image``: write the predictions into it (default: ``work``).
    overwrite
        Replace existing files at the output paths (default: only this command's own).
    dask_address
        Dask scheduler to run the inference on (``tcp://host:8786``): groups of write units
        become tasks of its workers, which read ``image`` and ``model`` from the same paths.
        Null: ``$SEGFLOW_DASK_ADDRESS``, else ``workers``, else this process.
    workers
        Without a scheduler: run the inference on an embedded Dask cluster of this many
        worker processes (the cores shared among them). Null: in this process, which is
        faster on one machine (``benchmarks/bench_segment_distributed.py``).
    """

    image: str
    assets: tuple[str, ...] = ()
    model: str
    out: str
    level: Annotated[int, Field(ge=0)] = 0
    device: str | None = None
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    polygons: str | None = None
    parquet: str | None = None
    probabilities: str | None = None
    quicklook: str | None = None
    ome_tiff: str | None = None
    ome_zarr: str | None = None
    qupath_geojson: str | None = None
    instances: str | None = None
    work: str | None = None
    min_area: Annotated[float, Field(ge=0)] = 0.0
    into_store: bool = False
    overwrite: bool = False
    dask_address: str | None = None
    workers: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _instance_options_need_instances(self) -> SegmentRequest:
        if not self.instances and (self.instance_classes or self.instance_split != "none"):
            raise ValueError(
                "instance_classes and instance_split need instances: name the instance COG"
            )
        return self

    @property
    def work_store(self) -> Path | str:
        """Where the prediction store lives (``OUT.predictions.zarr`` unless ``work``): a
        path, or a URL beside an ``out`` on object storage."""
        if self.work:
            return self.work.rstrip("/") if "://" in self.work else Path(self.work)
        work = self._beside_out(".predictions.zarr")
        return work if "://" in work else Path(work)

    @property
    def stac_item(self) -> str:
        """The STAC Item written beside ``out``: ``OUT.stac.json`` (without ``.tif``)."""
        return self._beside_out(".stac.json")

    def _beside_out(self, suffix: str) -> str:
        """The path or URL beside ``out`` named after its stem, with ``suffix``."""
        if "://" in self.out:
            parent, _, name = self.out.rpartition("/")
            return f"{parent}/{Path(name).stem}{suffix}"
        return str(Path(self.out).with_name(Path(self.out).stem + suffix))

    def outputs(self) -> dict[str, str | None]:
        """Every file output by option name (``None``: not asked for; ``stac``: the STAC
        Item, always written)."""
        return {
            "out": self.out,
            "probabilities": self.probabilities,
            "polygons": self.polygons,
            "parquet": self.parquet,
            "quicklook": self.quicklook,
            "ome_tiff": self.ome_tiff,
            "ome_zarr": self.ome_zarr,
            "qupath": self.qupath_geojson,
            "instances": self.instances,
            "stac": self.stac_item,
        }


#: segment_region's output names in a folder, by request field (``out``: always written).
OUTPUT_NAMES = {
    "out": "prediction.tif",
    "polygons": "prediction.gpkg",
    "parquet": "prediction.parquet",
    "probabilities": "probabilities.tif",
    "quicklook": "quicklook.png",
    "ome_tiff": "prediction.ome.tif",
    "qupath_geojson": "prediction.qupath.geojson",
    "instances": "instances.tif",
    "ome_zarr": "prediction.ome.zarr",
}


class OutputChoices(SchemaModel):
    """Which of segment_region's outputs a pipeline or collection writes into a folder.

    Attributes
    ----------
    polygons
        Write ``prediction.gpkg``: polygons of every class but 0 with ``class_id``,
        ``class_name`` and ``area``, in the image's CRS (pixels without one).
    parquet
        Write the same polygons as GeoParquet, ``prediction.parquet``.
    probabilities
        Also write ``probabilities.tif``, a per-class probability COG (uint8,
        ``round(p * 255)``).
    quicklook
        Write ``quicklook.png``, the mask over the image, at most 1024 pixels a side.
    ome_tiff
        Write ``prediction.ome.tif``, a pyramidal OME-TIFF label image with the slide's
        pixel size (for slide viewers).
    qupath
        Write ``prediction.qupath.geojson``: polygons in level-0 slide pixels with QuPath
        classification names and colours.
    instances
        Write ``instances.tif``, a uint32 COG of object instances (objects of
        ``instance_classes``, split as ``instance_split`` says; ids the same whatever the
        tiling); the polygon outputs then hold one feature per instance (``instance_id``,
        centroid; QuPath detections).
    ome_zarr
        Write ``prediction.ome.zarr``, an OME-Zarr (NGFF 0.4) multiscale label image.
    """

    polygons: bool = True
    parquet: bool = True
    probabilities: bool = False
    quicklook: bool = True
    ome_tiff: bool = False
    qupath: bool = False
    instances: bool = False
    ome_zarr: bool = False

    def output_paths(self, folder: str | Path) -> dict[str, str | None]:
        """segment_region's output fields: the chosen files in ``folder`` (a path or URL),
        None for the others."""
        on = {"out": True, "qupath_geojson": self.qupath,
              **{k: getattr(self, k) for k in OUTPUT_NAMES if k not in ("out", "qupath_geojson")}}  # fmt: skip
        base = str(folder).rstrip("/")
        join = (lambda n: f"{base}/{n}") if "://" in base else (lambda n: str(Path(base) / n))
        return {k: join(name) if on[k] else None for k, name in OUTPUT_NAMES.items()}
