"""Object storage: sources on a real S3-compatible server (moto_server on loopback) read
window by window, identified without a download, and refused clearly when they are not
there; URLs checked wherever a path is taken."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segflow.errors import ConfigError, SourceError, StoreError
from segflow.geometry import Window
from segflow.io import remote
from segflow.io.remote import ObjectURL, check_location, is_url
from segflow.io.sources import open_source, source_sha256
from segflow.io.store import SceneStore
from tests._s3 import SECRET, S3Server, byte_counter


def _put(s3: str, local: Path, key: str) -> str:
    url = f"{s3}/{key}"
    remote.upload(local, url)
    return url


def test_url_parsing_and_schemes() -> None:
    assert is_url("s3://b/k") and is_url("https://h/x.tif") and is_url("/vsicurl/https://h/x")
    assert not is_url("scene.tif") and not is_url("file:///tmp/x.tif")
    assert ObjectURL.parse("s3://b/a/b/").join("c.tif") == ObjectURL("s3", "b", "a/b/c.tif")
    assert check_location("s3://b/x.zarr", what="store", write=True) == "s3://b/x.zarr"
    with pytest.raises(ConfigError, match="unsupported URL scheme 'ftp'"):
        check_location("ftp://h/x.tif", what="--image")
    with pytest.raises(ConfigError, match="read only"):
        check_location("https://h/x.tif", what="--out", write=True)
    with pytest.raises(ConfigError, match="names no bucket"):
        check_location("s3:///x.tif", what="--image")
    assert remote.gdal_path("s3://b/a.tif") == "/vsis3/b/a.tif"
    assert remote.object_url("/vsis3/b/a.tif") == "s3://b/a.tif"


@pytest.mark.parametrize("url", ["ftp://host/x.zarr", "s3a://bucket/x.zarr", "hdfs://n/x"])
def test_scene_store_refuses_unsupported_urls(tmp_path: Path, url: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="unsupported URL scheme"):
        SceneStore.create(url, bands=("b",), height=4, width=4, dtype="uint8", chunk=2)
    with pytest.raises(ConfigError, match="unsupported URL scheme"):
        SceneStore.open(url)
    with pytest.raises(ConfigError, match="unsupported URL scheme"):
        open_source(url)
    assert list(tmp_path.iterdir()) == []  # no local directory named like the URL


def test_remote_source_equals_local(s3: str, samples: Path) -> None:
    local = samples / "spacenet_atlanta" / "sample_geotiff.tif"
    url = _put(s3, local, "scenes/atlanta.tif")
    with open_source(local) as a, open_source(url) as b:
        assert b.info.uri == url
        assert (b.info.height, b.info.width, b.info.bands, b.info.dtype) == (
            a.info.height,
            a.info.width,
            a.info.bands,
            a.info.dtype,
        )
        assert b.info.georef == a.info.georef
        w = Window(37, 11, 300, 200)
        np.testing.assert_array_equal(b.read(w), a.read(w))
        np.testing.assert_array_equal(b.read_valid(w), a.read_valid(w))


def test_remote_identity_is_a_head_not_a_download(
    s3: str, s3_server: S3Server, samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = samples / "spacenet_atlanta" / "sample_geotiff.tif"
    url = _put(s3, local, "a.tif")
    first = source_sha256(url)
    assert first == source_sha256(url)  # stable
    with byte_counter(s3_server) as counter, monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", counter.endpoint)
        again = source_sha256(url)
    assert again == first
    assert counter.sent < 4096 < local.stat().st_size  # headers only
    remote.write_bytes(url, local.read_bytes()[:-1] + b"\0")  # same size, new content
    assert source_sha256(url) != first


@pytest.mark.parametrize(
    ("make_url", "reason"),
    [
        (lambda s3: f"{s3}/missing.tif", "no such object"),
        (lambda s3: "s3://no-such-bucket-segflow/x.tif", "no such"),
    ],
)
def test_missing_remote_sources_are_one_line(s3: str, make_url, reason: str) -> None:
    url = make_url(s3)
    with pytest.raises(SourceError) as err:
        open_source(url)
    text = str(err.value)
    assert "\n" not in text and url in text and reason in text
    assert SECRET not in text


def test_unreachable_endpoint_is_one_line(s3: str, monkeypatch) -> None:
    from tests._s3 import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(SourceError) as err:
        open_source(f"{s3}/x.tif")
    assert "cannot reach the endpoint" in str(err.value) and "\n" not in str(err.value)


def test_upload_is_whole_and_download_equal(s3: str, tmp_path: Path, rng) -> None:
    data = rng.integers(0, 255, 12 * 2**20, dtype=np.uint8).tobytes()  # multipart size
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    url = f"{s3}/deep/big.bin"
    with remote.staged_upload(url) as tmp:
        assert not remote.exists(url)
        tmp.write_bytes(data)
    assert remote.head(url).size == len(data)
    assert remote.download(url, tmp_path / "back.bin").read_bytes() == data
    with pytest.raises(RuntimeError), remote.staged_upload(f"{s3}/deep/failed.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert not remote.exists(f"{s3}/deep/failed.bin")  # nothing half-written appears
    assert remote.remove_prefix(f"{s3}/deep") == 1
    assert not remote.exists(url)


def _ingest(source: str, out: str):
    from segflow.ingest import IngestSpec, ingest

    return ingest(IngestSpec(source=source, out=out, chunk=128))


def _arrays(store: SceneStore) -> dict[str, np.ndarray]:
    return {n: np.asarray(store.array(n)[...]) for n in ("image", "valid")}


def test_ingest_s3_to_s3_equals_local(s3: str, samples: Path, tmp_path: Path) -> None:
    local = samples / "spacenet_atlanta" / "sample_geotiff.tif"
    url = _put(s3, local, "in/atlanta.tif")
    ref = _ingest(str(local), str(tmp_path / "local.zarr"))
    rep = _ingest(url, f"{s3}/stores/atlanta.zarr")
    assert rep.units_written == ref.units_written and not rep.already_complete
    a = SceneStore.open(tmp_path / "local.zarr")
    b = SceneStore.open(f"{s3}/stores/atlanta.zarr")
    assert b.path == f"{s3}/stores/atlanta.zarr"
    for name, arr in _arrays(a).items():
        np.testing.assert_array_equal(_arrays(b)[name], arr)
        assert b.array(name).dtype == arr.dtype
    assert b.georef == a.georef and b.meta["source"]["uri"] == url
    assert remote.exists(f"{s3}/stores/atlanta.zarr/_segflow/complete.json")
    again = _ingest(url, f"{s3}/stores/atlanta.zarr")  # the same source: nothing to do
    assert again.already_complete and again.units_written == 0


def test_label_files_from_object_storage_equal_local_ones(
    s3: str, samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Vector labels (GeoJSON) and a raster of instance ids on S3: the store equals the one
    ingested from the same files on disk; each object is downloaded once, into the cache, and
    a second ingest of the same objects finds the store complete. A missing label object is
    one clear line."""
    import rasterio

    from segflow.errors import SegflowError
    from segflow.ingest import IngestSpec, ingest

    monkeypatch.setenv("SEGFLOW_CACHE_DIR", str(tmp_path / "cache"))
    chip = samples / "spacenet_atlanta"
    with rasterio.open(chip / "sample_geotiff.tif") as src:
        profile = dict(src.profile, count=1, dtype="uint16", nodata=None)
        ids = np.zeros((src.height, src.width), np.uint16)
    ids[100:180, 200:260], ids[500:520, 40:90] = 7, 300
    with rasterio.open(tmp_path / "ids.tif", "w", **profile) as dst:
        dst.write(ids[None])
    vector = _put(s3, chip / "geotiff_labels.geojson", "labels/buildings.geojson")
    raster = _put(s3, tmp_path / "ids.tif", "labels/ids.tif")
    source = str(chip / "sample_geotiff.tif")

    def run(labels: str, instances: str, out: Path):  # type: ignore[no-untyped-def]
        return ingest(IngestSpec(source=source, out=str(out), labels=labels, instances=instances,
                                 chunk=128))  # fmt: skip

    run(str(chip / "geotiff_labels.geojson"), str(tmp_path / "ids.tif"), tmp_path / "l.zarr")
    run(vector, raster, tmp_path / "r.zarr")
    a, b = SceneStore.open(tmp_path / "l.zarr"), SceneStore.open(tmp_path / "r.zarr")
    for name in ("image", "valid", "labels", "instances"):
        np.testing.assert_array_equal(b.array(name)[...], a.array(name)[...])
    assert int(np.asarray(b.array("labels")[...]).max()) >= 1
    copies = sorted(p.name for p in (tmp_path / "cache" / "inputs").rglob("*") if p.is_file())
    assert copies == ["buildings.geojson", "ids.tif"]
    assert run(vector, raster, tmp_path / "r.zarr").already_complete
    with pytest.raises(SegflowError, match="no such object") as err:
        run(f"{s3}/labels/gone.geojson", raster, tmp_path / "g.zarr")
    assert "\n" not in str(err.value) and not (tmp_path / "g.zarr").exists()


def test_unfinished_remote_store_is_not_opened(s3: str, samples: Path) -> None:
    local = samples / "spacenet_atlanta" / "sample_geotiff.tif"
    out = f"{s3}/s.zarr"
    _ingest(_put(s3, local, "a.tif"), out)
    remote.delete(f"{out}/_segflow/complete.json")
    with pytest.raises(StoreError, match="unfinished"):
        SceneStore.open(out)
