"""Exporters: COG, polygons, OME-TIFF and quick-look, on the real SpaceNet Atlanta chip."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.errors
import rasterio.features
import scipy.ndimage as ndi
import shapely
import zarr
from shapely.geometry import shape

from segflow.config import ClassDef
from segflow.errors import ConfigError, LabelError
from segflow.io.export import (
    overview_factors,
    quicklook_png,
    vectorize,
    write_cog,
    write_ome_tiff_labels,
    write_probability_cog,
)
from segflow.io.export import vector as vector_mod
from segflow.io.export.ometiff import downsample_mode2
from segflow.io.store import GeoRef, SlideInfo

CLASSES = (
    ClassDef(id=0, name="background", color="#000000"),
    ClassDef(id=1, name="building", color="#ff0000"),
)
NODATA = 255


@pytest.fixture(scope="module")
def chip(samples: Path) -> dict:
    """The 900 x 900 SpaceNet Atlanta chip, its georef and its rasterized building labels."""
    base = samples / "spacenet_atlanta"
    with rasterio.open(base / "sample_geotiff.tif") as src:
        transform, crs, shape_ = src.transform, src.crs, src.shape
        image = src.read()
    features = json.loads((base / "geotiff_labels.geojson").read_text())["features"]
    footprints = [shape(f["geometry"]) for f in features]
    labels = rasterio.features.rasterize(
        [(g, 1) for g in footprints], out_shape=shape_, transform=transform, dtype="uint8"
    )
    georef = GeoRef(crs_wkt=crs.to_wkt(), epsg=crs.to_epsg(), geotransform=transform.to_gdal())
    return {
        "labels": labels,
        "image": image,
        "transform": transform,
        "crs": crs,
        "georef": georef,
        "footprints": footprints,
        "path": base / "sample_geotiff.tif",
    }


def as_zarr(arr: np.ndarray, chunk: int = 128) -> zarr.Array:
    """An in-memory zarr array, chunked over the last two axes (as the scene store is)."""
    chunks = (*arr.shape[:-2], *(min(chunk, s) for s in arr.shape[-2:]))
    z = zarr.create_array(store={}, shape=arr.shape, dtype=arr.dtype, chunks=chunks)
    z[...] = arr
    return z


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------ COG
def test_cog_from_zarr_is_valid_and_georeferenced(chip: dict, tmp_path: Path) -> None:
    from rio_cogeo.cogeo import cog_validate

    labels = chip["labels"].copy()
    labels[:7, :] = NODATA  # a strip outside the prediction
    out = write_cog(
        as_zarr(labels),
        tmp_path / "mask.tif",
        georef=chip["georef"],
        classes=CLASSES,
        nodata=NODATA,
        block=256,
        read_size=300,
    )
    valid, errors, warns = cog_validate(str(out))
    assert valid, (errors, warns)
    assert leftovers(tmp_path) == []
    with rasterio.open(out) as ds:
        assert ds.crs == chip["crs"]
        assert ds.crs.to_epsg() == 32616
        assert ds.transform == chip["transform"]
        assert ds.block_shapes == [(256, 256)]
        assert ds.nodata == NODATA
        assert ds.dtypes == ("uint8",)
        assert np.array_equal(ds.read(1), labels)
        cmap = ds.colormap(1)
        assert cmap[1] == (255, 0, 0, 255)
        assert cmap[0] == (0, 0, 0, 255)
        assert cmap[NODATA][3] == 0
        assert ds.descriptions == ("class",)
        assert ds.tags(1)["CLASS_1"] == "building"
        table = json.loads(ds.tags()["SEGFLOW_CLASSES"])
        assert [c["name"] for c in table] == ["background", "building"]
        assert ds.overviews(1) == overview_factors(900, 900, 256) == [2, 4]
        for factor in ds.overviews(1):
            side = -(-900 // factor)
            ov = ds.read(1, out_shape=(side, side))
            assert set(np.unique(ov).tolist()) <= {0, 1, NODATA}
            assert (ov == 1).any()


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_cog_overviews_are_mode_not_average(tmp_path: Path) -> None:
    """Ids 0 and 8 in a fine pattern: an average would invent ids 2, 4, 6."""
    classes = [ClassDef(id=0, name="a"), ClassDef(id=8, name="b")]
    labels = np.zeros((512, 512), "uint8")
    labels[:, ::2] = 8
    labels[::4, :] = 8  # 3 of 4 pixels of most 2 x 2 cells are 8
    out = write_cog(labels, tmp_path / "m.tif", georef=None, classes=classes, block=64)
    with rasterio.open(out) as ds:
        assert ds.overviews(1) == [2, 4, 8]
        for factor in ds.overviews(1):
            ov = ds.read(1, out_shape=(512 // factor, 512 // factor))
            assert set(np.unique(ov).tolist()) <= {0, 8}
        level1 = ds.read(1, out_shape=(256, 256))
    np.testing.assert_array_equal(level1, downsample_mode2(labels))


def test_cog_observe_sees_every_pixel_once(tmp_path: Path) -> None:
    classes = [ClassDef(id=c, name=f"c{c}") for c in range(3)]
    labels = np.random.default_rng(5).integers(0, 3, size=(300, 200), dtype=np.uint8)
    seen = np.zeros(labels.shape, int)
    counts = np.zeros(256, np.int64)

    def observe(block: np.ndarray, win: Any) -> None:
        seen[win.slices] += 1
        counts[: int(block.max()) + 1] += np.bincount(block.ravel())
        np.testing.assert_array_equal(block, labels[win.slices])

    write_cog(
        labels,
        tmp_path / "o.tif",
        georef=None,
        classes=classes,
        block=64,
        read_size=128,
        observe=observe,
    )
    assert (seen == 1).all()
    np.testing.assert_array_equal(counts[:3], np.bincount(labels.ravel(), minlength=3))


def _mode2_reference(a: np.ndarray, nodata: int | None) -> np.ndarray:
    """Per block, plain Python: the most frequent non-nodata id, ties to the earliest pixel."""
    h, w = a.shape
    out = np.empty(((h + 1) // 2, (w + 1) // 2), a.dtype)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            px = [int(v) for v in a[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].ravel()]
            votes = [v for v in px if v != nodata] or px
            out[i, j] = max(votes, key=lambda v: (votes.count(v), -votes.index(v)))
    return out


@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (1, 5), (6, 1), (64, 66)])
def test_downsample_mode2_equals_per_block_vote(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    a = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=shape, p=[0.3, 0.3, 0.2, 0.2])
    for nodata in (None, 255):
        np.testing.assert_array_equal(
            downsample_mode2(a, nodata=nodata), _mode2_reference(a, nodata)
        )


def test_cog_overview_levels_are_mode_of_the_level_above(tmp_path: Path) -> None:
    """Every overview (built while streaming) is the 2 x 2 mode of the level above, nodata
    never winning over a class; sizes are GDAL's ceil(n / factor)."""
    classes = [ClassDef(id=c, name=f"c{c}") for c in range(3)]
    rng = np.random.default_rng(3)
    labels = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(300, 428))
    labels[:64, :64] = 255  # a nodata corner
    out = write_cog(
        labels, tmp_path / "m.tif", georef=None, classes=classes, block=32, read_size=64
    )
    with rasterio.open(out) as ds:
        assert ds.overviews(1) == [2, 4, 8, 16]
        above = labels
        for factor in ds.overviews(1):
            shape = (-(-300 // factor), -(-428 // factor))
            level = ds.read(1, out_shape=shape)
            above = downsample_mode2(above, nodata=255)
            np.testing.assert_array_equal(level, above)
    assert not list(tmp_path.glob(".*scratch*")), "scratch files left behind"


@pytest.mark.skipif(shutil.which("gdalinfo") is None, reason="gdalinfo (gdal-bin) not installed")
def test_cog_gdalinfo_names_crs(chip: dict, tmp_path: Path) -> None:
    out = write_cog(
        chip["labels"], tmp_path / "mask.tif", georef=chip["georef"], classes=CLASSES, block=256
    )
    info = subprocess.run(["gdalinfo", str(out)], capture_output=True, text=True, check=True).stdout
    assert "UTM zone 16N" in info
    assert "Color Table" in info
    assert "Overviews" in info


def test_cog_rejects_unknown_class_ids_without_output(chip: dict, tmp_path: Path) -> None:
    labels = chip["labels"].copy()
    labels[800:, 800:] = 7
    with pytest.raises(LabelError, match=r"\[7\]"):
        write_cog(
            labels,
            tmp_path / "mask.tif",
            georef=chip["georef"],
            classes=CLASSES,
            block=256,
            read_size=256,
        )
    assert list(tmp_path.iterdir()) == []


def test_cog_validates_arguments(chip: dict, tmp_path: Path) -> None:
    lab = chip["labels"]
    with pytest.raises(ConfigError, match="nodata 0 is also class 'background'"):
        write_cog(lab, tmp_path / "a.tif", georef=None, classes=CLASSES, nodata=0)
    with pytest.raises(ConfigError, match="dtype"):
        write_cog(lab.astype("float32"), tmp_path / "a.tif", georef=None, classes=CLASSES)
    with pytest.raises(ConfigError, match="averaging"):
        bad: Any = "average"
        write_cog(lab, tmp_path / "a.tif", georef=None, classes=CLASSES, overview_resampling=bad)
    with pytest.raises(ConfigError, match="multiple of 16"):
        write_cog(lab, tmp_path / "a.tif", georef=None, classes=CLASSES, block=100)
    with pytest.raises(ConfigError, match="2-D"):
        write_cog(lab[None], tmp_path / "a.tif", georef=None, classes=CLASSES)
    with pytest.raises(ConfigError, match=r"DEFLATE level must be in 1\.\.12, got 0"):
        write_cog(lab, tmp_path / "a.tif", georef=None, classes=CLASSES, level=0)
    assert not (tmp_path / "a.tif").exists()


def test_cog_compression_level_changes_size_not_pixels(chip: dict, tmp_path: Path) -> None:
    import rasterio

    lab = chip["labels"]
    paths = {
        level: write_cog(lab, tmp_path / f"l{level}.tif", georef=None, classes=CLASSES, level=level)
        for level in (1, 9)
    }
    for path in paths.values():
        with rasterio.open(path) as ds:
            np.testing.assert_array_equal(ds.read(1), lab)
    assert paths[9].stat().st_size < paths[1].stat().st_size


def test_cog_failure_leaves_no_file(
    chip: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rasterio.shutil

    out = tmp_path / "mask.tif"
    out.write_bytes(b"previous")

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(rasterio.shutil, "copy", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_cog(chip["labels"], out, georef=chip["georef"], classes=CLASSES, block=256)
    assert out.read_bytes() == b"previous"  # the old file is untouched
    assert leftovers(tmp_path) == []
    out.unlink()
    with pytest.raises(RuntimeError):
        write_cog(chip["labels"], out, georef=chip["georef"], classes=CLASSES, block=256)
    assert list(tmp_path.iterdir()) == []


def test_probability_cog(chip: dict, tmp_path: Path) -> None:
    from rio_cogeo.cogeo import cog_validate

    p1 = ndi.uniform_filter(chip["labels"].astype("float32") * 255, 9).round().astype("uint8")
    probs = np.stack([255 - p1, p1])
    out = write_probability_cog(
        as_zarr(probs), tmp_path / "p.tif", georef=chip["georef"], classes=CLASSES, block=256
    )
    assert cog_validate(str(out))[0]
    with rasterio.open(out) as ds:
        assert ds.count == 2
        assert ds.descriptions == ("background", "building")
        assert ds.crs.to_epsg() == 32616
        assert np.array_equal(ds.read(), probs)
        assert ds.overviews(2) == [2, 4]
    with pytest.raises(ConfigError, match="3 class bands"):
        write_probability_cog(
            np.zeros((3, 10, 10), "uint8"), tmp_path / "q.tif", georef=None, classes=CLASSES
        )


# ----------------------------------------------------------- COG category names (QGIS)
# ids 0, 1, 3 (2 is no class), names XML must escape, nodata 255 is no category
NAMED = (
    ClassDef(id=0, name="background", color="#000000"),
    ClassDef(id=1, name="Gewässer & <Ufer>", color="#0000ff"),
    ClassDef(id=3, name="building", color="#ff0000"),
)
NAMES_BY_VALUE = ["background", "Gewässer & <Ufer>", "", "building"]


def named_labels(chip: dict) -> np.ndarray:
    labels = chip["labels"] * np.uint8(3)  # buildings are class 3
    labels[:100, :300] = 1
    labels[-50:, -50:] = NODATA
    return labels


def sidecar_categories(path: Path) -> list[str]:
    band = ET.parse(path.with_name(path.name + ".aux.xml")).getroot().find("PAMRasterBand")
    assert band is not None and band.get("band") == "1"
    return [c.text or "" for c in band.iterfind("CategoryNames/Category")]


def test_cog_sidecar_names_the_categories(chip: dict, tmp_path: Path) -> None:
    out = tmp_path / "mask.tif"
    sidecar = tmp_path / "mask.tif.aux.xml"
    sidecar.write_text("<PAMDataset><Metadata><MDI key='STALE'>1</MDI></Metadata></PAMDataset>")
    write_cog(named_labels(chip), out, georef=chip["georef"], classes=NAMED, block=256)
    assert sidecar_categories(out) == NAMES_BY_VALUE  # the old sidecar was replaced
    assert "STALE" not in sidecar.read_text()
    assert leftovers(tmp_path) == []
    with rasterio.open(out) as ds:  # the COG itself still carries the names as tags
        assert ds.tags(1)["CLASS_1"] == "Gewässer & <Ufer>"
    if shutil.which("gdalinfo") is None:  # the system GDAL, as QGIS reads the file
        return
    info = subprocess.run(["gdalinfo", str(out)], capture_output=True, encoding="utf-8",
                          check=True, env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"}).stdout  # fmt: skip
    categories = info.split("Categories:")[1].split("Metadata:")[0]
    listed = [line.strip().split(":", 1) for line in categories.strip().splitlines()]
    assert [(v.strip(), n.strip()) for v, n in listed] == [
        (str(v), n) for v, n in enumerate(NAMES_BY_VALUE)
    ]


def test_probability_cog_removes_a_stale_sidecar(chip: dict, tmp_path: Path) -> None:
    out = tmp_path / "p.tif"
    write_cog(chip["labels"], out, georef=chip["georef"], classes=CLASSES, block=256)
    assert sidecar_categories(out) == ["background", "building"]
    probs = np.stack([255 - chip["labels"] * 255, chip["labels"] * 255])
    write_probability_cog(probs, out, georef=chip["georef"], classes=CLASSES, block=256)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tif"]  # no categories: no sidecar


def test_cog_sidecar_goes_when_the_cog_is_not_published(
    chip: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    out = tmp_path / "mask.tif"
    out.write_bytes(b"previous")
    replace = os.replace
    published: list[str] = []

    def replace_but_not_the_cog(src: Any, dst: Any) -> None:
        if str(dst).endswith(".tif"):
            raise OSError(28, "No space left on device")
        published.append(Path(dst).name)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_but_not_the_cog)
    with pytest.raises(OSError, match="No space left"):
        write_cog(chip["labels"], out, georef=chip["georef"], classes=CLASSES, block=256)
    assert published == ["mask.tif.aux.xml"]  # it came first, and went again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.tif"]
    assert out.read_bytes() == b"previous"


def test_qgis_legend_shows_the_class_names(chip: dict, tmp_path: Path) -> None:
    """QGIS 3.22 (Debian) labels the paletted renderer's classes with the category names."""
    from _qgis import run_qgis

    out = write_cog(named_labels(chip), tmp_path / "mask.tif", georef=chip["georef"],
                    classes=NAMED, block=256)  # fmt: skip
    got = run_qgis(
        """
        from qgis.core import QgsRasterLayer
        layer = QgsRasterLayer(ARGS["path"], "mask")
        renderer = layer.renderer()
        RESULT = {
            "valid": layer.isValid(),
            "renderer": type(renderer).__name__,
            "labels": {str(int(c.value)): c.label for c in getattr(renderer, "classes", list)()},
            "colors": {str(int(c.value)): c.color.name() for c in getattr(renderer, "classes", list)()},
        }
        """,
        tmp_path / "qgis-home",
        path=str(out),
    )
    assert got["valid"] and got["renderer"] == "QgsPalettedRasterRenderer"
    assert {int(v): got["labels"][str(v)] for v in (0, 1, 3)} == {c.id: c.name for c in NAMED}
    assert {int(v): got["colors"][str(v)] for v in (0, 1, 3)} == {c.id: c.color for c in NAMED}
    assert got["labels"]["2"] == "2"  # not a class: QGIS shows the value


def test_qgis_opens_the_geopackage(chip: dict, tmp_path: Path) -> None:
    from _qgis import run_qgis

    out = tmp_path / "p.gpkg"
    res = vectorize(as_zarr(chip["labels"]), georef=chip["georef"], classes=CLASSES,
                    nodata=NODATA, window=256, out_gpkg=out)  # fmt: skip
    got = run_qgis(
        """
        from qgis.core import QgsVectorLayer
        layer = QgsVectorLayer(ARGS["path"] + "|layername=predictions", "p", "ogr")
        RESULT = {
            "valid": layer.isValid(),
            "count": layer.featureCount(),
            "authid": layer.crs().authid(),
            "fields": [f.name() for f in layer.fields()],
            "names": sorted({f["class_name"] for f in layer.getFeatures()}),
        }
        """,
        tmp_path / "qgis-home",
        path=str(out),
    )
    assert got["valid"], got
    assert got["count"] == res.n_features > 0
    assert got["authid"] == "EPSG:32616"
    assert {"class_id", "class_name", "area"} <= set(got["fields"])
    assert got["names"] == ["building"]


# ------------------------------------------------------------------------- polygons
def whole_raster_polygons(labels: np.ndarray, transform: object) -> list:
    """Reference: whole-raster ``shapes`` (4-connected: one polygon per connected component)."""
    return [
        shape(g)
        for g, v in rasterio.features.shapes(
            labels, mask=labels == 1, connectivity=4, transform=transform
        )
    ]


def test_geopackage_opens_without_a_version_warning_in_gdal_3_6(chip: dict, tmp_path: Path) -> None:
    """GeoPackage 1.3: the system's ogrinfo (GDAL 3.6, as QGIS 3.22) warns on every open of a
    1.4 file, which newer GDAL writes by default."""
    import sqlite3

    out = tmp_path / "p.gpkg"
    vectorize(as_zarr(chip["labels"]), georef=chip["georef"], classes=CLASSES, nodata=NODATA,
              window=256, out_gpkg=out)  # fmt: skip
    with sqlite3.connect(out) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (10300,)
    info = subprocess.run(["ogrinfo", "-so", str(out), "predictions"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert "partially supported" not in info.stderr + info.stdout
    assert "Feature Count" in info.stdout and "segflow=" in info.stdout  # layer metadata kept


def test_windowed_polygons_equal_whole_raster(chip: dict, tmp_path: Path) -> None:
    import geopandas as gpd

    labels = chip["labels"]
    res = vectorize(
        as_zarr(labels),
        georef=chip["georef"],
        classes=CLASSES,
        nodata=NODATA,
        window=256,
        out_gpkg=tmp_path / "b.gpkg",
        out_parquet=tmp_path / "b.parquet",
    )
    assert leftovers(tmp_path) == []
    whole = whole_raster_polygons(labels, chip["transform"])
    gpkg = gpd.read_file(tmp_path / "b.gpkg", layer="predictions")
    parquet = gpd.read_parquet(tmp_path / "b.parquet")
    for df in (gpkg, parquet):
        assert df.crs.to_epsg() == 32616
        assert list(df.columns) == ["class_id", "class_name", "area", "geometry"]
        assert set(df["class_id"]) == {1}
        assert set(df["class_name"]) == {"building"}
        assert (df.geom_type == "Polygon").all()
        assert len(df) == len(whole) == res.n_features
    got = list(gpkg.geometry)
    # identical polygons: each windowed polygon equals exactly one whole-raster polygon
    for g in got:
        assert sum(g.equals(w) for w in whole) == 1
    sym = shapely.union_all(got).symmetric_difference(shapely.union_all(whole)).area
    assert sym == pytest.approx(0.0, abs=1e-6)

    # areas are exact: pixel counts * 0.25 m^2, in total and per connected component
    pixel_area = abs(chip["transform"].a * chip["transform"].e)
    assert pixel_area == 0.25
    assert res.area_unit == "m^2"
    assert res.total_area == (labels == 1).sum() * 0.25
    assert gpkg["area"].sum() == (labels == 1).sum() * 0.25
    comp, n = ndi.label(labels == 1)  # 4-connectivity
    sizes = np.bincount(comp.ravel())[1:] * 0.25
    assert n == len(got)
    assert sorted(gpkg["area"]) == sorted(sizes.tolist())
    assert np.allclose(gpkg["area"], gpkg.area)
    assert np.array_equal(np.sort(parquet["area"].to_numpy()), np.sort(gpkg["area"].to_numpy()))

    # polygons crossing window borders (x or y a multiple of 256 px) are ONE polygon each
    inv = ~chip["transform"]
    crossing = []
    for w in whole:
        minx, miny, maxx, maxy = w.bounds
        c0, r1 = inv @ (minx, miny)
        c1, r0 = inv @ (maxx, maxy)
        if any(c0 < k < c1 or r0 < k < r1 for k in (256, 512, 768)):
            crossing.append(w)
    assert len(crossing) >= 3
    for w in crossing:
        assert sum(g.equals(w) for g in got) == 1
    assert res.max_pending_pieces > 0

    # and they cover the original building footprints
    ours, truth = shapely.union_all(got), shapely.union_all(chip["footprints"])
    assert ours.intersection(truth).area / ours.union(truth).area > 0.95


@pytest.mark.parametrize("seed", range(12))
def test_windowed_polygons_property(seed: int) -> None:
    """Noise and blobs of 3 classes, odd windows: the same polygons as whole-raster shapes."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(20, 90, 2))
    labels = rng.integers(0, 4, (h, w)).astype("uint8")
    if seed % 2:
        labels = ndi.median_filter(labels, 3)
    labels[labels == 3] = NODATA
    window = int(rng.integers(2, 20))
    classes = [ClassDef(id=i, name=f"c{i}") for i in range(3)]
    got: list[tuple[object, int]] = []

    class Spy(vector_mod._Emitter):
        def add(self, geom: object, class_id: int) -> None:
            got.append((geom, class_id))
            super().add(geom, class_id)

        def add_many(self, geoms: np.ndarray, class_ids: np.ndarray) -> None:
            got.extend(zip(geoms.tolist(), class_ids.tolist(), strict=True))
            super().add_many(geoms, class_ids)

    orig = vector_mod._Emitter
    vector_mod._Emitter = Spy  # type: ignore[misc]
    try:
        res = vectorize(labels, classes=classes, window=window, skip_classes=[0])
    finally:
        vector_mod._Emitter = orig  # type: ignore[misc]
    mask = (labels == 1) | (labels == 2)
    whole = [(shape(g), int(v)) for g, v in rasterio.features.shapes(labels, mask=mask)]
    assert len(got) == len(whole) == res.n_features
    for g, c in got:
        assert sum(c == c2 and g.equals(g2) for g2, c2 in whole) == 1  # type: ignore[attr-defined]
    assert res.total_area == mask.sum()
    assert res.count_by_class.get(1, 0) == sum(c == 1 for _, c in whole)


def test_qupath_geojson_in_level0_pixels(chip: dict, tmp_path: Path) -> None:
    labels = chip["labels"]
    slide = SlideInfo(mpp_x=0.5, mpp_y=0.5, objective_power=20.0, downsample=2.0)
    res = vectorize(
        labels,
        classes=CLASSES,
        slide=slide,
        window=200,
        origin=(1000, 3000),
        out_geojson_pixels=tmp_path / "a.geojson",
        out_gpkg=tmp_path / "a.gpkg",
    )
    assert res.area_unit == "um^2"
    assert res.total_area == pytest.approx((labels == 1).sum() * 4 * 0.25)
    fc = json.loads((tmp_path / "a.geojson").read_text())
    assert fc["type"] == "FeatureCollection"
    assert len(fc["features"]) == res.n_features
    feat = fc["features"][0]
    assert feat["type"] == "Feature"
    assert feat["geometry"]["type"] == "Polygon"
    assert feat["properties"] == {
        "objectType": "annotation",
        "classification": {"name": "building", "color": [255, 0, 0]},
    }
    # level-0 pixels: labels pixel (col, row) -> (3000 + 2 col, 1000 + 2 row)
    geoms = [shape(f["geometry"]) for f in fc["features"]]
    xs = np.concatenate([shapely.get_coordinates(g)[:, 0] for g in geoms])
    ys = np.concatenate([shapely.get_coordinates(g)[:, 1] for g in geoms])
    rows, cols = np.nonzero(labels == 1)
    assert xs.min() == 3000 + 2 * cols.min() and xs.max() == 3000 + 2 * (cols.max() + 1)
    assert ys.min() == 1000 + 2 * rows.min() and ys.max() == 1000 + 2 * (rows.max() + 1)
    assert sum(g.area for g in geoms) == (labels == 1).sum() * 4


def test_vectorize_geographic_area_in_m2(tmp_path: Path) -> None:
    from pyproj import Geod

    labels = np.zeros((10, 10), "uint8")
    labels[2:6, 3:7] = 1
    georef = GeoRef(
        crs_wkt="EPSG:4326", epsg=4326, geotransform=(-84.0, 0.001, 0.0, 33.7, 0.0, -0.001)
    )
    res = vectorize(
        labels, georef=georef, classes=CLASSES, window=4, out_parquet=tmp_path / "g.parquet"
    )
    assert res.area_unit == "m^2"
    geod = Geod(ellps="WGS84")
    lons, lats = [-83.997, -83.993, -83.993, -83.997], [33.698, 33.698, 33.694, 33.694]
    expected = abs(geod.polygon_area_perimeter(lons, lats)[0])
    assert res.total_area == pytest.approx(expected, rel=1e-9)
    import geopandas as gpd

    df = gpd.read_parquet(tmp_path / "g.parquet")
    assert df.crs.to_epsg() == 4326


def test_vectorize_skips_nodata_and_small_polygons(tmp_path: Path) -> None:
    labels = np.zeros((40, 40), "uint8")
    labels[5:15, 5:15] = 1  # 100 px
    labels[20:22, 20:22] = 1  # 4 px
    labels[30:, :] = NODATA
    res = vectorize(labels, classes=CLASSES, window=16, min_area=5, out_gpkg=tmp_path / "s.gpkg")
    assert res.n_features == 1
    assert res.total_area == 100
    res0 = vectorize(labels, classes=CLASSES, window=16, skip_classes=())
    assert res0.count_by_class == {0: 1, 1: 2}
    assert res0.total_area == 30 * 40


def test_vectorize_checks_ids_of_signed_labels() -> None:
    labels = np.zeros((8, 8), "int16")
    labels[2:4, 2:4] = -1
    with pytest.raises(LabelError, match=r"\[-1\]"):
        vectorize(labels, classes=CLASSES, window=4)
    labels[2:4, 2:4] = 1
    assert vectorize(labels, classes=CLASSES, window=4).total_area == 4


def test_vectorize_failure_leaves_no_files(
    chip: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = vector_mod._close_row

    def flaky(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("worker lost")
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(vector_mod, "_close_row", flaky)
    with pytest.raises(RuntimeError, match="worker lost"):
        vectorize(
            chip["labels"],
            georef=chip["georef"],
            classes=CLASSES,
            window=128,
            batch_size=2,
            out_gpkg=tmp_path / "a.gpkg",
            out_parquet=tmp_path / "a.parquet",
            out_geojson_pixels=tmp_path / "a.geojson",
        )
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- OME-TIFF
def test_ome_tiff_round_trip(tmp_path: Path) -> None:
    import tifffile

    rng = np.random.default_rng(7)
    labels = ndi.median_filter(rng.integers(0, 3, (1001, 777)).astype("uint8"), 5)
    out = write_ome_tiff_labels(
        as_zarr(labels, 100),
        tmp_path / "l.ome.tif",
        mpp_x=0.2527,
        mpp_y=0.2531,
        classes=[ClassDef(id=i, name=f"c{i}") for i in range(3)],
        tile=128,
        window=256,
    )
    assert leftovers(tmp_path) == []
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome
        series = tif.series[0]
        shapes = [lvl.shape for lvl in series.levels]
        assert shapes == [(1001, 777), (501, 389), (251, 195), (126, 98)]
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        assert page.is_tiled and page.tilewidth == 128
        assert np.array_equal(series.levels[0].asarray(), labels)
        expected = labels
        for lvl in series.levels[1:]:
            expected = downsample_mode2(expected)
            got = lvl.asarray()
            assert np.array_equal(got, expected)
            assert set(np.unique(got).tolist()) <= {0, 1, 2}
        root = ET.fromstring(tif.ome_metadata or "")
        ns = {"o": root.tag.split("}")[0][1:]}
        pixels = root.find(".//o:Pixels", ns)
        assert pixels is not None
        assert float(pixels.attrib["PhysicalSizeX"]) == pytest.approx(0.2527)
        assert float(pixels.attrib["PhysicalSizeY"]) == pytest.approx(0.2531)
        assert pixels.attrib["PhysicalSizeXUnit"] == "µm"
        desc = root.find(".//o:Description", ns)
        assert (
            desc is not None
            and json.loads(desc.text or "")["segflow"]["classes"][2]["name"] == "c2"
        )


def test_ome_tiff_levels_and_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tifffile

    from segflow.io.export import ometiff

    labels = np.zeros((300, 200), "uint8")
    labels[50:100, 20:180] = 1
    out = write_ome_tiff_labels(
        labels, tmp_path / "a.ome.tif", mpp_x=None, mpp_y=None, classes=CLASSES, tile=64, levels=2
    )
    with tifffile.TiffFile(out) as tif:
        assert [lvl.shape for lvl in tif.series[0].levels] == [(300, 200), (150, 100)]

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(ometiff, "downsample_mode2", boom)
    with pytest.raises(RuntimeError):
        write_ome_tiff_labels(
            labels, tmp_path / "b.ome.tif", mpp_x=0.5, mpp_y=0.5, classes=CLASSES, tile=64
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ome.tif"]


def test_downsample_mode2() -> None:
    block = np.array([[1, 2, 5], [2, 2, 5], [7, 7, 9]])
    assert downsample_mode2(block).tolist() == [[2, 5], [7, 9]]
    assert downsample_mode2(block, "nearest").tolist() == [[1, 5], [7, 9]]
    tie = np.array([[3, 4], [4, 3]])
    assert downsample_mode2(tie).tolist() == [[3]]


# ------------------------------------------------------------------------ quick-look
def test_quicklook_png(chip: dict, tmp_path: Path) -> None:
    from PIL import Image

    labels = chip["labels"]
    out = quicklook_png(
        as_zarr(chip["image"]), labels, tmp_path / "q.png", classes=CLASSES, max_size=256, alpha=1.0
    )
    img = np.asarray(Image.open(out))
    assert img.shape == (225, 225, 3)  # 900 / ceil(900 / 256) = 225
    assert (np.all(img == (255, 0, 0), axis=-1)).sum() == (labels[::4, ::4] == 1).sum()
    assert img.std() > 10  # the stretched image is visible around the buildings

    with rasterio.open(chip["path"]) as ds:
        out2 = quicklook_png(ds, as_zarr(labels), tmp_path / "r.png", classes=CLASSES, max_size=450)
    img2 = np.asarray(Image.open(out2))
    assert img2.shape == (450, 450, 3)
    sel = labels[::2, ::2] == 1
    assert (img2[sel][:, 0] >= 127).all()  # building colour blended at alpha 0.5
    assert leftovers(tmp_path) == []


def test_quicklook_rejects_mismatched_grids(chip: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="same pixel grid"):
        quicklook_png(chip["image"][:, :100], chip["labels"], tmp_path / "q.png", classes=CLASSES)
