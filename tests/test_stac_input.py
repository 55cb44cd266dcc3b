"""A STAC Item as the image: assets stacked into bands, the identity that follows the assets,
and ingest and segment_region from an Item whose asset is an object on the S3 server."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from segflow.errors import SourceError
from segflow.io import remote
from segflow.io.sources import asset_hrefs, open_source, source_sha256
from tests._stac import validate_stac

LANDSAT = Path(__file__).resolve().parents[1] / "data" / "samples" / "landsat" / "RGB.byte.tif"
KEYS = ("red", "green", "blue")


def _item(assets: dict[str, str], **properties: Any) -> dict[str, Any]:
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "id": "scene",
        "geometry": None,
        "properties": {"datetime": "2020-01-01T00:00:00Z", **properties},
        "links": [],
        "assets": {
            k: {"href": h, "type": "image/tiff; application=geotiff", "roles": ["data"]}
            for k, h in assets.items()
        },
    }


@pytest.fixture
def band_item(tmp_path: Path) -> Path:
    """The Landsat sample as one single-band GeoTIFF per band, and an Item naming them by
    relative hrefs (plus a thumbnail that is not a raster band)."""
    with rasterio.open(LANDSAT) as src:
        profile, pixels = src.profile, src.read()
    for i, key in enumerate(KEYS):
        with rasterio.open(tmp_path / f"{key}.tif", "w", **dict(profile, count=1)) as dst:
            dst.write(pixels[i], 1)
    doc = _item({k: f"./{k}.tif" for k in KEYS})
    doc["assets"]["thumbnail"] = {"href": "./t.png", "type": "image/png", "roles": ["thumbnail"]}
    (tmp_path / "item.json").write_text(json.dumps(doc))
    return tmp_path / "item.json"


def test_band_assets_stack_into_the_image_in_the_order_given(band_item: Path) -> None:
    with (
        open_source(band_item, assets=["blue", "green", "red"]) as got,
        open_source(LANDSAT) as ref,
    ):
        window = ref.info.full_window
        np.testing.assert_array_equal(got.read(window), ref.read(window)[::-1])
        np.testing.assert_array_equal(got.read_valid(window), ref.read_valid(window))
        assert got.info.bands == ("blue", "green", "red")
        assert (got.info.georef, got.info.nodata, got.info.dtype) == (
            ref.info.georef, ref.info.nodata, ref.info.dtype,
        )  # fmt: skip
        assert got.info.uri == str(band_item)
        copy = pickle.loads(pickle.dumps(got))  # as a Dask worker gets it
        np.testing.assert_array_equal(copy.read(window), ref.read(window)[::-1])
    with open_source(band_item, assets=["green"]) as one:
        np.testing.assert_array_equal(one.read(window)[0], ref.read(window)[1])


def test_a_coarser_asset_is_upsampled_by_nearest_neighbour(tmp_path: Path) -> None:
    """A band at half the resolution covers the same footprint: each of its pixels becomes
    the 2 x 2 block it covers on the finest asset's grid (np.repeat is the reference)."""
    from rasterio.transform import Affine

    rng = np.random.default_rng(5)
    fine = rng.integers(0, 9000, (64, 96), dtype=np.uint16)
    coarse = rng.integers(0, 9000, (32, 48), dtype=np.uint16)
    t = Affine(10.0, 0, 500000.0, 0, -10.0, 4100000.0)
    kw = dict(driver="GTiff", count=1, dtype="uint16", crs="EPSG:32633")
    with rasterio.open(tmp_path / "b10.tif", "w", height=64, width=96, transform=t, **kw) as d:
        d.write(fine, 1)
    with rasterio.open(tmp_path / "b20.tif", "w", height=32, width=48,
                       transform=t @ Affine.scale(2), **kw) as d:  # fmt: skip
        d.write(coarse, 1)
    (tmp_path / "s2.json").write_text(json.dumps(_item({"B20": "b20.tif", "B10": "b10.tif"})))
    with open_source(tmp_path / "s2.json", assets=["B20", "B10"]) as src:
        assert (src.info.height, src.info.width) == (64, 96)
        assert src.info.georef is not None and src.info.georef.geotransform[1] == 10.0
        pixels = src.read(src.info.full_window)
    np.testing.assert_array_equal(pixels[0], np.repeat(np.repeat(coarse, 2, 0), 2, 1))
    np.testing.assert_array_equal(pixels[1], fine)


def test_the_identity_follows_the_selected_assets_not_the_item_json(band_item: Path) -> None:
    before = source_sha256(band_item, assets=["red", "green"])
    assert source_sha256(band_item, assets=["green", "red"]) != before  # band order
    doc = json.loads(band_item.read_text())
    doc["properties"]["eo:cloud_cover"] = 12.5  # metadata that changes no pixel
    band_item.write_text(json.dumps(doc))
    assert source_sha256(band_item, assets=["red", "green"]) == before
    with rasterio.open(band_item.parent / "green.tif", "r+") as d:  # a pixel of one asset
        d.write(np.full((1, 1), 7, np.uint8), 1, window=((5, 6), (5, 6)))
    assert source_sha256(band_item, assets=["red", "green"]) != before
    assert asset_hrefs(band_item, ["red"]) == [str(band_item.parent / "red.tif")]


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("no-asset", "has 3 raster assets"),
        ("unknown", "has no asset 'nir'"),
        ("twice", "name each once"),
        ("missing-file", "missing file"),
        ("collection", "is not a STAC Item"),
        ("not-json", "cannot read the STAC Item"),
        ("other-crs", "different CRSs"),
        ("other-footprint", "different footprints"),
        ("other-nodata", "different nodata"),
    ],
)
def test_items_that_cannot_be_an_image_fail_in_one_line(
    band_item: Path, case: str, match: str
) -> None:
    d = band_item.parent
    assets: list[str] = ["red", "green"]
    item = band_item
    if case == "no-asset":
        assets = []
    elif case == "unknown":
        assets = ["red", "nir"]
    elif case == "twice":
        assets = ["red", "red"]
    elif case == "missing-file":
        (d / "green.tif").unlink()
    elif case == "collection":
        item.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    elif case == "not-json":
        item.write_text("{ truncated")
    else:
        with rasterio.open(d / "green.tif") as src:
            profile, pixels = src.profile, src.read()
        if case == "other-crs":
            profile["crs"] = "EPSG:4326"
        elif case == "other-footprint":
            profile["transform"] = profile["transform"] @ profile["transform"].translation(50, 0)
        else:
            profile["nodata"] = 255
        with rasterio.open(d / "green.tif", "w", **profile) as dst:
            dst.write(pixels)
    with pytest.raises(SourceError, match=match) as err:
        open_source(item, assets=assets)
    assert "\n" not in str(err.value)


def test_assets_need_an_item() -> None:
    with pytest.raises(SourceError, match="need a STAC Item"):
        open_source(LANDSAT, assets=["red"])


def test_ingest_and_segment_from_a_stac_item_on_s3(s3: str, samples: Path, tmp_path: Path) -> None:
    """The bundled chip as an S3 object named by a STAC Item (on S3, with a relative href;
    and on disk, with the object's URL): the scene store and the prediction equal those made
    from the chip itself, and the prediction's Item links the source Item and validates."""
    from segflow.ingest import IngestSpec, ingest
    from segflow.io.store import SceneStore
    from segflow.segment import segment_region
    from tests.test_remote_segment import _check_stac, _request

    chip = samples / "spacenet_atlanta" / "sample_geotiff.tif"
    remote.upload(chip, f"{s3}/scenes/atlanta.tif")
    remote.write_bytes(f"{s3}/items/atlanta.json",
                       json.dumps(_item({"pan": "../scenes/atlanta.tif"})).encode())  # fmt: skip
    local_item = tmp_path / "atlanta.json"
    local_item.write_text(json.dumps(_item({"pan": f"{s3}/scenes/atlanta.tif"})))

    ingest(IngestSpec(source=str(chip), out=str(tmp_path / "ref.zarr"), chunk=256))
    ingest(IngestSpec(source=f"{s3}/items/atlanta.json", assets=("pan",),
                      out=f"{s3}/stores/atlanta.zarr", chunk=256))  # fmt: skip
    ref, got = SceneStore.open(tmp_path / "ref.zarr"), SceneStore.open(f"{s3}/stores/atlanta.zarr")
    for name in ("image", "valid"):
        np.testing.assert_array_equal(got.array(name)[...], ref.array(name)[...])
    assert got.georef == ref.georef
    assert got.meta["source"]["uri"] == f"{s3}/items/atlanta.json"

    model = _model(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    want = segment_region(_request(str(chip), str(model), str(tmp_path / "a")))
    req = _request(str(local_item), str(model), str(tmp_path / "b"))
    assert req.assets == ()  # the Item's only raster asset
    rep = segment_region(req)
    with rasterio.open(tmp_path / "a" / "m.tif") as a, rasterio.open(tmp_path / "b" / "m.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert (a.crs, a.transform) == (b.crs, b.transform)
    assert rep.class_pixels == want.class_pixels
    doc = json.loads((tmp_path / "b" / "m.stac.json").read_text())
    _check_stac(doc, tmp_path / "b" / "m.tif", rep)
    validate_stac(doc)
    assert {"rel": "derived_from", "href": str(local_item)}.items() <= {
        k: v for link in doc["links"] if link["rel"] == "derived_from" for k, v in link.items()
    }.items()


def _model(tmp_path: Path) -> Path:
    import torch

    from segflow.train.checkpoint import build_meta, save_checkpoint
    from segflow.train.models import build_model
    from tests.test_remote_segment import CFG, CLASSES

    torch.manual_seed(3)
    meta = build_meta(CFG, bands=("pan",), mean=[300.0], std=[150.0], tile=256, classes=CLASSES)
    save_checkpoint(tmp_path / "model", build_model(CFG), meta)
    return tmp_path / "model"
