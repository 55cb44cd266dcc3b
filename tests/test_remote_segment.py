"""segment_region on object storage: image, checkpoint, prediction store and every output on a
real S3-compatible server (moto_server on loopback), equal to the local-disk run."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch

from segflow.config import ClassDef
from segflow.errors import ConfigError
from segflow.io import remote
from segflow.io.store import COMPLETE_MARKER, SceneStore
from segflow.segment import SegmentRequest, segment_region
from segflow.train.checkpoint import build_meta, save_checkpoint
from segflow.train.models import ModelConfig, build_model
from tests._s3 import SECRET, S3Server, byte_counter
from tests._stac import validate_stac

CLASSES = (ClassDef(id=0, name="background"), ClassDef(id=1, name="building", color="#ff3030"))
CFG = ModelConfig(arch="unet", in_channels=1, out_channels=2, features=4, depth=2,
                  num_res_units=0, norm="none")  # fmt: skip
#: Every file output segment_region writes for a GeoTIFF, by request field.
OUTPUTS = {"out": "m.tif", "probabilities": "prob.tif", "instances": "i.tif",
           "polygons": "p.gpkg", "parquet": "p.parquet", "quicklook": "q.png"}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained U-Net: its speckled output gives many polygons and instances."""
    torch.manual_seed(3)
    meta = build_meta(CFG, bands=("pan",), mean=[300.0], std=[150.0], tile=256,
                      classes=CLASSES)  # fmt: skip
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(path, build_model(CFG), meta)
    return path


def _request(image: str, model: str, root: str, **extra: object) -> SegmentRequest:
    outputs = {k: f"{root}/{name}" for k, name in OUTPUTS.items()}
    return SegmentRequest(image=image, model=model, tile=256, window=(50, 100, 700, 600),
                          instance_classes=(1,), **outputs, **extra)  # type: ignore[arg-type]  # fmt: skip


def _fetch(url: str, folder: Path) -> Path:
    return remote.download(url, folder / remote.ObjectURL.parse(url).name)


def test_segment_region_on_s3_equals_local(
    s3: str, samples: Path, model_dir: Path, tmp_path: Path
) -> None:
    image = samples / "spacenet_atlanta" / "sample_geotiff.tif"
    image_url = f"{s3}/in/atlanta.tif"
    remote.upload(image, image_url)
    model_url = f"{s3}/models/m"
    for f in model_dir.iterdir():
        remote.upload(f, f"{model_url}/{f.name}")
    (tmp_path / "local").mkdir()
    ref = segment_region(_request(str(image), str(model_dir), str(tmp_path / "local")))
    req = _request(image_url, model_url, f"{s3}/out")
    rep = segment_region(req)

    got = tmp_path / "got"
    got.mkdir()
    for name in OUTPUTS.values():
        _fetch(f"{s3}/out/{name}", got)
    for name in ("m.tif", "prob.tif", "i.tif"):
        with rasterio.open(got / name) as a, rasterio.open(tmp_path / "local" / name) as b:
            np.testing.assert_array_equal(a.read(), b.read())
            assert (a.crs, a.transform, a.nodata) == (b.crs, b.transform, b.nodata)
    # the class COG's category names travel with it (GDAL's .aux.xml sidecar)
    assert (
        remote.read_bytes(f"{s3}/out/m.tif.aux.xml")
        == (tmp_path / "local" / "m.tif.aux.xml").read_bytes()
    )
    for name, read in (("p.gpkg", gpd.read_file), ("p.parquet", gpd.read_parquet)):
        a, b = read(got / name), read(tmp_path / "local" / name)
        assert len(a) == len(b) == rep.polygons > 10 and a.crs == b.crs
        assert a.geometry.geom_equals_exact(b.geometry, 0).all()
        assert (a.drop(columns="geometry") == b.drop(columns="geometry")).all().all()
    assert rep.class_pixels == ref.class_pixels and rep.instances == ref.instances > 10
    assert rep.outputs["cog"] == f"{s3}/out/m.tif"
    # the prediction store on S3 holds the local run's arrays, and is marked complete
    work = req.work_store
    assert work == f"{s3}/out/m.predictions.zarr"
    assert remote.exists(f"{work}/{COMPLETE_MARKER}")
    a_store = SceneStore.open(work)
    b_store = SceneStore.open(tmp_path / "local" / "m.predictions.zarr")
    for name in ("prediction/labels", "valid", "prediction/instances"):
        np.testing.assert_array_equal(a_store.array(name)[...], b_store.array(name)[...])

    assert SECRET not in json.dumps(a_store.meta)  # records name URLs, never credentials
    _check_stac(json.loads(remote.read_bytes(f"{s3}/out/m.stac.json")), got / "m.tif", rep)
    assert (
        json.loads((tmp_path / "local" / "m.stac.json").read_text())["assets"]["mask"]["href"]
        == "./m.tif"
    )

    # the same command again: every unit recorded, its own outputs replaced
    again = segment_region(req)
    assert (
        again.inference["units"] == 0
        and again.inference["skipped_units"] == rep.inference["units"] > 0
    )
    assert again.class_pixels == rep.class_pixels

    # an object of the user's at an output URL is never replaced without --overwrite
    remote.write_bytes(f"{s3}/user/p.gpkg", b"mine")
    with pytest.raises(ConfigError, match="already exists"):
        segment_region(_request(image_url, model_url, f"{s3}/user"))
    assert remote.read_bytes(f"{s3}/user/p.gpkg") == b"mine"
    assert not remote.exists(f"{s3}/user/m.tif")


def _gigapixel_cog(source: Path, out: Path, side: int = 32768) -> Path:
    """A ``side`` x ``side`` COG (1.07 gigapixels for 32768): ``source`` enlarged by nearest
    neighbour through a VRT, so it takes seconds and compresses to about 20 MB."""
    import rasterio.shutil

    with rasterio.open(source) as src:
        scale = src.width / side
        t = src.transform @ src.transform.scale(scale, scale)
        h, w = src.height, src.width
        wkt = src.crs.to_wkt()
    vrt = (
        f'<VRTDataset rasterXSize="{side}" rasterYSize="{side}"><SRS>{wkt}</SRS>'
        f"<GeoTransform>{t.c},{t.a},{t.b},{t.f},{t.d},{t.e}</GeoTransform>"
        '<VRTRasterBand dataType="UInt16" band="1"><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{source}</SourceFilename><SourceBand>1</SourceBand>'
        f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
        f'<DstRect xOff="0" yOff="0" xSize="{side}" ySize="{side}"/>'
        "</SimpleSource></VRTRasterBand></VRTDataset>"
    )
    rasterio.shutil.copy(vrt, out, driver="COG", COMPRESS="DEFLATE", PREDICTOR=2,
                         BLOCKSIZE=512, OVERVIEWS="NONE", NUM_THREADS=2)  # fmt: skip
    return out


def test_window_of_a_gigapixel_cog_on_s3_reads_a_few_megabytes(
    s3: str, s3_server: S3Server, samples: Path, model_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """No whole download: a 512 x 512 window of a 1.07-gigapixel COG costs the server a few
    MB (counted by a TCP proxy in front of it), and equals the same window of the local file."""
    big = _gigapixel_cog(samples / "spacenet_atlanta" / "sample_geotiff.tif", tmp_path / "big.tif")
    url = f"{s3}/big.tif"
    remote.upload(big, url)
    window = (20000, 12000, 512, 512)
    local = segment_region(SegmentRequest(image=str(big), model=str(model_dir), window=window,
                                          out=str(tmp_path / "local.tif"), tile=256))  # fmt: skip
    with byte_counter(s3_server) as counter, monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", counter.endpoint)
        rep = segment_region(SegmentRequest(image=url, model=str(model_dir), window=window,
                                            out=str(tmp_path / "m.tif"), tile=256))  # fmt: skip
    size = remote.head(url).size
    print(f"gigapixel COG {size / 2**20:.1f} MiB; sent for a 512 x 512 window: "
          f"{counter.sent / 2**20:.2f} MiB ({counter.sent / size:.1%})")  # fmt: skip
    assert counter.sent < 4 * 2**20 and counter.sent < size / 5
    assert rep.class_pixels == local.class_pixels
    with rasterio.open(tmp_path / "m.tif") as a, rasterio.open(tmp_path / "local.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert a.transform == b.transform


def _check_stac(doc: dict, cog: Path, rep) -> None:
    """The Item validates; its proj: fields, footprint and assets are the COG's."""
    from rasterio.warp import transform_bounds

    validate_stac(doc)
    props = doc["properties"]
    with rasterio.open(cog) as src:
        assert props["proj:code"] == f"EPSG:{src.crs.to_epsg()}"
        assert props["proj:shape"] == list(src.shape)
        assert props["proj:transform"] == list(src.transform)[:6]
        assert props["proj:bbox"] == list(src.bounds)
        np.testing.assert_allclose(doc["bbox"], transform_bounds(src.crs, "EPSG:4326", *src.bounds))
    assert doc["assets"]["mask"]["href"] == "./m.tif"  # beside the Item: they move together
    assert {"mask", "probabilities", "instances", "polygons", "parquet", "overview"} <= set(
        doc["assets"]
    )
    assert props["segflow:class_pixels"] == rep.class_pixels
    assert props["segflow:parameters"]["tile"] == 256


def test_url_outputs_replace_only_what_the_run_recorded(s3: str) -> None:
    """plan_urls: an object (or a directory tree without its root object) of the user's at
    an output URL is refused; the run's own recorded one is replaced."""
    from segflow.io.staging import plan_urls, url_stamp
    from segflow.outputs import OutputRecord

    remote.write_bytes(f"{s3}/run/labels.zarr/0/0", b"user data, no zarr.json")
    remote.write_bytes(f"{s3}/run/m.tif", b"an earlier run's mask")
    with pytest.raises(ConfigError, match="already exists"):
        plan_urls({"ome_zarr": f"{s3}/run/labels.zarr"}, inputs=[], trees=("ome_zarr",))
    with pytest.raises(ConfigError, match="already exists"):
        plan_urls({"out": f"{s3}/run/m.tif"}, inputs=[])
    mine = OutputRecord({f"{s3}/run/m.tif": url_stamp(f"{s3}/run/m.tif") or ""})
    assert plan_urls({"out": f"{s3}/run/m.tif"}, inputs=[], record=mine) == {
        "out": f"{s3}/run/m.tif"
    }
    with pytest.raises(ConfigError, match="overlaps an input"):
        plan_urls({"out": f"{s3}/run/m.tif"}, inputs=[f"{s3}/run"])
