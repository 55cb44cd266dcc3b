"""Image sources: read a large image window by window, exactly as stored.

:func:`open_source` inspects a file's *content* and returns one of five readers, all with the
same interface (:class:`Source`): ``read(window)`` gives the pixels as ``(band, row, col)``,
``read_valid(window)`` the ``(row, col)`` mask of the data footprint, and ``info`` describes
the image (:class:`SourceInfo`).

Readers (``info.kind`` in brackets):

- :class:`RasterioSource` (``geotiff``): anything GDAL opens with a CRS (GeoTIFF, COG, ...)
  and every VRT. Valid = GDAL's dataset mask (nodata, internal mask or alpha band).
- :class:`OpenSlideSource` (``slide``): whole-slide images OpenSlide detects (Aperio,
  Hamamatsu, MIRAX, generic tiled TIFF, ...), as RGB. Valid = tissue (see below).
- :class:`TiffSlideSource` (``slide``): tiled/pyramidal TIFF and OME-TIFF that OpenSlide
  cannot open or of which it sees only level 0 (SubIFD pyramids), read with tifffile through
  Zarr. Valid = tissue for 8-bit RGB; otherwise everything (alpha aside).
- :class:`StacSource` (``geotiff``): the chosen assets of a STAC Item (``.json``), stacked
  as bands through an in-memory VRT (``open_source(item, assets=[...])``).
- :class:`PlainImageSource` (``image``): PNG/JPEG (decoded once, on the first read, and
  cached: these are small images) and TIFFs with no georeference that are not slides (read
  by window with tifffile). Valid = alpha > 0 if there is an alpha band, else everything.

Dispatch (first match wins): a VRT, or a file GDAL opens with a CRS -> rasterio (so a tiled
GeoTIFF is never taken for a slide); a TIFF -> OpenSlide when it detects an 8-bit RGB slide
and sees all of tifffile's pyramid levels, else tifffile (slide when pyramidal, OME, a known
WSI flavour or tiled 8-bit RGB; otherwise a plain image); another file OpenSlide detects ->
OpenSlide; a file Pillow opens -> plain image; another file GDAL opens -> rasterio (kind
``image``).

**Tissue rule (slides).** At open time ONE threshold is computed per slide: Otsu's threshold
of the HSV saturation, ``S = 255 * (max(R,G,B) - min(R,G,B)) // max(R,G,B)`` (integer, 0 for
black), over a thumbnail of the slide's smallest pyramid level (subsampled to about 1024
pixels a side; an 8 x 8 sample of windows when no level is under 4096 x 4096 pixels;
transparent pixels left out), clipped to ``[TISSUE_MIN_SATURATION, TISSUE_MAX_SATURATION]``.
The threshold is the same whatever level the slide is opened at. A pixel is tissue when
``S > threshold`` and it is not fully transparent (alpha > 0). The rule is per pixel with a
fixed threshold, so the mask does not depend on the window grid. Slides that are not 8-bit
RGB (e.g. fluorescence OME-TIFF) have no threshold: everything is valid (alpha aside).

Levels are pyramid levels (0 = full resolution). A source opened at ``level=k`` reads that
level's pixel grid, and its ``info`` (size, block, georeference, microns per pixel)
describes that grid. Reads are exact source pixels at every level: OpenSlide resamples by a
sub-pixel shift at levels with a non-integer downsample, so such levels of TIFF-based slides
are read with tifffile instead.

**Non-finite pixels.** In every reader, a pixel of a float (or complex) source where any band
is NaN or +/-inf is invalid, whatever the mask above says (:func:`valid_and_finite`, applied
once, in :meth:`Source.read_with_valid` and :meth:`Source.read_valid`).

**Pixel budget.** Right after reading the first bytes, and before any pixel is read or any
array created, :func:`open_source` takes the full-resolution size the file *declares* (the
first TIFF image directory, parsed by hand; a VRT's ``rasterXSize``/``rasterYSize``; a PNG's
``IHDR``; other formats from OpenSlide's or GDAL's header) and refuses a file of more than
``max_pixels`` pixels (:func:`max_pixels`: ``$SEGFLOW_MAX_PIXELS``, else
:data:`DEFAULT_MAX_PIXELS` = 2**36, about 68.7 gigapixels). A few-kilobyte TIFF that claims
10^6 x 10^6 pixels therefore fails in milliseconds instead of growing memory.

Bad input fails at open time with one :class:`SourceError` line: a missing file, a file no
reader recognises, a truncated TIFF (every strip/tile must lie inside the file; VRT members
are checked too), a truncated PNG (chunk CRCs), a missing VRT member, a level the file does
not have, a file over the pixel budget. A window outside the image raises
:class:`RegionError`.

Modules: :mod:`~segflow.io.sources.base` (the interface), one per reader
(``rasterio_source``, ``openslide_source``, ``tiff_source``, ``plain_source``),
:mod:`~segflow.io.sources.dispatch` (which reader, the pixel budget),
:mod:`~segflow.io.sources.files` (truncation and VRT checks),
:mod:`~segflow.io.sources.hashing`, :mod:`~segflow.io.sources.stac` (a STAC Item's
assets as one image); the tissue rule is pure numpy in :mod:`segflow.tissue`.

Sources can be pickled (Dask workers): pickling drops open file handles, and the copy
reopens the file on first use. Each thread gets its own handle where the library is not
thread-safe (GDAL, tifffile); OpenSlide handles are shared.

Examples
--------
>>> from segflow.geometry import Window
>>> src = open_source("data/samples/spacenet_atlanta/sample_geotiff.tif")  # doctest: +SKIP
>>> src.info.kind, src.info.bands, src.info.georef.epsg  # doctest: +SKIP
('geotiff', ('gray',), 32616)
>>> src.read(Window(0, 0, 2, 3)).shape  # doctest: +SKIP
(1, 2, 3)
"""

from segflow.io.sources.base import Source, SourceInfo, SourceKind
from segflow.io.sources.dispatch import (
    DEFAULT_MAX_PIXELS,
    ENV_MAX_PIXELS,
    check_pixel_budget,
    declared_size,
    max_pixels,
    open_source,
)
from segflow.io.sources.files import check_tiff_complete
from segflow.io.sources.hashing import source_sha256
from segflow.io.sources.openslide_source import OpenSlideSource
from segflow.io.sources.plain_source import PlainImageSource
from segflow.io.sources.rasterio_source import RasterioSource
from segflow.io.sources.stac import StacSource, asset_hrefs, is_stac_item
from segflow.io.sources.tiff_source import TiffSlideSource
from segflow.stats import valid_and_finite
from segflow.tissue import TISSUE_MAX_SATURATION, TISSUE_MIN_SATURATION, saturation, tissue_mask

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ENV_MAX_PIXELS",
    "TISSUE_MAX_SATURATION",
    "TISSUE_MIN_SATURATION",
    "OpenSlideSource",
    "PlainImageSource",
    "RasterioSource",
    "Source",
    "SourceInfo",
    "StacSource",
    "SourceKind",
    "TiffSlideSource",
    "asset_hrefs",
    "check_pixel_budget",
    "check_tiff_complete",
    "declared_size",
    "is_stac_item",
    "max_pixels",
    "open_source",
    "saturation",
    "source_sha256",
    "tissue_mask",
    "valid_and_finite",
]
