"""Chunk files written directly, where Zarr's own write path costs more than the codec.

Zarr v3 runs every chunk of ``array[selection] = data`` through its asyncio event loop (one
per process, shared by every thread). Two threads writing uint16 512^2 chunks of an 8192^2
image through it reached 204 Mpx/s on this project's 2-core machines; Blosc and a plain file
write of the same chunks reached 693 Mpx/s, and ingest spent more time in Zarr than in
decoding its source. Zarr offers no public call that writes an encoded chunk, so for the
arrays segflow writes most (on local disk, not sharded, the default chunk key encoding, the
bytes codec and at most Blosc) this module encodes each chunk with numcodecs' Blosc, which
Zarr's own Blosc codec wraps, and writes the file Zarr would write, byte for byte: the same
key, the edge chunks padded with the fill value, and no file for a chunk that is all fill
value (Zarr's default ``write_empty_chunks=False``). ``tests/test_chunks.py`` compares the
files with Zarr's. Anything else returns no writer and goes through Zarr.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ChunkWriter", "chunk_writer", "whole_chunks", "write_chunks"]


@dataclass(frozen=True)
class ChunkWriter:
    """Where and how the chunks of one local, unsharded Zarr v3 array are written."""

    root: Path  # the array's directory (its zarr.json and c/)
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype[Any]
    fill_value: Any
    compressor: Any  # a numcodecs.Blosc, or None (the bytes codec alone)
    #: the chunk folders known to exist (one mkdir per folder, not one per chunk)
    folders: set[Path] = field(default_factory=set, compare=False, repr=False)


def chunk_writer(array: Any, root: Path) -> ChunkWriter | None:
    """A direct writer for the Zarr ``array`` stored in the local directory ``root``; None
    where its layout is not the one this module writes (Zarr must write it)."""
    import numcodecs
    from zarr.codecs import BloscCodec, BytesCodec
    from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3 or array.shards is not None:
        return None
    key = meta.chunk_key_encoding
    if not isinstance(key, DefaultChunkKeyEncoding) or key.separator != "/":
        return None
    codecs = tuple(meta.codecs)
    dtype = np.dtype(array.dtype)
    if not codecs or not isinstance(codecs[0], BytesCodec) or len(codecs) > 2:
        return None
    if dtype.itemsize > 1 and (codecs[0].endian is None or codecs[0].endian.value != "little"):
        return None
    compressor = None
    if len(codecs) == 2:
        blosc = codecs[1]
        if not isinstance(blosc, BloscCodec) or blosc.typesize not in (None, dtype.itemsize):
            return None
        shuffles = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
        compressor = numcodecs.Blosc(cname=blosc.cname.value, clevel=blosc.clevel,
                                     shuffle=shuffles[blosc.shuffle.value],
                                     blocksize=blosc.blocksize)  # fmt: skip
    return ChunkWriter(root=root, shape=tuple(array.shape), chunks=tuple(array.chunks),
                       dtype=dtype.newbyteorder("<"), fill_value=dtype.type(meta.fill_value),
                       compressor=compressor)  # fmt: skip


def whole_chunks(writer: ChunkWriter, start: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether the block at ``start`` of ``shape`` is whole chunks (clipped at the edge)."""
    return all(
        s % c == 0 and (n % c == 0 or s + n == full)
        for s, n, c, full in zip(start, shape, writer.chunks, writer.shape, strict=True)
    )


def write_chunks(writer: ChunkWriter, start: tuple[int, ...], data: np.ndarray) -> None:
    """Write ``data`` into the array at ``start``: whole chunks, the last ones of each axis
    clipped at the array's edge (as :meth:`SceneStore.write_window` requires)."""
    w = writer
    if not whole_chunks(w, start, data.shape):
        raise ValueError(f"a write at {start} of {data.shape} is not whole chunks of {w.chunks}")
    first = [s // c for s, c in zip(start, w.chunks, strict=True)]
    counts = [-(-n // c) for n, c in zip(data.shape, w.chunks, strict=True)]
    for offset in itertools.product(*(range(n) for n in counts)):
        index = [f + o for f, o in zip(first, offset, strict=True)]
        part = tuple(
            slice(o * c, min((o + 1) * c, n))
            for o, c, n in zip(offset, w.chunks, data.shape, strict=True)
        )
        _write_one(w, index, data[part])


def _write_one(w: ChunkWriter, index: list[int], block: np.ndarray) -> None:
    path = w.root.joinpath("c", *map(str, index))
    if block.shape != w.chunks:  # an edge chunk: stored whole, padded with the fill value
        full = np.full(w.chunks, w.fill_value, dtype=w.dtype)
        full[tuple(slice(0, n) for n in block.shape)] = block
        block = full
    if _is_nan(w.fill_value):
        empty = bool(np.all(np.isnan(block)))
    elif w.fill_value == 0:  # the usual fill: one pass, no temporary array
        empty = not block.any()
    else:
        empty = bool(np.all(block == w.fill_value))
    if empty:  # Zarr keeps no file for it (write_empty_chunks=False)
        path.unlink(missing_ok=True)
        return
    raw = np.ascontiguousarray(block, dtype=w.dtype)
    payload = w.compressor.encode(raw) if w.compressor is not None else raw.tobytes()
    if path.parent not in w.folders:
        path.parent.mkdir(parents=True, exist_ok=True)
        w.folders.add(path.parent)
    path.write_bytes(payload)


def _is_nan(value: Any) -> bool:
    return isinstance(value, np.floating) and bool(np.isnan(value))
