"""A STAC Item for a prediction: its outputs as assets, its grid as ``proj:`` fields.

Written with pystac (STAC 1.1 and the projection extension v2.0): the footprint and bbox in
WGS 84 and the ``proj:code``/``proj:wkt2``, ``proj:shape``, ``proj:transform`` and
``proj:bbox`` are read from the class COG itself, so a catalog (STAC API, stac-browser,
QGIS's STAC source) shows where the mask lies and GDAL-based readers can skip opening it.
The model and the inference parameters are properties under ``segflow:``. The Item has no
acquisition time of its own: ``datetime`` is when the prediction was made (also ``created``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from segflow.atomic import write_text_atomic

__all__ = ["MEDIA_TYPES", "stac_item", "write_stac_item"]

#: Media types of segflow's outputs, by file suffix.
MEDIA_TYPES = {
    ".tif": "image/tiff; application=geotiff; profile=cloud-optimized",
    ".gpkg": "application/geopackage+sqlite3",
    ".parquet": "application/vnd.apache.parquet",
    ".png": "image/png",
    ".geojson": "application/geo+json",
}


def _href(asset: str, item: str) -> str:
    """``asset`` relative to the Item when both lie in one folder (the pair can move
    together, e.g. be uploaded), else as given."""
    a_dir, _, a_name = asset.replace(os.sep, "/").rpartition("/")
    i_dir = item.replace(os.sep, "/").rpartition("/")[0]
    return f"./{a_name}" if a_dir == i_dir else asset


def stac_item(
    cog: str | Path,
    *,
    item_id: str,
    href: str,
    assets: Mapping[str, str],
    properties: Mapping[str, Any],
    derived_from: str | None = None,
    created: dt.datetime | None = None,
) -> Any:
    """The :class:`pystac.Item` of a prediction whose class COG is the local file ``cog``.

    ``href`` is where the Item will be (path or URL); ``assets`` maps asset keys to the
    final path or URL of each output (``mask``: the class COG, with the ``data`` role);
    ``derived_from``: the STAC Item of the image, linked with that relation.
    """
    import pystac
    import rasterio
    from pystac.extensions.projection import ProjectionExtension
    from rasterio.warp import transform_bounds, transform_geom
    from shapely.geometry import box, mapping

    when = created or dt.datetime.now(dt.UTC)
    with rasterio.open(cog) as src:
        crs, bounds, shape, transform = src.crs, src.bounds, src.shape, src.transform
    footprint = mapping(box(*bounds))
    geometry = transform_geom(crs, "EPSG:4326", footprint) if crs else None
    bbox = list(transform_bounds(crs, "EPSG:4326", *bounds)) if crs else None
    item = pystac.Item(id=item_id, geometry=geometry, bbox=bbox, datetime=when,
                       properties={"created": when.isoformat(), **properties})  # fmt: skip
    for key, where in assets.items():
        media = MEDIA_TYPES.get(Path(where).suffix.lower())
        roles = ["data"] if key == "mask" else ["data", key]
        item.add_asset(key, pystac.Asset(href=_href(where, href), media_type=media, roles=roles))
    if derived_from:
        item.add_link(pystac.Link("derived_from", derived_from, media_type="application/json"))
    if crs:
        proj = ProjectionExtension.ext(item, add_if_missing=True)
        epsg = crs.to_epsg()
        proj.apply(
            epsg=epsg,
            wkt2=None if epsg else crs.to_wkt(),
            bbox=list(bounds),
            shape=list(shape),
            transform=list(transform)[:6],
        )
    item.set_self_href(None)
    return item


def write_stac_item(path: str | Path, item: Any) -> Path:
    """Write ``item`` as JSON at the local ``path`` (atomically); returns the path."""
    doc = item.to_dict(include_self_link=False, transform_hrefs=False)
    write_text_atomic(Path(path), json.dumps(doc, indent=1) + "\n")
    return Path(path)
