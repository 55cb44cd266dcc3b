"""OME-Zarr (NGFF 0.4) label images: read back with ome-zarr's reader, levels checked against
the OME-TIFF writer's (read with tifffile), streaming, bad inputs and atomic publishing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr

from segflow.config import ClassDef
from segflow.errors import ConfigError, LabelError
from segflow.io.export import write_ome_tiff_labels, write_ome_zarr_labels

CLASSES = (
    ClassDef(id=0, name="background", color="#000000"),
    ClassDef(id=1, name="tumour", color="#ff0000"),
    ClassDef(id=2, name="stroma", color="#00ff80"),
)
NODATA = 255
MPP_X, MPP_Y = 0.2527, 0.2531


def slide_labels() -> np.ndarray:
    """300 x 500 blobs of 3 classes (seeded), with a nodata corner."""
    rng = np.random.default_rng(11)
    labels = ndi.median_filter(rng.integers(0, 3, (300, 500)).astype("uint8"), 7)
    labels[:37, 430:] = NODATA
    labels[250:, :61] = NODATA
    return labels


def as_zarr(arr: np.ndarray, chunk: int = 100) -> zarr.Array:
    z = zarr.create_array(store={}, shape=arr.shape, dtype=arr.dtype, chunks=(chunk, chunk))
    z[...] = arr
    return z


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def read_nodes(path: Path) -> list[Any]:
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    location = parse_url(path, fmt=FormatV04())
    assert location is not None, f"ome-zarr does not recognise {path}"
    return list(Reader(location)())


def label_node(path: Path) -> Any:
    from ome_zarr.reader import Label

    found = [n for n in read_nodes(path) if n.load(Label) is not None]
    assert len(found) == 1, found
    return found[0]


def test_ome_zarr_labels_read_back_with_ome_zarr(tmp_path: Path) -> None:
    pytest.importorskip("ome_zarr", reason="ome-zarr (a dev dependency) is not installed")
    import tifffile

    labels = slide_labels()
    out = write_ome_zarr_labels(
        as_zarr(labels),
        tmp_path / "s.ome.zarr",
        classes=CLASSES,
        mpp_x=MPP_X,
        mpp_y=MPP_Y,
        tile=64,
        levels=3,
    )
    assert hidden(tmp_path) == []
    node = label_node(out)
    data = [np.asarray(level) for level in node.data]
    assert [d.shape for d in data] == [(300, 500), (150, 250), (75, 125)]
    assert data[0].dtype == np.uint8 and np.array_equal(data[0], labels)  # bit for bit
    # the lower levels are those of the OME-TIFF writer: an independent route to the files
    tif_path = write_ome_tiff_labels(
        labels,
        tmp_path / "s.ome.tif",
        classes=CLASSES,
        mpp_x=MPP_X,
        mpp_y=MPP_Y,
        tile=64,
        levels=3,
        nodata=NODATA,
    )
    with tifffile.TiffFile(tif_path) as tif:
        tif_levels = [lvl.asarray() for lvl in tif.series[0].levels]
    assert len(tif_levels) == 3
    for k in (1, 2):
        assert np.array_equal(data[k], tif_levels[k]), f"level {k}"
    assert not np.array_equal(data[1], labels[::2, ::2])  # a vote, not nearest
    # metadata: scales, units, colours and names
    transforms = node.metadata["coordinateTransformations"]
    assert [t[0] for t in transforms] == [
        {"type": "scale", "scale": [MPP_Y * 2**k, MPP_X * 2**k]} for k in range(3)
    ]
    assert node.metadata["axes"] == [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    assert node.metadata["properties"] == {c.id: {"name": c.name} for c in CLASSES}
    colors = node.metadata["color"]
    for c in CLASSES:
        assert colors[c.id] == [v / 255 for v in (*c.rgb, 255)]
    assert colors[NODATA][3] == 0  # nodata is transparent


def test_ome_zarr_layout_is_ngff_0_4(tmp_path: Path) -> None:
    pytest.importorskip("ome_zarr", reason="ome-zarr (a dev dependency) is not installed")
    out = write_ome_zarr_labels(
        slide_labels(),
        tmp_path / "s.ome.zarr",
        classes=CLASSES,
        mpp_x=None,
        mpp_y=None,
        tile=64,
        name="tissue",
    )
    root = json.loads((out / ".zattrs").read_text())
    assert root["multiscales"][0]["version"] == "0.4"  # a placeholder image holds the labels
    assert json.loads((out / "labels" / ".zattrs").read_text()) == {"labels": ["tissue"]}
    attrs = json.loads((out / "labels" / "tissue" / ".zattrs").read_text())
    assert attrs["image-label"]["version"] == "0.4"
    assert attrs["image-label"]["source"] == {"image": "../../"}
    assert attrs["segflow"]["nodata"] == NODATA
    assert [c["name"] for c in attrs["segflow"]["classes"]] == [c.name for c in CLASSES]
    multiscales = attrs["multiscales"][0]
    assert [a.get("unit") for a in multiscales["axes"]] == [None, None]  # pixel sizes unknown
    assert [d["coordinateTransformations"][0]["scale"] for d in multiscales["datasets"]] == [
        [1.0, 1.0],
        [2.0, 2.0],
        [4.0, 4.0],
        [8.0, 8.0],  # halved until one 64 px tile holds it
    ]
    zarray = json.loads((out / "labels" / "tissue" / "0" / ".zarray").read_text())
    assert zarray["zarr_format"] == 2 and zarray["dimension_separator"] == "/"
    assert zarray["chunks"] == [64, 64] and zarray["fill_value"] == NODATA
    assert not list((out / "0").glob("[0-9]*")), "the placeholder image stores no chunks"
    nodes = read_nodes(out)  # the root is an image: the reader finds the label image under it
    assert [n.zarr.basename() for n in nodes] == ["s.ome.zarr", "labels", "tissue"]


class Spy:
    """An array-like recording the windows read from it."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr, self.shape, self.dtype = arr, arr.shape, arr.dtype
        self.reads: list[int] = []

    def __getitem__(self, key: Any) -> np.ndarray:
        block = self.arr[key]
        self.reads.append(block.size)
        return block


def test_ome_zarr_streams_the_input_once(tmp_path: Path) -> None:
    labels = slide_labels()
    spy = Spy(labels)
    out = write_ome_zarr_labels(
        spy, tmp_path / "s.ome.zarr", classes=CLASSES, mpp_x=0.5, mpp_y=0.5, tile=32, window=64
    )
    assert max(spy.reads) <= 64 * 64  # one window at a time, never the whole array
    assert sum(spy.reads) == labels.size  # every pixel read once
    level0 = zarr.open_array(out / "labels" / "classes" / "0", mode="r")
    assert np.array_equal(level0[...], labels)


def test_ome_zarr_bad_inputs(tmp_path: Path) -> None:
    labels = slide_labels()
    out = tmp_path / "s.ome.zarr"
    with pytest.raises(ConfigError, match="nodata 1 is also class 'tumour'"):
        write_ome_zarr_labels(labels, out, classes=CLASSES, mpp_x=0.5, mpp_y=0.5, nodata=1)
    with pytest.raises(ConfigError, match="2-D"):
        write_ome_zarr_labels(labels[None], out, classes=CLASSES, mpp_x=0.5, mpp_y=0.5)
    with pytest.raises(ConfigError, match="both mpp_x and mpp_y or neither"):
        write_ome_zarr_labels(labels, out, classes=CLASSES, mpp_x=0.5, mpp_y=None)
    with pytest.raises(ConfigError, match="multiple of 16"):
        write_ome_zarr_labels(labels, out, classes=CLASSES, mpp_x=0.5, mpp_y=0.5, tile=100)
    with pytest.raises(ConfigError, match="plain group name"):
        write_ome_zarr_labels(labels, out, classes=CLASSES, mpp_x=None, mpp_y=None, name="a/b")
    bad = labels.copy()
    bad[299, 499] = 7
    with pytest.raises(LabelError, match=r"\[7\]"):
        write_ome_zarr_labels(bad, out, classes=CLASSES, mpp_x=None, mpp_y=None, tile=64)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a Zarr group"):
        write_ome_zarr_labels(labels, tmp_path / "user", classes=CLASSES, mpp_x=None, mpp_y=None)
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"


def test_ome_zarr_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from segflow.io.export import ometiff

    labels = slide_labels()
    out = tmp_path / "s.ome.zarr"
    write_ome_zarr_labels(labels, out, classes=CLASSES, mpp_x=None, mpp_y=None, tile=64)
    flipped = np.where(labels == 1, 2, np.where(labels == 2, 1, labels)).astype("uint8")
    write_ome_zarr_labels(flipped, out, classes=CLASSES, mpp_x=None, mpp_y=None, tile=64)
    level0 = zarr.open_array(out / "labels" / "classes" / "0", mode="r")
    assert np.array_equal(level0[...], flipped)
    assert hidden(tmp_path) == []

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(ometiff, "downsample_mode2", boom)
    with pytest.raises(RuntimeError, match="killed"):
        write_ome_zarr_labels(labels, out, classes=CLASSES, mpp_x=None, mpp_y=None, tile=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ome.zarr"]  # no scratch left
    level0 = zarr.open_array(out / "labels" / "classes" / "0", mode="r")
    assert np.array_equal(level0[...], flipped)  # the older output is untouched
