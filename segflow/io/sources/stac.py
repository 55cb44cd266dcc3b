"""A STAC Item as an image: one asset, or several band assets stacked into one raster.

A STAC Item (a JSON file or URL) names its rasters as assets (``B04``, ``visual``, ...).
:class:`StacSource` reads the chosen assets as the bands of one image, in the order given,
through a GDAL VRT held in memory (never written anywhere): every band of every asset, on
the grid of the finest asset (coarser assets are upsampled by nearest neighbour, GDAL's VRT
default, as odc-stac and stackstac do by default). The assets must share the CRS and the
footprint (a Sentinel-2 or Landsat Item's bands do); their hrefs, relative ones resolved
against the Item's own location, are local files or URLs read window by window like any
other source.

The image's identity (:func:`~segflow.io.sources.hashing.source_sha256`) is that of the selected assets' contents (their
ETag, size and time on object storage, their bytes locally) and of the grid, not of the
Item's JSON: editing an Item's unrelated metadata does not redo a stage.

Why a VRT and not a Dask/xarray stack (stackstac, odc-stac): the VRT keeps one GDAL dataset,
so the windowed reads, the dataset mask and the overviews behave as for any GeoTIFF, and
those libraries would add a dependency for what is here a few lines of XML.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np

from segflow.errors import SourceError
from segflow.io import remote
from segflow.io.sources.base import _one_line
from segflow.io.sources.rasterio_source import RasterioSource, _rio_open

__all__ = ["StacSource", "asset_hrefs", "is_stac_item", "stac_members", "vrt_xml"]

#: GDAL data type names of the numpy dtypes a VRT band can hold.
_GDAL_TYPES = {
    "uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16",
    "uint32": "UInt32", "int32": "Int32", "uint64": "UInt64", "int64": "Int64",
    "float32": "Float32", "float64": "Float64",
}  # fmt: skip


def is_stac_item(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names a STAC Item (a ``.json`` file or object).

    Examples
    --------
    >>> is_stac_item("s3://bucket/items/LC08.json"), is_stac_item("scene.tif")
    (True, False)
    """
    return str(location).lower().endswith(".json")


@dataclass(frozen=True)
class Member:
    """One selected asset: its key, its absolute href and its grid as GDAL reports it."""

    key: str
    href: str
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    crs_wkt: str
    transform: tuple[float, ...]
    block: tuple[int, int]


def _item_dict(location: str) -> dict[str, Any]:
    """The Item's JSON (a local file, or an object read whole: Items are small)."""
    try:
        raw = (
            remote.read_bytes(remote.object_url(location))
            if remote.is_url(location)
            else Path(location).read_bytes()
        )
        data = json.loads(raw)
    except remote.RemoteError:
        raise
    except (OSError, ValueError) as err:
        raise SourceError(
            f"cannot read the STAC Item {location!r} ({_one_line(err)}): pass the path or URL "
            "of an Item's JSON"
        ) from None
    if not isinstance(data, dict) or data.get("type") != "Feature" or "stac_version" not in data:
        kind = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise SourceError(
            f"{location!r} is not a STAC Item (its type is {kind!r}): pass one Item's JSON, "
            "not a Collection, an ItemCollection or other JSON"
        )
    return data


def _hrefs(location: str, assets: Sequence[str]) -> list[tuple[str, str]]:
    """``(key, absolute href)`` of each selected asset, in the order given."""
    import pystac

    try:
        item = pystac.Item.from_dict(_item_dict(location), preserve_dict=False)
    except SourceError:
        raise
    except Exception as err:
        raise SourceError(
            f"{location!r} is not a valid STAC Item ({_one_line(err)}): fix the Item's JSON"
        ) from None
    item.set_self_href(location if remote.is_url(location) else os.path.abspath(location))
    rasters = [k for k, a in item.assets.items() if _is_raster(a)]
    if not assets:
        if len(rasters) != 1:
            raise SourceError(
                f"the STAC Item {location!r} has {len(rasters)} raster assets {rasters}: "
                "choose the band assets with --asset KEY [KEY ...] (assets: in YAML)"
            )
        assets = rasters
    missing = [k for k in assets if k not in item.assets]
    if missing:
        raise SourceError(
            f"the STAC Item {location!r} has no asset {missing[0]!r}: choose among "
            f"{sorted(item.assets)}"
        )
    if len(set(assets)) != len(assets):
        raise SourceError(f"assets {list(assets)} name one asset twice: name each once")
    return [(k, str(item.assets[k].get_absolute_href())) for k in assets]


def asset_hrefs(location: str | os.PathLike[str], assets: Sequence[str] = ()) -> list[str]:
    """The absolute hrefs of the selected assets of the Item at ``location`` (no pixel or
    header is read: what a run's outputs must not overwrite).

    Raises
    ------
    SourceError
        Not an Item, or an asset it does not have.
    """
    return [href for _, href in _hrefs(str(location), assets)]


def _is_raster(asset: Any) -> bool:
    media = (asset.media_type or "").lower()
    roles = set(asset.roles or ())
    if "thumbnail" in roles or "overview" in roles:
        return False
    return (
        media.startswith("image/tiff")
        or media.startswith("application/x-vrt")
        or (not media and asset.href.lower().endswith((".tif", ".tiff", ".vrt")))
    )


def _member(key: str, href: str) -> Member:
    """The grid of one asset (a header read; a missing object fails in one line)."""
    if remote.is_url(href):
        remote.check_location(href, what=f"asset {key}")
        remote.configure_gdal()
        remote.head(remote.object_url(href))
    elif not Path(href).is_file():
        raise SourceError(
            f"asset {key!r} refers to a missing file {href!r}: restore it or fix the Item"
        )
    try:
        with _rio_open(href) as ds:
            dtypes = set(ds.dtypes)
            return Member(
                key=key,
                href=href,
                width=int(ds.width),
                height=int(ds.height),
                count=int(ds.count),
                dtype=str(np.result_type(*sorted(dtypes))),
                nodata=None if ds.nodata is None else float(ds.nodata),
                crs_wkt=ds.crs.to_wkt() if ds.crs is not None else "",
                transform=tuple(float(v) for v in ds.transform.to_gdal()),
                block=(int(ds.block_shapes[0][0]), int(ds.block_shapes[0][1])),
            )
    except Exception as err:
        raise SourceError(
            f"GDAL cannot read asset {key!r} at {href!r} ({_one_line(err)}): check it is a "
            "complete raster GDAL can open"
        ) from None


def stac_members(location: str, assets: Sequence[str] = ()) -> tuple[Member, ...]:
    """The selected assets of the Item at ``location``, checked to stack into one image.

    Raises
    ------
    SourceError
        Not an Item, an unknown asset, a missing or unreadable asset, or assets that do not
        share the CRS, the footprint, the nodata value or a common data type.
    """
    members = tuple(_member(k, h) for k, h in _hrefs(str(location), assets))
    first = members[0]
    for m in members[1:]:
        _check_stackable(first, m)
    return members


def _bounds(m: Member) -> tuple[float, float, float, float]:
    x0, dx, _, y0, _, dy = m.transform
    return x0, y0, x0 + dx * m.width, y0 + dy * m.height


def _check_stackable(a: Member, b: Member) -> None:
    from rasterio.crs import CRS

    if (a.crs_wkt or b.crs_wkt) and not (
        a.crs_wkt and b.crs_wkt and CRS.from_wkt(a.crs_wkt) == CRS.from_wkt(b.crs_wkt)
    ):
        raise SourceError(
            f"assets {a.key!r} and {b.key!r} are in different CRSs: stack assets of one grid, "
            "or reproject one first (gdalwarp)"
        )
    tol = min(abs(a.transform[1]), abs(b.transform[1])) / 2
    if any(abs(p - q) > tol for p, q in zip(_bounds(a), _bounds(b), strict=True)):
        raise SourceError(
            f"assets {a.key!r} and {b.key!r} cover different footprints ({_bounds(a)} vs "
            f"{_bounds(b)}): stack assets that cover the same area"
        )
    if a.nodata != b.nodata and not (
        a.nodata is not None
        and b.nodata is not None
        and math.isnan(a.nodata)
        and math.isnan(b.nodata)
    ):
        raise SourceError(
            f"assets {a.key!r} and {b.key!r} have different nodata values ({a.nodata} vs "
            f"{b.nodata}): stack assets that mark missing pixels alike"
        )


def vrt_xml(members: Sequence[Member]) -> str:
    """The VRT stacking every band of ``members`` on the finest member's grid."""
    grid = min(members, key=lambda m: abs(m.transform[1]))
    dtype = str(np.result_type(*(np.dtype(m.dtype) for m in members)))
    if dtype not in _GDAL_TYPES:
        raise SourceError(
            f"assets of data type {dtype} cannot be stacked: pass integer or float rasters"
        )
    nodata = "" if grid.nodata is None else f"<NoDataValue>{grid.nodata!r}</NoDataValue>"
    srs = f"<SRS>{escape(grid.crs_wkt)}</SRS>" if grid.crs_wkt else ""
    gt = ", ".join(repr(v) for v in grid.transform)
    bands: list[str] = []
    for m in members:
        name = remote.gdal_path(m.href) if remote.is_url(m.href) else m.href
        for b in range(1, m.count + 1):
            desc = m.key if m.count == 1 else f"{m.key}_{b}"
            src_nodata = "" if m.nodata is None else f"<NODATA>{m.nodata!r}</NODATA>"
            bands.append(
                f'<VRTRasterBand dataType="{_GDAL_TYPES[dtype]}" band="{len(bands) + 1}" '
                f'blockXSize="{grid.block[1]}" blockYSize="{grid.block[0]}">'
                f"<Description>{escape(desc)}</Description>{nodata}"
                f'<ComplexSource><SourceFilename relativeToVRT="0">{escape(name)}</SourceFilename>'
                f"<SourceBand>{b}</SourceBand>"
                f'<SrcRect xOff="0" yOff="0" xSize="{m.width}" ySize="{m.height}"/>'
                f'<DstRect xOff="0" yOff="0" xSize="{grid.width}" ySize="{grid.height}"/>'
                f"{src_nodata}</ComplexSource></VRTRasterBand>"
            )
    return (
        f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">{srs}'
        f"<GeoTransform>{gt}</GeoTransform>{''.join(bands)}</VRTDataset>"
    )


class StacSource(RasterioSource):
    """The selected assets of a STAC Item as one image (see the module notes).

    ``path`` and ``info.uri`` are the Item's location; GDAL reads the in-memory VRT.
    """

    def __init__(self, location: str | Path, level: int = 0, assets: Sequence[str] = ()) -> None:
        members = stac_members(str(location), assets)
        self.assets = tuple(m.key for m in members)
        self._dataset = vrt_xml(members)
        super().__init__(location, level)

    def _dataset_name(self) -> str:
        return self._dataset
