"""Instance ids from a class map, window by window, against whole-array scipy labelling."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from segflow.errors import ConfigError
from segflow.instances import label_instances


def reference_instances(class_map: np.ndarray, classes: list[int]) -> np.ndarray:
    """Whole-array ``scipy.ndimage.label`` per class, renumbered by first pixel (raster order)."""
    provisional = np.zeros(class_map.shape, "int64")
    offset = 0
    for c in classes:
        lab, n = ndimage.label(class_map == c)  # 4-connectivity
        provisional[lab > 0] = lab[lab > 0] + offset
        offset += n
    ids, first = np.unique(provisional.ravel(), return_index=True)
    ids, first = ids[ids > 0], first[ids > 0]
    lookup = np.zeros(offset + 1, "int64")
    lookup[ids[np.argsort(first)]] = np.arange(1, ids.size + 1)
    return lookup[provisional]


def blobs(shape: tuple[int, int], seed: int, classes: int = 3) -> np.ndarray:
    """Smooth random regions of ``classes`` classes: many objects crossing any block edge."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 3)
    edges = np.quantile(noise, np.linspace(0, 1, classes + 1)[1:-1])
    return np.digitize(noise, edges).astype("uint8")


@pytest.mark.parametrize("block", [7, 64, 128, 256, 1000])
def test_ids_equal_whole_array_reference_for_any_block(block: int) -> None:
    cm = blobs((300, 420), seed=1)
    out = np.zeros(cm.shape, "uint32")
    table = label_instances(cm, out, classes=[1, 2], block=block)
    ref = reference_instances(cm, [1, 2])
    np.testing.assert_array_equal(out, ref)
    assert table.count == ref.max() > 50
    np.testing.assert_array_equal(
        table.pixels,
        np.bincount(ref.ravel(), minlength=table.count + 1) * (np.arange(table.count + 1) > 0),
    )
    # each instance's class is the class of its pixels
    for i in (1, table.count // 2, table.count):
        assert set(np.unique(cm[ref == i]).tolist()) == {int(table.classes[i])}


@pytest.mark.parametrize("chunk", [128, 256])
@pytest.mark.parametrize("block", [128, 256, 512])
def test_zarr_chunks_and_windows_give_one_partition(tmp_path, chunk: int, block: int) -> None:
    """The acceptance case: tiles 128/256/512 x chunks 128/256 give identical ids."""
    cm = blobs((600, 520), seed=2, classes=2)
    src = zarr.create_array(tmp_path / "cm.zarr", shape=cm.shape, chunks=(chunk, chunk),
                            dtype="uint8")  # fmt: skip
    src[:] = cm
    out = zarr.create_array(tmp_path / "inst.zarr", shape=cm.shape, chunks=(chunk, chunk),
                            dtype="uint32")  # fmt: skip
    label_instances(src, out, classes=[1], block=block)
    np.testing.assert_array_equal(out[:], reference_instances(cm, [1]))


def test_an_object_crossing_every_block_edge_has_one_id() -> None:
    cm = np.zeros((100, 100), "uint8")
    cm[5:95, 48:52] = 1  # a vertical bar over two block rows ...
    cm[48:52, 5:95] = 1  # ... and a horizontal one over two block columns: one cross
    cm[0:3, 0:3] = 2  # a different class touching nothing
    cm[52:54, 52:54] = 2  # touching the cross, but another class: its own instance
    out = np.zeros(cm.shape, "uint32")
    table = label_instances(cm, out, classes=[1, 2], block=50)
    assert table.count == 3
    assert np.unique(out[cm == 1]).tolist() == [2]  # the cross starts after the corner square
    assert table.classes.tolist() == [0, 2, 1, 2]


def test_a_spiral_joined_only_far_away_is_one_object() -> None:
    """Pieces that meet only through later windows (a U shape opening upwards) are joined."""
    cm = np.zeros((40, 40), "uint8")
    cm[0:30, 2] = 1
    cm[0:30, 37] = 1
    cm[29, 2:38] = 1
    out = np.zeros(cm.shape, "uint32")
    assert label_instances(cm, out, classes=[1], block=8).count == 1
    assert np.unique(out[cm == 1]).tolist() == [1]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    block=st.integers(2, 40),
    h=st.integers(1, 60),
    w=st.integers(1, 60),
)
def test_random_maps_match_the_reference(seed: int, block: int, h: int, w: int) -> None:
    rng = np.random.default_rng(seed)
    cm = rng.integers(0, 3, size=(h, w)).astype("uint8")
    out = np.zeros(cm.shape, "uint32")
    label_instances(cm, out, classes=[0, 2], block=block)
    np.testing.assert_array_equal(out, reference_instances(cm, [0, 2]))


def test_bad_arguments_are_config_errors() -> None:
    cm = np.zeros((4, 4), "uint8")
    with pytest.raises(ConfigError, match="no instance classes"):
        label_instances(cm, np.zeros((4, 4), "uint32"), classes=[])
    with pytest.raises(ConfigError, match="differs"):
        label_instances(cm, np.zeros((4, 5), "uint32"), classes=[1])
    with pytest.raises(ConfigError, match="2-D"):
        label_instances(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), "uint32"), classes=[1])


def test_instance_polygons_one_feature_per_instance(tmp_path) -> None:
    """Windowed polygons of the instance raster equal whole-raster shapes, one per id."""
    import geopandas as gpd
    import rasterio
    import rasterio.features
    from shapely.geometry import shape

    from segflow.io.export import vectorize
    from segflow.io.export.instance_cog import write_instance_cog

    cm = blobs((150, 170), seed=3)
    out = np.zeros(cm.shape, "uint32")
    table = label_instances(cm, out, classes=[1, 2], block=64)
    classes = [{"id": i, "name": f"c{i}"} for i in range(3)]
    res = vectorize(cm, classes=classes, window=37, instances=out, instance_classes=table.classes,
                    out_gpkg=tmp_path / "i.gpkg", out_parquet=tmp_path / "i.parquet",
                    out_geojson_pixels=tmp_path / "i.geojson")  # fmt: skip
    assert res.n_features == table.count
    whole = {int(v): shape(g) for g, v in rasterio.features.shapes(
        out.astype("int32"), mask=out > 0, connectivity=4)}  # fmt: skip
    for path in (tmp_path / "i.gpkg", tmp_path / "i.parquet"):
        gdf = gpd.read_file(path) if path.suffix == ".gpkg" else gpd.read_parquet(path)
        assert sorted(gdf.instance_id) == list(range(1, table.count + 1))
        gdf = gdf.set_index("instance_id")
        np.testing.assert_array_equal(gdf.class_id.to_numpy(), table.classes[gdf.index])
        np.testing.assert_array_equal(gdf.area.to_numpy(), table.pixels[gdf.index])
        for i in (1, table.count // 2, table.count):
            assert gdf.geometry[i].equals(whole[i])
            assert gdf.centroid_x[i] == pytest.approx(whole[i].centroid.x)
            assert gdf.centroid_y[i] == pytest.approx(whole[i].centroid.y)
    import json

    feats = json.loads((tmp_path / "i.geojson").read_text())["features"]
    assert {f["properties"]["objectType"] for f in feats} == {"detection"}
    assert sorted(int(f["properties"]["name"]) for f in feats) == list(range(1, table.count + 1))
    cog = write_instance_cog(out, tmp_path / "i.tif", georef=None, classes=classes[1:],
                             count=table.count, block=64)  # fmt: skip
    with rasterio.open(cog) as src:
        np.testing.assert_array_equal(src.read(1), out)
        assert src.tags()["SEGFLOW_INSTANCES"] == str(table.count)
        assert src.dtypes[0] == "uint32" and src.overviews(1)


# ------------------------------------------------------------------------ splitting
def touching_discs(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Discs in pairs that overlap a little: one 4-connected object per pair, with a neck."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, "uint8")
    for cy in range(14, shape[0] - 14, 30):
        for cx in range(14, shape[1] - 34, 44):
            r = int(rng.integers(6, 10))
            gap = int(rng.integers(2 * r - 4, 2 * r))  # centre distance < 2r: they overlap
            for dx in (0, gap):
                out |= ((yy - cy) ** 2 + (xx - cx - dx) ** 2 <= r * r).astype("uint8")
    return out


def reference_split(mask: np.ndarray, depth: float) -> np.ndarray:
    """Whole-array EDT, h-maxima and watershed (components of one class never touch), then
    numbered by first pixel."""
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    dist = ndimage.distance_transform_edt(mask)
    markers, _ = ndimage.label(h_maxima(dist, depth) & mask.astype(bool))
    comp, _ = ndimage.label(mask)
    # a component without an h-maximum of its own keeps one piece: seed it anywhere
    for i in set(np.unique(comp[comp > 0])) - set(np.unique(comp[markers > 0])):
        r, c = np.argwhere(comp == i)[0]
        markers[r, c] = markers.max() + 1
    ws = watershed(-dist, markers, mask=mask.astype(bool), connectivity=1)
    ids, first = np.unique(ws.ravel(), return_index=True)
    ids, first = ids[ids > 0], first[ids > 0]
    lookup = np.zeros(ws.max() + 1, "int64")
    lookup[ids[np.argsort(first)]] = np.arange(1, ids.size + 1)
    return lookup[ws]


def test_split_separates_touching_discs_like_a_whole_array_watershed() -> None:
    """Identical pieces whatever the window size; the same pieces as a whole-array watershed
    (up to ties on the dividing line, which the flooding order decides)."""
    from segflow.instance_split import split_instances

    cm = touching_discs((120, 200), seed=4)
    results = []
    for block in (16, 50, 1000):
        inst = np.zeros(cm.shape, "uint32")
        table = label_instances(cm, inst, classes=[1], block=block)
        out = np.full(cm.shape, 99, "uint32")  # stale content: must not survive
        split = split_instances(inst, out, classes=table.classes, depth=2.0, block=block)
        results.append(out)
        assert split.count == 2 * table.count  # every pair split in two
        assert split.pixels.sum() == cm.sum() and set(split.classes[1:].tolist()) == {1}
        np.testing.assert_array_equal(
            split.pixels, np.bincount(out.ravel()) * (np.arange(split.count + 1) > 0)
        )
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    ref = reference_split(cm, 2.0)
    assert ref.max() == results[0].max()
    for i in range(1, ref.max() + 1):  # piece i is the reference's piece i, but for its edge
        a, b = results[0] == i, ref == i
        assert (a & b).sum() / (a | b).sum() > 0.9
