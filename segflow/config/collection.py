"""The schema of a segment_collection job: the scenes, the model, where each scene's outputs
go, the mosaic, and segment_region's own options for every scene.

:class:`CollectionOptions` holds what the command (:class:`CollectionRequest`) and a
pipeline's ``collection`` section (:class:`CollectionConfig`) share.

>>> CollectionRequest(scenes="tiles/*.tif", model="ckpt/", out_dir="out").scene_dir("a")
'out/a'
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from segflow.config.segment import InstanceOptions, OutputChoices, SegmentOptions

__all__ = ["COLLECTION_FLAGS", "CollectionConfig", "CollectionOptions", "CollectionRequest"]

#: Fields whose flag is not ``--field-name``.
COLLECTION_FLAGS = {"assets": "--asset", "tta_flips": "--tta", "tta_set": "--tta"}


class CollectionOptions(SegmentOptions, InstanceOptions, OutputChoices):
    """The scenes of a collection, how each is segmented, and the mosaic.

    Attributes
    ----------
    scenes
        The scenes: a glob (``tiles/*.tif``, ``s3://bucket/tiles/*.tif``), a text file with
        one image per line or a CSV whose first column (or ``image`` column) names them
        (relative paths: from the list's folder), or a STAC ItemCollection (``.json``, a
        path or URL: one scene per Item, read through ``assets``).
    assets
        With a STAC ItemCollection: the keys of the assets read as each scene's bands, in
        this order; empty: each Item's only raster asset.
    name
        Each scene's folder: a template with ``{stem}`` (the image's file name without its
        suffixes, or the Item's id) and ``{index}`` (its place in the list, from 0).
    level
        Pyramid level of every scene to read (slides, GeoTIFF overviews).
    mosaic
        Write the mosaic of the georeferenced scenes (each pixel from the scene where it
        lies farthest from an inner edge; see :mod:`segflow.io.mosaic`).
    mosaic_crs
        Reproject every scene's prediction into this CRS for the mosaic (``EPSG:3857``;
        nearest neighbour, so class ids stay class ids), on one grid at the finest scene's
        resolution. Null: the scenes' own CRS (scenes in several CRSs are then refused).
    amp
        Mixed precision of the forward pass (as segment_region's ``amp``).
    min_area
        Polygons smaller than this (map units squared) are dropped.
    workers
        Without a scheduler: an embedded Dask cluster of this many worker processes, one
        scene at a time on each. Null: the scenes one after another in this process.
    split_pixels
        On a cluster: a scene of more pixels than this (at ``level``) runs through
        distributed segment_region, its write units spread over every worker, instead of as
        one task (so that one large scene among small ones does not leave workers idle).
    """

    scenes: Annotated[str, Field(min_length=1)]
    assets: tuple[str, ...] = ()
    name: Annotated[str, Field(min_length=1)] = "{stem}"
    level: Annotated[int, Field(ge=0)] = 0
    mosaic: bool = True
    mosaic_crs: str | None = None
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    min_area: Annotated[float, Field(ge=0)] = 0.0
    workers: Annotated[int, Field(ge=1)] | None = None
    split_pixels: Annotated[int, Field(ge=0)] = 8192 * 8192
    # each scene's outputs: the class COG and its GeoPackage unless switched off (--no-polygons)
    parquet: bool = False
    quicklook: bool = False


class CollectionRequest(CollectionOptions):
    """segment_region over every scene of a collection, and a mosaic of them.

    Attributes
    ----------
    model
        Checkpoint directory (as training writes), a path or URL.
    out_dir
        Where the outputs go: a folder per scene (``name``) holding what segment_region
        writes (``prediction.tif`` and the outputs switched on), ``summary.csv`` and
        ``summary.parquet``, and the mosaic (``mosaic.tif``, with ``mosaic.gpkg`` /
        ``mosaic.parquet`` as ``polygons`` / ``parquet`` say).
    device
        ``cpu``, ``cuda`` or ``cuda:1``; null: CUDA when available.
    dask_address
        Dask scheduler to run the scenes on (one task per scene); null:
        ``$SEGFLOW_DASK_ADDRESS``, else ``workers``, else this process.
    overwrite
        Replace existing files in the scene folders that no earlier run of this command
        recorded (default: refuse them).
    """

    model: Annotated[str, Field(min_length=1)]
    out_dir: Annotated[str, Field(min_length=1)]
    device: str | None = None
    dask_address: str | None = None
    overwrite: bool = False

    def scene_dir(self, name: str) -> str:
        """The folder (path or URL) of the scene called ``name``."""
        return f"{self.out_dir.rstrip('/')}/{name}"

    def file(self, name: str) -> str:
        """A file of the collection itself (``summary.csv``, ``mosaic.tif``) in ``out_dir``."""
        return f"{self.out_dir.rstrip('/')}/{name}"


class CollectionConfig(CollectionOptions):
    """A pipeline's ``collection`` section: after training, segment_collection over more
    scenes with the pipeline's model, into ``{work_dir}/collection`` (a folder per scene,
    the summary tables and the mosaic). Device and Dask scheduler are the pipeline
    command's.

    Attributes
    ----------
    model
        Checkpoint directory. Null: the pipeline's own (``segment.model``, else the trained
        ``{work_dir}/train/best``).
    """

    model: str | None = None
