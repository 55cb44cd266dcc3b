"""Direct chunk writes (segflow.io.chunks) against Zarr's own: the same files, byte for byte,
and the same values read back; layouts it does not write go through Zarr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from segflow.io.chunks import chunk_writer, write_chunks
from segflow.io.store import SceneStore

BLOSC = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def _files(root: Path, prefix: str = "") -> dict[str, bytes]:
    """The files under ``root`` (those whose path starts with ``prefix``) and their bytes."""
    out = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
    return {k: p.read_bytes() for k, p in out.items() if k.startswith(prefix)}


def _pair(tmp_path: Path, data: np.ndarray, chunks: tuple[int, ...], **kw: Any) -> None:
    """Write ``data`` into two fresh arrays, through Zarr and directly; compare them."""
    arrays = []
    for name in ("zarr", "direct"):
        arrays.append(zarr.create_array(tmp_path / name, shape=data.shape, chunks=chunks,
                                        dtype=data.dtype, zarr_format=3, **kw))  # fmt: skip
    arrays[0][...] = data
    writer = chunk_writer(arrays[1], tmp_path / "direct")
    assert writer is not None
    write_chunks(writer, (0,) * data.ndim, data)
    assert _files(tmp_path / "zarr") == _files(tmp_path / "direct")
    np.testing.assert_array_equal(arrays[1][...], data)


@pytest.mark.parametrize(
    ("dtype", "compressors", "fill"),
    [("uint16", BLOSC, 0), ("float32", BLOSC, np.nan), ("bool", BLOSC, False),
     ("uint8", None, 0), ("int32", BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), -1)],
)  # fmt: skip
def test_direct_chunks_are_zarrs_own_files(
    tmp_path: Path, dtype: str, compressors: Any, fill: Any
) -> None:
    """Bands and edge chunks (100 x 130 in 32-pixel chunks), and chunks that are all fill
    value (no file), in every dtype and codec the stores use."""
    rng = np.random.default_rng(0)
    data = (rng.random((3, 100, 130)) * 1000).astype(dtype)
    data[:, :32, :64] = fill  # two chunks of fill value: Zarr writes no file for them
    if dtype == "float32":
        data[0, 50, 50] = np.nan
    _pair(tmp_path, data, (3, 32, 32), compressors=compressors, fill_value=fill)


def test_layouts_it_does_not_write_go_through_zarr(tmp_path: Path) -> None:
    sharded = zarr.create_array(tmp_path / "s", shape=(64, 64), chunks=(16, 16), shards=(32, 32),
                                dtype="uint8", zarr_format=3)  # fmt: skip
    assert chunk_writer(sharded, tmp_path / "s") is None
    dotted = zarr.create_array(tmp_path / "d", shape=(64, 64), chunks=(16, 16), dtype="uint8",
                               zarr_format=3, chunk_key_encoding={"name": "v2"})  # fmt: skip
    assert chunk_writer(dotted, tmp_path / "d") is None
    zstd = zarr.create_array(tmp_path / "z", shape=(64, 64), chunks=(16, 16), dtype="uint8",
                             zarr_format=3)  # fmt: skip
    assert chunk_writer(zstd, tmp_path / "z") is None  # Zarr's default codec: not Blosc
    plain = zarr.create_array(tmp_path / "p", shape=(64, 64), chunks=(16, 16), dtype="uint8",
                              compressors=BLOSC, zarr_format=3)  # fmt: skip
    with pytest.raises(ValueError, match="not whole chunks"):
        write_chunks(chunk_writer(plain, tmp_path / "p"), (8, 0), np.ones((16, 16), np.uint8))  # type: ignore[arg-type]


def test_a_store_written_directly_equals_one_written_through_zarr(tmp_path: Path) -> None:
    """SceneStore.write_window and its progress marks: the chunk files of an unsharded store
    are Zarr's; a sharded store (written through Zarr) reads back the same pixels; marked
    units read back as done."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 4000, (2, 300, 200), dtype=np.uint16)
    stores = {}
    for name, shard in (("direct", None), ("sharded", 128)):
        s = SceneStore.create(tmp_path / name, bands=("a", "b"), height=300, width=200,
                              dtype="uint16", chunk=64, shard=shard)  # fmt: skip
        for _, w in s.grid:
            s.write_window("image", w, image[(slice(None), *w.slices)])
        marked = [index for index, _ in s.grid][:-1]
        s.progress("image").mark_many(marked)
        assert s.progress("image").done() == set(marked)
        stores[name] = s
    reference = zarr.create_array(tmp_path / "ref", shape=image.shape, chunks=(2, 64, 64),
                                  dtype="uint16", compressors=BLOSC, fill_value=0, zarr_format=3)  # fmt: skip
    reference[...] = image
    assert _files(tmp_path / "direct" / "image", "c/") == _files(tmp_path / "ref", "c/")
    for s in stores.values():
        np.testing.assert_array_equal(
            SceneStore.open(s.path, unfinished=True).array("image")[...], image
        )


def test_grouped_progress_marks_whole_groups_directly_and_the_rest_through_zarr(
    tmp_path: Path,
) -> None:
    """A progress record of 2 x 3 units per marker file: a whole group (an edge group
    clipped) is one file; single units and partial groups keep the marks already there."""
    from segflow.geometry import BlockIndex

    s = SceneStore.create(tmp_path / "s", bands=("a",), height=300, width=500, dtype="uint8",
                          chunk=64)  # 5 x 8 units  # fmt: skip
    p = s.progress("ingest", group=(2, 3))
    group = [BlockIndex(r, c) for r in (2, 3) for c in (6, 7)]  # the edge group of 2 x 2
    p.mark_many(group)
    marks = tmp_path / "s" / "_segflow" / "progress" / "ingest" / "c"
    assert sorted(f.relative_to(marks).as_posix() for f in marks.rglob("*") if f.is_file()) == [
        "1/2"
    ]
    p.mark(BlockIndex(0, 0))
    p.mark_many([BlockIndex(0, 1), BlockIndex(1, 4)])  # not a rectangle: one by one
    p.mark_many([BlockIndex(4, 0), BlockIndex(4, 1)])  # a partial group
    expected = {*group, BlockIndex(0, 0), BlockIndex(0, 1), BlockIndex(1, 4), BlockIndex(4, 0),
                BlockIndex(4, 1)}  # fmt: skip
    assert s.progress("ingest").done() == expected
    # an existing record keeps its own grouping, whatever a later caller asks for
    assert SceneStore.open(s.path, unfinished=True).progress("ingest").done() == expected
