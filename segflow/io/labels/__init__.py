"""Labels for ingest: vector and raster labels read window by window on an image's pixel grid.

A *label reader* turns one source of labels into arrays on the level-0 pixel grid of an
image (a :class:`PixelGrid`), one :class:`~segflow.geometry.Window` at a time:

- :func:`prepare_vector_labels`: polygons, lines or points (GeoJSON, GeoPackage, Shapefile,
  GeoParquet) rasterized to class ids *and* instance ids (one id per feature);
- :func:`prepare_raster_labels`: a raster of class values, optionally remapped, read
  directly when it shares the image's grid, else reprojected (nearest) onto it;
- :func:`prepare_instance_raster`: a raster of object ids (0 = none), same grid rules.

``prepare_*`` validate everything that can be checked up front and fail with one
:class:`~segflow.errors.LabelError` line; what can only be seen in the pixels (a raster value
outside the class table) raises the same error from ``read``. Readers are small frozen
dataclasses and pickle cheaply: vector features are normalized once into a GeoParquet file
and loaded (with a spatial index) lazily, once per process; rasters are opened per read, so a
reader can be shared by threads (GDAL handles are not thread-safe).

Conventions: pixel-centre rule (``all_touched=False``), later features win where features
overlap, ``ignore_index`` marks unlabelled pixels (grid pixels outside a label raster, and a
label raster's nodata value unless the class map names it). On a plain pixel grid (no
georeference) vector coordinates are pixel coordinates: x = column, y = row.

Examples
--------
>>> import tempfile, geopandas as gpd, shapely
>>> from pathlib import Path
>>> from segflow.config import ClassDef
>>> from segflow.geometry import Window
>>> tmp = Path(tempfile.mkdtemp())
>>> gpd.GeoDataFrame(geometry=[shapely.box(1, 1, 3, 2)]).to_file(tmp / "a.geojson")
>>> classes = [ClassDef(id=0, name="background"), ClassDef(id=1, name="object")]
>>> reader = prepare_vector_labels(tmp / "a.geojson", PixelGrid(3, 4, None),
...                                classes=classes, workdir=tmp)
>>> block = reader.read(Window(0, 0, 3, 4))
>>> block.labels
array([[0, 0, 0, 0],
       [0, 1, 1, 0],
       [0, 0, 0, 0]], dtype=uint8)
"""

from segflow.io.labels.base import LabelBlock, LabelReader, PixelGrid, label_dtype
from segflow.io.labels.raster import (
    InstanceRaster,
    RasterLabels,
    prepare_instance_raster,
    prepare_raster_labels,
)
from segflow.io.labels.vector import FEATURES_FILE, VectorLabels, prepare_vector_labels

__all__ = [
    "FEATURES_FILE",
    "InstanceRaster",
    "LabelBlock",
    "LabelReader",
    "PixelGrid",
    "RasterLabels",
    "VectorLabels",
    "label_dtype",
    "prepare_instance_raster",
    "prepare_raster_labels",
    "prepare_vector_labels",
]
