"""Sources on object storage that GDAL does not read as rasters: slides (SVS, OME-TIFF) and
plain TIFFs through tifffile over ranged GETs, equal to the same files read from disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from segflow.geometry import Window
from segflow.io import remote
from segflow.io.sources import PlainImageSource, RasterioSource, TiffSlideSource, open_source
from tests._s3 import S3Server, byte_counter


def _same_source(got: Any, want: Any, windows: list[Window]) -> None:
    a, b = got.info, want.info
    assert (a.height, a.width, a.bands, a.dtype, a.slide, a.level_shapes) == (
        b.height, b.width, b.bands, b.dtype, b.slide, b.level_shapes,
    )  # fmt: skip
    for w in windows:
        np.testing.assert_array_equal(got.read(w), want.read(w))
        np.testing.assert_array_equal(got.read_valid(w), want.read_valid(w))


def test_an_svs_slide_on_s3_reads_and_ingests_as_from_disk(
    s3: str, samples: Path, tmp_path: Path
) -> None:
    from segflow.ingest import IngestSpec, ingest
    from segflow.io.store import SceneStore

    svs = samples / "cmu1_small_region" / "CMU-1-Small-Region.svs"
    url = f"{s3}/slides/cmu1.svs"
    remote.upload(svs, url)
    with open_source(url) as src, TiffSlideSource(svs) as ref:
        assert isinstance(src, TiffSlideSource) and src.info.uri == url
        assert src.info.slide is not None and src.info.slide.mpp_x is not None
        assert src.threshold == ref.threshold  # the same tissue rule
        _same_source(src, ref, [Window(100, 200, 512, 512), Window(2900, 0, 67, 2220)])
        whole = ref.info.full_window
        pixels, valid = ref.read(whole), ref.read_valid(whole)
    ingest(IngestSpec(source=url, out=f"{s3}/stores/cmu1.zarr", chunk=512))
    store = SceneStore.open(f"{s3}/stores/cmu1.zarr")
    np.testing.assert_array_equal(store.array("image")[...], pixels)
    np.testing.assert_array_equal(store.array("valid")[...], valid)
    assert store.slide is not None and store.slide.mpp_x == src.info.slide.mpp_x


@pytest.fixture
def pyramid(samples: Path, tmp_path: Path) -> Path:
    """A 4096 x 4096 RGB pyramidal OME-TIFF (tiles 256, 4 levels as SubIFDs, deflate), made
    of the SVS sample's tissue, with a pixel size."""
    rgb = tifffile.imread(samples / "cmu1_small_region" / "CMU-1-Small-Region.svs")
    big = np.tile(rgb, (2, 2, 1))[:4096, :4096]
    big = np.pad(big, ((0, 4096 - big.shape[0]), (0, 4096 - big.shape[1]), (0, 0)),
                 constant_values=240)  # fmt: skip
    path = tmp_path / "slide.ome.tif"
    opts = dict(tile=(256, 256), compression="zlib", photometric="rgb")
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(big, subifds=3, metadata={"axes": "YXS", "PhysicalSizeX": 0.5,
                  "PhysicalSizeY": 0.5}, **opts)  # fmt: skip
        for k in (2, 4, 8):
            tif.write(big[::k, ::k], subfiletype=1, **opts)
    return path


def test_a_pyramidal_ome_tiff_on_s3_reads_windows_not_the_file(
    s3: str, s3_server: S3Server, pyramid: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{s3}/slides/p.ome.tif"
    remote.upload(pyramid, url)
    size = pyramid.stat().st_size
    with byte_counter(s3_server) as counter, monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", counter.endpoint)
        with open_source(url) as src, TiffSlideSource(pyramid) as ref:
            _same_source(src, ref, [Window(1000, 3000, 512, 512)])
    assert src.info.slide is not None and src.info.slide.mpp_x == pytest.approx(0.5)
    assert len(src.info.level_shapes) == 4
    print(f"OME-TIFF {size / 2**20:.1f} MiB: opened, thumbnail and one 512 x 512 window "
          f"read for {counter.sent / 2**20:.2f} MiB")  # fmt: skip
    assert counter.sent < size / 8
    with open_source(url, level=2) as src, TiffSlideSource(pyramid, level=2) as ref:
        _same_source(src, ref, [Window(0, 0, 1024, 1024)])


def test_a_plain_tiff_on_s3_reads_as_from_disk(s3: str, samples: Path, tmp_path: Path) -> None:
    """No CRS, not a slide: GDAL reads the object (Pillow and tifffile's plain reader need a
    local file); the pixels are the local reader's."""
    from PIL import Image

    plain = tmp_path / "isbi.tif"
    tifffile.imwrite(
        plain, np.asarray(Image.open(samples / "isbi2012" / "train" / "images" / "0.png"))
    )
    url = f"{s3}/plain/isbi.tif"
    remote.upload(plain, url)
    with open_source(url) as src, open_source(plain) as ref:
        assert isinstance(src, RasterioSource) and isinstance(ref, PlainImageSource)
        assert (src.info.kind, src.info.bands) == (ref.info.kind, ref.info.bands)
        w = ref.info.full_window
        np.testing.assert_array_equal(src.read(w), ref.read(w))
        np.testing.assert_array_equal(src.read_valid(w), ref.read_valid(w))
