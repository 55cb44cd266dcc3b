"""Exporters: from a chunked prediction array to GIS and slide deliverables.

Every exporter reads its input window by window (a ``zarr.Array`` from the scene store, or any
array-like with ``.shape``, ``.dtype`` and numpy slicing), so memory is bounded by the window
size, never by the mask; and writes under a temporary name beside the output, moved into place
only when complete.

- :func:`write_cog` / :func:`write_probability_cog`: Cloud-Optimized GeoTIFFs.
- :func:`write_instance_cog`: the instance ids as a uint32 COG.
- :func:`vectorize`: polygons (per class or per instance) to GeoPackage, GeoParquet and
  QuPath GeoJSON.
- :func:`write_ome_tiff_labels`: a pyramidal OME-TIFF label image for slide viewers.
- :func:`write_ome_zarr_labels`: an OME-Zarr (NGFF 0.4) multiscale label image.
- :func:`quicklook_png`: a small PNG of the image with the classes overlaid.
"""

from __future__ import annotations

from segflow.io.export._common import atomic_output, count_values
from segflow.io.export.cog import overview_factors, write_cog, write_probability_cog
from segflow.io.export.instance_cog import write_instance_cog
from segflow.io.export.ometiff import write_ome_tiff_labels
from segflow.io.export.omezarr import write_ome_zarr_labels
from segflow.io.export.quicklook import quicklook_png
from segflow.io.export.vector import VectorizeResult, vectorize

__all__ = [
    "VectorizeResult",
    "atomic_output",
    "count_values",
    "overview_factors",
    "quicklook_png",
    "vectorize",
    "write_cog",
    "write_instance_cog",
    "write_ome_tiff_labels",
    "write_ome_zarr_labels",
    "write_probability_cog",
]
