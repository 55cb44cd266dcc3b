"""Image sources (segflow.io.sources) against independent readers, on real files.

References: rasterio ``read()``/``dataset_mask()`` for GeoTIFF/VRT, imageio for PNG,
OpenSlide ``read_region`` for the SVS, and the arrays we wrote for tifffile-made pyramids.
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import openslide
import pytest
import rasterio
import tifffile
from affine import Affine
from rasterio.windows import Window as RWindow

from segflow.errors import RegionError, SourceError
from segflow.geometry import Window
from segflow.io.sources import (
    TISSUE_MAX_SATURATION,
    TISSUE_MIN_SATURATION,
    OpenSlideSource,
    PlainImageSource,
    RasterioSource,
    Source,
    TiffSlideSource,
    open_source,
    saturation,
    source_sha256,
    tissue_mask,
)

SVS = "cmu1_small_region/CMU-1-Small-Region.svs"
SHARED_SVS = "wsi_cmu1_small_region/CMU-1-Small-Region.svs"


# ----------------------------------------------------------------------------- helpers
def _edges(n: int, step: int, first: int) -> list[int]:
    cuts = {0, n}
    cuts.update(range(first, n, step))
    return sorted(c for c in cuts if 0 <= c <= n)


def grid(h: int, w: int, step: int, first: int | None = None) -> Iterator[Window]:
    """Windows covering (h, w) exactly once; ``first`` offsets the grid off the block grid."""
    rows = _edges(h, step, first or step)
    cols = _edges(w, step, first or step)
    for r0, r1 in itertools.pairwise(rows):
        for c0, c1 in itertools.pairwise(cols):
            yield Window.from_bounds(r0, c0, r1, c1)


def reassemble(src: Source, step: int, first: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    i = src.info
    img = np.zeros((len(i.bands), i.height, i.width), dtype=i.dtype)
    valid = np.zeros((i.height, i.width), dtype=bool)
    count = np.zeros((i.height, i.width), dtype=np.uint8)
    for w in grid(i.height, i.width, step, first):
        px = src.read(w)
        assert px.shape == (len(i.bands), *w.shape) and px.dtype == np.dtype(i.dtype)
        v = src.read_valid(w)
        assert v.shape == w.shape and v.dtype == bool
        img[(slice(None), *w.slices)] = px
        valid[w.slices] = v
        count[w.slices] += 1
    assert (count == 1).all()  # every pixel read exactly once
    return img, valid


def check_both_grids(src: Source, ref: np.ndarray, ref_valid: np.ndarray) -> None:
    """200-pixel windows, then a grid starting at 117 (crosses every native block grid)."""
    for first in (None, 117):
        img, valid = reassemble(src, 200, first)
        np.testing.assert_array_equal(img, ref)
        np.testing.assert_array_equal(valid, ref_valid)


def check_geotiff(path: Path) -> None:
    with open_source(path) as src, rasterio.open(path) as ref:
        assert isinstance(src, RasterioSource)
        i = src.info
        assert i.kind == "geotiff" and i.slide is None
        assert (i.height, i.width) == ref.shape and len(i.bands) == ref.count
        assert i.dtype == ref.dtypes[0]
        assert i.nodata == ref.nodata
        assert i.block == tuple(ref.block_shapes[0])
        assert i.level_shapes == ((ref.height, ref.width),)
        assert i.georef is not None
        assert i.georef.geotransform == ref.transform.to_gdal()
        assert rasterio.crs.CRS.from_wkt(i.georef.crs_wkt) == ref.crs
        assert i.georef.epsg == ref.crs.to_epsg()
        assert i.georef.affine() == ref.transform
        check_both_grids(src, ref.read(), ref.dataset_mask() > 0)


def check_png(path: Path) -> None:
    ref = iio.imread(path)
    ref = ref[np.newaxis] if ref.ndim == 2 else ref.transpose(2, 0, 1)
    with open_source(path) as src:
        assert isinstance(src, PlainImageSource)
        i = src.info
        assert i.kind == "image" and i.georef is None and i.slide is None and i.nodata is None
        assert i.dtype == str(ref.dtype)
        assert len(i.bands) == ref.shape[0]
        expected = {1: ("gray",), 3: ("red", "green", "blue"),
                    4: ("red", "green", "blue", "alpha")}[ref.shape[0]]
        assert i.bands == expected
        ref_valid = ref[3] > 0 if ref.shape[0] == 4 else np.ones(ref.shape[1:], bool)
        check_both_grids(src, ref, ref_valid)


def svs_reference(path: Path) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as osr:
        region = osr.read_region((0, 0), 0, osr.dimensions).convert("RGB")
    return np.asarray(region).transpose(2, 0, 1)


def check_svs(path: Path) -> None:
    ref = svs_reference(path)
    with open_source(path) as src:
        assert isinstance(src, OpenSlideSource)
        i = src.info
        assert i.kind == "slide" and i.georef is None
        assert (i.height, i.width) == (2967, 2220) and i.bands == ("red", "green", "blue")
        assert i.dtype == "uint8" and i.block == (240, 240) and i.level_shapes == ((2967, 2220),)
        assert i.slide is not None
        assert i.slide.mpp_x == pytest.approx(0.499) and i.slide.mpp_y == pytest.approx(0.499)
        assert i.slide.objective_power == 20 and i.slide.vendor == "aperio"
        assert (i.slide.level, i.slide.downsample) == (0, 1.0)
        assert TISSUE_MIN_SATURATION <= src.threshold <= TISSUE_MAX_SATURATION
        # the tissue rule on the whole reference image: the window grid must not matter
        ref_valid = tissue_mask(ref, src.threshold)
        check_both_grids(src, ref, ref_valid)
        # plausibility: this crop is about a third tissue; the glass corner is background
        assert 0.2 < ref_valid.mean() < 0.6
        assert src.read_valid(Window(0, 0, 200, 200)).mean() < 0.05


# ------------------------------------------------------------------ bundled samples
def test_sample_geotiffs(samples: Path) -> None:
    check_geotiff(samples / "spacenet_atlanta/sample_geotiff.tif")
    check_geotiff(samples / "landsat/RGB.byte.tif")


def test_sample_geotiff_metadata(samples: Path) -> None:
    with open_source(samples / "landsat/RGB.byte.tif") as src:
        i = src.info
        assert i.bands == ("red", "green", "blue") and i.nodata == 0.0
        assert i.georef is not None and i.georef.epsg == 32618
        assert i.georef.crs_wkt.startswith("PROJCRS[")  # WKT2
        valid = src.read_valid(i.full_window)
        assert 0.6 < valid.mean() < 0.7  # 32.5 % nodata corners
    with open_source(samples / "spacenet_atlanta/sample_geotiff.tif") as src:
        assert src.info.bands == ("gray",) and src.info.dtype == "uint16"
        assert src.info.georef is not None and src.info.georef.epsg == 32616


def test_sample_pngs(samples: Path) -> None:
    check_png(samples / "isbi2012/train/images/0.png")
    check_png(samples / "isbi2012/train/images/17.png")
    check_png(samples / "dsb2018/image_697a05c6fe4a.png")


def test_sample_svs(samples: Path) -> None:
    check_svs(samples / SVS)


# -------------------------------------------------------------------- shared data
SHARED_GEOTIFFS = [
    "spacenet_solaris/atlanta_buildings/sample_geotiff.tif",
    "spacenet_solaris/vegas_roads/road_mask_input.tif",
    "spacenet_solaris/vegas_roads/sample_road_raster_mask.tif",
    "landsat_rgb_rasterio/RGB.byte.tif",
]
SHARED_PNGS = [
    "isbi2012_em_membranes/train/images/3.png",
    "isbi2012_em_membranes/train/images/29.png",
    "isbi2012_em_membranes/test/images/0.png",
    "dsb2018_nuclei_instances/images/697a05c6fe4a.png",
    "dsb2018_nuclei_instances/images/fe9adb627a6f.png",  # RGBA, alpha all 255
    "dsb2018_nuclei_instances/images/432f367a4c5b.png",  # 520 x 348
    "dsb2018_nuclei_instances/images/472b1c5ff988.png",  # 512 x 680
]


@pytest.mark.shared
@pytest.mark.parametrize("name", SHARED_GEOTIFFS)
def test_shared_geotiffs(shared_data: Path, name: str) -> None:
    check_geotiff(shared_data / name)


@pytest.mark.shared
@pytest.mark.parametrize("name", SHARED_PNGS)
def test_shared_pngs(shared_data: Path, name: str) -> None:
    check_png(shared_data / name)


@pytest.mark.shared
def test_shared_svs(shared_data: Path) -> None:
    check_svs(shared_data / SHARED_SVS)


@pytest.mark.shared
def test_shared_vegas_metadata(shared_data: Path) -> None:
    with open_source(shared_data / SHARED_GEOTIFFS[1]) as src:
        i = src.info
        assert i.nodata is None and i.georef is not None and i.georef.epsg == 4326
        assert i.georef.geotransform[0] == pytest.approx(-115.2338076)
        assert src.read_valid(i.full_window).all()  # no nodata: all valid


# ---------------------------------------------------------------- pyramids / fallback
def _svs_pixels(samples: Path) -> np.ndarray:
    return svs_reference(samples / SVS).transpose(1, 2, 0)  # (rows, cols, 3)


def test_ome_subifd_pyramid_uses_tifffile(samples: Path, tmp_path: Path) -> None:
    base = _svs_pixels(samples)
    levels = [base, base[::2, ::2].copy(), base[::4, ::4].copy()]
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], subifds=2, tile=(256, 256), photometric="rgb", compression="zlib",
                 metadata={"axes": "YXS", "PhysicalSizeX": 0.499, "PhysicalSizeXUnit": "µm",
                           "PhysicalSizeY": 0.5, "PhysicalSizeYUnit": "µm"})
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, tile=(256, 256), photometric="rgb", compression="zlib")
    # OpenSlide opens it but sees only level 0: the tifffile reader must be chosen
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_count == 1
    shapes = tuple(lv.shape[:2] for lv in levels)
    for level, expected in enumerate(levels):
        with open_source(path, level=level) as src:
            assert isinstance(src, TiffSlideSource)
            i = src.info
            assert i.kind == "slide" and i.level_shapes == shapes
            assert (i.height, i.width) == expected.shape[:2]
            assert i.bands == ("red", "green", "blue") and i.dtype == "uint8"
            assert i.block == (256, 256)
            assert i.slide is not None and i.slide.vendor == "ome" and i.slide.level == level
            down_x = levels[0].shape[1] / expected.shape[1]
            assert i.slide.mpp_x == pytest.approx(0.499 * down_x)
            assert i.slide.mpp_y == pytest.approx(0.5 * levels[0].shape[0] / expected.shape[0])
            ref = expected.transpose(2, 0, 1)
            for w in (Window(0, 0, 256, 256), Window(250, 300, 17, 240),
                      Window(expected.shape[0] - 9, expected.shape[1] - 300, 9, 300)):
                np.testing.assert_array_equal(src.read(w), ref[(slice(None), *w.slices)])
            if level == 1:
                check_both_grids(src, ref, tissue_mask(ref, src.threshold))


@pytest.mark.parametrize("even", [True, False])
def test_page_pyramid_levels_exact(samples: Path, tmp_path: Path, even: bool) -> None:
    """OpenSlide reads levels with integer downsamples; others go through tifffile."""
    base = _svs_pixels(samples)
    if even:
        base = base[:2960, :2208]
    levels = [base, base[::2, ::2].copy(), base[::4, ::4].copy()]
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tw:
        for k, lv in enumerate(levels):
            tw.write(lv, tile=(256, 256), photometric="rgb", compression="zlib",
                     subfiletype=1 if k else 0, resolution=(1e4 / 0.25, 1e4 / 0.25),
                     resolutionunit="CENTIMETER")
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    w = Window(37, 53, 101, 157)
    for level, expected in enumerate(levels):
        with open_source(path, level=level) as src:
            exact_downsample = even or level == 0
            assert isinstance(src, OpenSlideSource if exact_downsample else TiffSlideSource)
            assert src.info.slide is not None and src.info.slide.level == level
            assert src.info.slide.mpp_x == pytest.approx(0.25 * 2**level, rel=1e-3)
            np.testing.assert_array_equal(src.read(w), expected[w.slices].transpose(2, 0, 1))


def test_large_single_level_slide_tissue_by_sampling(tmp_path: Path) -> None:
    """A slide with no small level: the threshold comes from sampled windows, not a full read."""
    img = np.full((4200, 4200, 3), 245, np.uint8)  # glass
    img[1000:3000, 500:2500] = (200, 100, 180)  # pink "tissue", saturation 127
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="zlib")
    with open_source(path) as src:
        assert src.info.kind == "slide"
        assert src.threshold == TISSUE_MIN_SATURATION  # Otsu splits 0 | 127 at 0: clipped
        w = Window(900, 400, 300, 300)
        expected = np.zeros(w.shape, bool)
        expected[100:, 100:] = True
        np.testing.assert_array_equal(src.read_valid(w), expected)
        np.testing.assert_array_equal(src.read(w), img[w.slices].transpose(2, 0, 1))


def test_fluorescence_ome_tiff_channels(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.integers(0, 4000, (2, 300, 400), dtype=np.uint16)
    path = tmp_path / "fluo.ome.tif"
    tifffile.imwrite(path, data, tile=(128, 128), metadata={
        "axes": "CYX", "Channel": {"Name": ["DAPI", "GFP"]},
        "PhysicalSizeX": 325, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 0.325})
    with open_source(path) as src:
        assert isinstance(src, TiffSlideSource) and src.threshold is None
        i = src.info
        assert i.bands == ("DAPI", "GFP") and i.dtype == "uint16" and i.block == (128, 128)
        assert i.slide is not None
        assert i.slide.mpp_x == pytest.approx(0.325) and i.slide.mpp_y == pytest.approx(0.325)
        check_both_grids(src, data, np.ones(data.shape[1:], bool))  # no tissue rule: all valid


# ------------------------------------------------------------------------- GeoTIFF
def test_tiled_geotiff_goes_to_rasterio_not_openslide(samples: Path, tmp_path: Path) -> None:
    path = tmp_path / "tiled.tif"
    with rasterio.open(samples / "landsat/RGB.byte.tif") as ref:
        profile = ref.profile | {"tiled": True, "blockxsize": 256, "blockysize": 256,
                                 "compress": "deflate"}
        data = ref.read()
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"  # would claim it
    with open_source(path) as src:
        assert isinstance(src, RasterioSource) and src.info.kind == "geotiff"
        assert src.info.block == (256, 256)
        np.testing.assert_array_equal(src.read(src.info.full_window), data)


def test_cog_overview_level_and_internal_mask(samples: Path, tmp_path: Path) -> None:
    path = tmp_path / "masked.tif"
    with rasterio.open(samples / "spacenet_atlanta/sample_geotiff.tif") as ref:
        data = ref.read()
        profile = ref.profile | {"tiled": True, "blockxsize": 256, "blockysize": 256,
                                 "nodata": None}
    mask = np.zeros(data.shape[1:], np.uint8)
    mask[100:700, 50:850] = 255
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.write_mask(mask)
        dst.build_overviews([2, 4], rasterio.enums.Resampling.nearest)
    with open_source(path) as src:
        assert src.info.nodata is None and src.info.level_shapes == ((900, 900), (450, 450),
                                                                      (225, 225))
        check_both_grids(src, data, mask > 0)
    with open_source(path, level=1) as src, rasterio.open(path, overview_level=0) as ov:
        assert (src.info.height, src.info.width) == (450, 450)
        assert src.info.georef is not None
        assert src.info.georef.geotransform == ov.transform.to_gdal()
        assert src.info.georef.geotransform[1] == 1.0  # 0.5 m pixels at half resolution
        check_both_grids(src, ov.read(), ov.dataset_mask() > 0)
    with pytest.raises(SourceError, match="level 3 is out of range"):
        open_source(path, level=3)


def _write_vrt(path: Path, parts: list[tuple[str, int, int]], ref: rasterio.DatasetReader) -> None:
    """A VRT mosaicking column strips ``(file name, col_start, col_stop)`` of ``ref``."""
    bands = []
    for b in range(1, ref.count + 1):
        sources = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="1">{name}</SourceFilename>'
            f"<SourceBand>{b}</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{c1 - c0}" ySize="{ref.height}"/>'
            f'<DstRect xOff="{c0}" yOff="0" xSize="{c1 - c0}" ySize="{ref.height}"/>'
            "</SimpleSource>"
            for name, c0, c1 in parts
        )
        nodata = "" if ref.nodata is None else f"<NoDataValue>{ref.nodata:g}</NoDataValue>"
        interp = ref.colorinterp[b - 1].name.capitalize()
        dtype = {"uint8": "Byte", "uint16": "UInt16"}[ref.dtypes[b - 1]]
        bands.append(f'<VRTRasterBand dataType="{dtype}" band="{b}">{nodata}'
                     f"<ColorInterp>{interp}</ColorInterp>{sources}</VRTRasterBand>")
    gt = ", ".join(repr(v) for v in ref.transform.to_gdal())
    path.write_text(
        f'<VRTDataset rasterXSize="{ref.width}" rasterYSize="{ref.height}">'
        f"<SRS>{ref.crs.to_wkt()}</SRS><GeoTransform>{gt}</GeoTransform>"
        + "".join(bands) + "</VRTDataset>"
    )


def test_vrt_mosaic_of_two_halves_equals_original(samples: Path, tmp_path: Path) -> None:
    original = samples / "landsat/RGB.byte.tif"
    with rasterio.open(original) as ref:
        half = ref.width // 2 + 3
        parts = [("left.tif", 0, half), ("right.tif", half, ref.width)]
        for name, c0, c1 in parts:
            win = RWindow(c0, 0, c1 - c0, ref.height)
            prof = ref.profile | {"width": c1 - c0,
                                  "transform": ref.transform @ Affine.translation(c0, 0)}
            with rasterio.open(tmp_path / name, "w", **prof) as dst:
                dst.write(ref.read(window=win))
        _write_vrt(tmp_path / "mosaic.vrt", parts, ref)
        data, mask, crs, transform = ref.read(), ref.dataset_mask(), ref.crs, ref.transform
    with open_source(tmp_path / "mosaic.vrt") as src:
        assert isinstance(src, RasterioSource) and src.info.kind == "geotiff"
        assert src.info.bands == ("red", "green", "blue") and src.info.nodata == 0.0
        assert src.info.georef is not None
        assert src.info.georef.geotransform == transform.to_gdal()
        assert rasterio.crs.CRS.from_wkt(src.info.georef.crs_wkt) == crs
        check_both_grids(src, data, mask > 0)
        # a window straddling the seam, after a pickle round trip
        w = Window(100, half - 50, 300, 100)
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(src)).read(w),
                                      data[(slice(None), *w.slices)])

    # the content hash covers the tiles: changing one pixel of a tile changes it
    h1 = source_sha256(tmp_path / "mosaic.vrt")
    assert h1 != hashlib.sha256((tmp_path / "mosaic.vrt").read_bytes()).hexdigest()
    with rasterio.open(tmp_path / "right.tif", "r+") as dst:
        px = dst.read(1, window=RWindow(0, 0, 1, 1))
        dst.write(px + 1, 1, window=RWindow(0, 0, 1, 1))
    assert source_sha256(tmp_path / "mosaic.vrt") != h1

    # a missing tile is reported at open time
    (tmp_path / "left.tif").unlink()
    with pytest.raises(SourceError, match=r"missing file 'left\.tif'"):
        open_source(tmp_path / "mosaic.vrt")


# -------------------------------------------------------------------- plain images
def test_plain_tiff_and_16bit_png(tmp_path: Path, rng: np.random.Generator) -> None:
    gray = rng.integers(0, 65535, (333, 517), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "gray.tif", gray, rowsperstrip=7)
    rgb = rng.integers(0, 255, (3, 301, 211), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", rgb, photometric="rgb", planarconfig="separate")
    rgba = rng.integers(0, 255, (190, 260, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"],
                     compression="zlib")
    iio.imwrite(tmp_path / "gray16.png", gray)

    with open_source(tmp_path / "gray.tif") as src:
        assert isinstance(src, PlainImageSource) and src.info.kind == "image"
        assert src.info.bands == ("gray",) and src.info.dtype == "uint16"
        assert src.info.block == (7, 517)
        check_both_grids(src, gray[np.newaxis], np.ones(gray.shape, bool))
    with open_source(tmp_path / "planar.tif") as src:
        assert src.info.bands == ("red", "green", "blue")
        check_both_grids(src, rgb, np.ones(rgb.shape[1:], bool))
    with open_source(tmp_path / "rgba.tif") as src:
        assert src.info.bands == ("red", "green", "blue", "alpha")
        ref = rgba.transpose(2, 0, 1)
        check_both_grids(src, ref, ref[3] > 0)
    with open_source(tmp_path / "gray16.png") as src:
        assert src.info.dtype == "uint16" and src.info.bands == ("gray",)
        check_both_grids(src, gray[np.newaxis], np.ones(gray.shape, bool))


# ----------------------------------------------------------------- pickling, threads
def test_pickle_round_trip_every_reader(samples: Path, tmp_path: Path) -> None:
    tiff = tmp_path / "plain.tif"
    tifffile.imwrite(tiff, np.arange(300 * 200, dtype=np.uint16).reshape(300, 200))
    ome = tmp_path / "small.ome.tif"
    base = _svs_pixels(samples)[:700, :600]
    with tifffile.TiffWriter(ome) as tw:
        tw.write(base, subifds=1, tile=(128, 128), photometric="rgb",
                 metadata={"axes": "YXS"})
        tw.write(base[::2, ::2].copy(), subfiletype=1, tile=(128, 128), photometric="rgb")
    cases: list[tuple[Path, int, type[Source]]] = [
        (samples / "landsat/RGB.byte.tif", 0, RasterioSource),
        (samples / SVS, 0, OpenSlideSource),
        (ome, 1, TiffSlideSource),
        (samples / "isbi2012/train/images/5.png", 0, PlainImageSource),
        (tiff, 0, PlainImageSource),
    ]
    w = Window(13, 27, 111, 97)
    for path, level, cls in cases:
        src = open_source(path, level=level)
        assert type(src) is cls
        expected, expected_valid = src.read(w), src.read_valid(w)
        copy = pickle.loads(pickle.dumps(src))
        assert copy.info == src.info
        np.testing.assert_array_equal(copy.read(w), expected)
        np.testing.assert_array_equal(copy.read_valid(w), expected_valid)
        src.close()
        # closed sources reopen lazily, and pickle again after use
        np.testing.assert_array_equal(src.read(w), expected)
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(src)).read(w), expected)
        src.close()
        copy.close()


def test_concurrent_reads_from_threads(samples: Path) -> None:
    for path in (samples / "spacenet_atlanta/sample_geotiff.tif", samples / SVS):
        with open_source(path) as src:
            windows = list(grid(src.info.height, src.info.width, 300))
            serial = [src.read(w) for w in windows]
            with ThreadPoolExecutor(4) as pool:
                parallel = list(pool.map(src.read, windows))
            for a, b in zip(serial, parallel, strict=True):
                np.testing.assert_array_equal(a, b)


# -------------------------------------------------------------------------- hashing
def test_source_sha256_is_file_bytes(samples: Path) -> None:
    path = samples / "landsat/RGB.byte.tif"
    assert source_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    svs = samples / SVS
    assert source_sha256(svs) == (
        "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
    )


# ---------------------------------------------------------------------- bad input
def test_truncated_tiff_fails_at_open(samples: Path, tmp_path: Path) -> None:
    original = samples / "spacenet_atlanta/sample_geotiff.tif"
    data = original.read_bytes()
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(SourceError, match=r"truncated TIFF .*truncated\.tif.*copy or download"):
        open_source(bad)
    svs = tmp_path / "truncated.svs"
    svs.write_bytes((samples / SVS).read_bytes()[:1_000_000])
    with pytest.raises(SourceError, match=r"truncated or corrupt TIFF .*truncated\.svs"):
        open_source(svs)


def test_truncated_png_fails_at_open(samples: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.png"
    bad.write_bytes((samples / "isbi2012/train/images/0.png").read_bytes()[:50_000])
    with pytest.raises(SourceError, match=r"cut\.png.*check the file is complete"):
        open_source(bad)


def test_text_file_missing_file_and_directory(tmp_path: Path) -> None:
    text = tmp_path / "notes.tif"
    text.write_text("this is not an image\n")
    with pytest.raises(SourceError, match=r"cannot open .*notes\.tif.*no image reader.*pass a GeoTIFF"):
        open_source(text)
    with pytest.raises(SourceError, match=r"image file not found: .*missing\.tif.*check the path"):
        open_source(tmp_path / "missing.tif")
    with pytest.raises(SourceError, match="directory"):
        open_source(tmp_path)
    with pytest.raises(SourceError, match="not found"):
        source_sha256(tmp_path / "missing.tif")
    with pytest.raises(OSError):  # SourceError is an OSError for generic callers
        open_source(tmp_path / "missing.tif")


@pytest.mark.parametrize(
    "name", ["landsat/RGB.byte.tif", SVS, "isbi2012/train/images/0.png"]
)
def test_bad_level(samples: Path, name: str) -> None:
    with pytest.raises(SourceError, match=r"level 2 is out of range .* has 1 level\(s\): pass a"):
        open_source(samples / name, level=2)
    with pytest.raises(SourceError, match="level must be an integer >= 0"):
        open_source(samples / name, level=-1)


def test_window_outside_image(samples: Path) -> None:
    with open_source(samples / "landsat/RGB.byte.tif") as src:
        for bad in (Window(700, 700, 100, 100), Window(-1, 0, 5, 5), Window(0, 0, 0, 5)):
            with pytest.raises(RegionError, match="outside the image"):
                src.read(bad)
            with pytest.raises(RegionError):
                src.read_valid(bad)
        assert src.read(Window(717, 790, 1, 1)).shape == (3, 1, 1)


def test_relative_path_becomes_absolute_uri(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source records an absolute path, so a worker in another directory can reopen it."""
    shutil.copy(samples / SVS, tmp_path / "copy.svs")
    monkeypatch.chdir(tmp_path)
    src = open_source("copy.svs")
    assert src.info.uri == str(tmp_path / "copy.svs")
    blob = pickle.dumps(src)
    monkeypatch.chdir(samples)
    np.testing.assert_array_equal(pickle.loads(blob).read(Window(0, 0, 8, 8)),
                                  src.read(Window(0, 0, 8, 8)))


# ------------------------------------------------------------------- tissue rule
def test_tissue_rule_values() -> None:
    rgb = np.array([[[255, 0, 200, 10]], [[255, 0, 100, 10]], [[255, 0, 200, 10]]], np.uint8)
    assert saturation(rgb).tolist() == [[0, 0, 127, 0]]
    alpha = np.array([[255, 255, 0, 255]], np.uint8)
    assert tissue_mask(rgb, 20).tolist() == [[False, False, True, False]]
    assert tissue_mask(rgb, 20, alpha).tolist() == [[False, False, False, False]]


@pytest.mark.parametrize(
    ("dtype", "nodata"),
    [("uint16", 0.0), ("uint8", 255.0), ("int16", -9999.0), ("uint8", 0.5),
     ("float32", float("nan")), ("float32", -1.5)],
)  # fmt: skip
def test_the_valid_mask_read_with_the_pixels_is_gdals(
    tmp_path: Path, rng: np.random.Generator, dtype: str, nodata: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """read_with_valid takes a nodata-only mask from the pixels it read (one decode, not two):
    equal to GDAL's dataset mask (and, for floats, segflow's rule that a pixel non-finite in
    any band is invalid), also where the nodata value is no value of the band's type."""
    from rasterio.transform import from_origin

    data = rng.integers(0, 250, (2, 70, 90)).astype(dtype)
    if _fits(nodata, dtype):
        data[:, 10:20, 30:50] = np.asarray(nodata).astype(dtype)  # nodata in both bands
        data[0, 40:45, 5:9] = np.asarray(nodata).astype(dtype)  # in one band only: valid
    path = tmp_path / "n.tif"
    with rasterio.open(path, "w", driver="GTiff", height=70, width=90, count=2, dtype=dtype,
                       nodata=nodata, crs="EPSG:32616",
                       transform=from_origin(0, 0, 1, 1)) as dst:  # fmt: skip
        dst.write(data)
    with open_source(path) as src, rasterio.open(path) as ref:
        if _fits(nodata, dtype):  # GDAL's mask would decode the window a second time
            monkeypatch.setattr(RasterioSource, "_read_valid", _decoded_twice)
        image, valid = src.read_with_valid(Window(0, 0, 70, 90))
        np.testing.assert_array_equal(image, ref.read())
        finite = np.isfinite(image).all(axis=0)
        np.testing.assert_array_equal(valid, (ref.dataset_mask() > 0) & finite)
        assert (~valid).any() == _fits(nodata, dtype)


def _decoded_twice(*_: object) -> None:
    raise AssertionError("the mask was read from GDAL: the window was decoded twice")


def _fits(value: float, dtype: str) -> bool:
    kind = np.dtype(dtype).kind
    if kind == "f":
        return True
    info = np.iinfo(dtype)
    return float(value).is_integer() and info.min <= value <= info.max
