"""Where :func:`~segflow.io.export.vectorize` writes its polygons, a batch at a time.

Every sink takes batches of output-coordinate polygons and their attribute columns (named by
:data:`CLASS_COLUMNS`, plus :data:`INSTANCE_COLUMNS` for instance outputs), so GeoPackage,
GeoParquet and QuPath GeoJSON always carry the same attributes.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import shapely

from segflow.io.export._common import ClassTable

__all__ = [
    "CLASS_COLUMNS",
    "GPKG_VERSION",
    "INSTANCE_COLUMNS",
    "LAYER",
    "GpkgSink",
    "ParquetSink",
    "QuPathSink",
]

#: Layer name of the GeoPackage output.
LAYER = "predictions"
#: GeoPackage version written: the newest that GDAL 3.6 (QGIS 3.22) opens without a warning.
GPKG_VERSION = "1.3"
#: Attributes of every polygon: (name, Arrow type).
CLASS_COLUMNS = (("class_id", "int32"), ("class_name", "string"), ("area", "float64"))
#: Attributes added when the polygons are instances: the id in the instance raster, and the
#: centroid in output coordinates.
INSTANCE_COLUMNS = (("instance_id", "int64"), ("centroid_x", "float64"), ("centroid_y", "float64"))

Columns = Mapping[str, Any]


def _schema(columns: Sequence[tuple[str, str]]) -> Any:
    import pyarrow as pa

    return pa.schema([(name, pa.type_for_alias(kind)) for name, kind in columns])


class GpkgSink:
    """One GeoPackage layer, appended a batch at a time."""

    def __init__(
        self,
        path: Path,
        crs_wkt: str | None,
        meta: Mapping[str, str],
        columns: Sequence[tuple[str, str]],
    ) -> None:
        self.path = path
        self.crs_wkt = crs_wkt
        self.meta = dict(meta)
        self.columns = tuple(columns)
        self.started = False

    def write(self, geoms: np.ndarray, columns: Columns) -> None:
        import geopandas as gpd
        import pyogrio

        data = {name: np.asarray(columns[name]).astype(kind if kind != "string" else object)
                for name, kind in self.columns}  # fmt: skip
        gdf = gpd.GeoDataFrame(data, geometry=gpd.GeoSeries(geoms, crs=self.crs_wkt))
        with warnings.catch_warnings():
            # pixel-coordinate outputs (slides) have no CRS on purpose
            warnings.filterwarnings("ignore", message="'crs' was not provided")
            pyogrio.write_dataframe(
                gdf,
                self.path,
                layer=LAYER,
                driver="GPKG",
                append=self.started,
                geometry_type="Polygon",
                promote_to_multi=False,
                layer_metadata=None if self.started else self.meta,
                # GeoPackage 1.3, not GDAL >= 3.7's default 1.4: GDAL 3.6 (QGIS 3.22, Debian
                # 12) warns on every open of a 1.4 file that it "may only be partially supported"
                dataset_options=None if self.started else {"VERSION": GPKG_VERSION},
            )
        self.started = True

    def close(self) -> None:
        if not self.started:  # an empty layer, with its columns
            empty = {name: np.array([], "float64") for name, _ in self.columns}
            empty["class_name"] = np.array([], object)
            self.write(np.array([], dtype=object), empty)


class ParquetSink:
    """One GeoParquet 1.1 file (WKB geometries, ``geo`` metadata), a row group per batch."""

    def __init__(
        self, path: Path, crs: Any, meta: Mapping[str, str], columns: Sequence[tuple[str, str]]
    ) -> None:
        import pyarrow.parquet as pq

        self.columns = tuple(columns)
        self.schema = _schema((*self.columns, ("geometry", "binary")))
        self.crs = crs
        self.meta = dict(meta)
        self.bbox = [np.inf, np.inf, -np.inf, -np.inf]
        self.writer = pq.ParquetWriter(str(path), self.schema, compression="zstd")

    def write(self, geoms: np.ndarray, columns: Columns) -> None:
        import pyarrow as pa

        if len(geoms):
            b = shapely.bounds(geoms)
            self.bbox = [
                min(self.bbox[0], float(b[:, 0].min())),
                min(self.bbox[1], float(b[:, 1].min())),
                max(self.bbox[2], float(b[:, 2].max())),
                max(self.bbox[3], float(b[:, 3].max())),
            ]
        data = {name: pa.array(list(columns[name]) if kind == "string" else
                               np.asarray(columns[name]), pa.type_for_alias(kind))
                for name, kind in self.columns}  # fmt: skip
        data["geometry"] = pa.array(shapely.to_wkb(geoms) if len(geoms) else [], pa.binary())
        self.writer.write_table(pa.table(data, schema=self.schema))

    def close(self) -> None:
        col: dict[str, Any] = {
            "encoding": "WKB",
            "geometry_types": ["Polygon"],
            # an explicit null CRS means "unknown" (pixel coordinates); a missing key would
            # mean OGC:CRS84 to GeoParquet readers
            "crs": self.crs.to_json_dict() if self.crs is not None else None,
        }
        if np.isfinite(self.bbox).all():
            col["bbox"] = self.bbox
        geo = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": col}}
        self.writer.add_key_value_metadata({"geo": json.dumps(geo), **self.meta})
        self.writer.close()


class QuPathSink:
    """A GeoJSON FeatureCollection of QuPath objects in level-0 pixel coordinates.

    Class polygons are ``annotation`` objects; instances are ``detection`` objects (QuPath's
    kind for many small cells or nuclei) named by their instance id.
    """

    def __init__(
        self, path: Path, table: ClassTable, origin: tuple[float, float], downsample: float
    ) -> None:
        self.fh: TextIO = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.fh.write('{"type": "FeatureCollection", "features": [\n')
        self.first = True
        self.table = table
        self.origin = origin
        self.downsample = downsample

    def write_pixels(self, pixel_geoms: np.ndarray, columns: Columns) -> None:
        if not len(pixel_geoms):
            return
        geoms = to_level0(pixel_geoms, self.origin, self.downsample)
        instances = columns.get("instance_id")
        for k, g in enumerate(shapely.to_geojson(geoms)):
            c = self.table.by_id[int(columns["class_id"][k])]
            props: dict[str, Any] = {
                "objectType": "annotation" if instances is None else "detection",
                "classification": {"name": c.name, "color": list(c.rgb)},
            }
            if instances is not None:
                props["name"] = str(int(instances[k]))
            feat = f'{{"type": "Feature", "geometry": {g}, "properties": {json.dumps(props)}}}'
            self.fh.write(feat if self.first else ",\n" + feat)
            self.first = False

    def close(self) -> None:
        self.fh.write("\n]}\n")
        self.fh.close()

    def abort(self) -> None:
        self.fh.close()


def to_level0(geoms: np.ndarray, origin: tuple[float, float], downsample: float) -> np.ndarray:
    """Pixel-space polygons of a level/region scaled and shifted to level-0 slide pixels."""
    d = float(downsample)
    row0, col0 = origin

    def fn(xy: np.ndarray) -> np.ndarray:
        return np.column_stack((xy[:, 0] * d + col0, xy[:, 1] * d + row0))

    return shapely.transform(geoms, fn)
