"""The scene store: one Zarr v3 group per scene (DESIGN.md section 3, a contract).

Arrays share the level-0 pixel grid of the source. Every array is chunked ``chunk`` x
``chunk`` (all bands together for ``image``), optionally grouped into ``shard`` x ``shard``
shards, and compressed with Blosc-zstd + bitshuffle. Writers write whole *write units*
(shards when sharded, else chunks), one writer per unit, so no locks are needed.

Completed work is recorded in small progress arrays under ``_segflow/progress/<array>``
(one uint8 element per write unit, one chunk per element, so each unit's marker has one
writer too). A killed run therefore resumes where it stopped, on any Zarr store.

An array is usable only once it is listed complete in the group's ``segflow.arrays``
attribute, which only the coordinating process writes.

Examples
--------
>>> import tempfile, numpy as np
>>> tmp = tempfile.mkdtemp()
>>> s = SceneStore.create(f"{tmp}/s.zarr", bands=("gray",), height=4, width=6,
...                       dtype="uint8", chunk=2)
>>> s.write_window("image", s.grid.window(0, 0), np.ones((1, 2, 2), "uint8"))
>>> int(s.array("image")[0, :2, :2].sum())
4
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from segflow import __version__
from segflow.config import SCHEMA_VERSION, ClassDef
from segflow.errors import StoreError
from segflow.geometry import BlockGrid, BlockIndex, Window
from segflow.georef import GeoRef, SlideInfo
from segflow.io import remote
from segflow.io.chunks import ChunkWriter, chunk_writer, whole_chunks, write_chunks
from segflow.io.remote import check_location, is_url, zarr_store

__all__ = [
    "ARRAY_DIMS",
    "GeoRef",
    "SceneStore",
    "SlideInfo",
    "SourceRecord",
    "publish_store",
    "remove_store",
    "staging_location",
    "staging_path",
    "store_complete",
    "store_exists",
    "unpublish_store",
]

log = logging.getLogger(__name__)

#: Dimension names of the contract arrays (DESIGN.md section 3).
ARRAY_DIMS: dict[str, tuple[str, ...]] = {
    "image": ("band", "y", "x"),
    "valid": ("y", "x"),
    "labels": ("y", "x"),
    "instances": ("y", "x"),
    "weights": ("y", "x"),
    "prediction/probabilities": ("class", "y", "x"),
    "prediction/labels": ("y", "x"),
}

_PROGRESS = "_segflow/progress"


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """Where a store's pixels came from."""

    uri: str
    sha256: str
    kind: str
    level: int = 0


def staging_path(path: str | Path) -> Path:
    """Where a store is built before it is moved to ``path`` (``NAME.partial``)."""
    p = Path(path)
    return p.with_name(p.name + ".partial")


#: On object storage (no atomic rename) a store is complete once this object exists: it is
#: written last, after every array and record.
COMPLETE_MARKER = "_segflow/complete.json"


def staging_location(location: str | Path) -> Path | str:
    """Where the store for ``location`` is built: ``NAME.partial`` beside a local one (moved
    into place when done); on object storage the store itself (completed by a marker)."""
    return str(location).rstrip("/") if is_url(location) else staging_path(location)


def store_exists(location: str | Path) -> bool:
    """Whether a store (finished or not) is at ``location``: its group metadata exists (a
    GDAL virtual path ``/vsi...`` names a raster, never a store)."""
    if str(location).startswith("/vsi"):
        return False
    if is_url(location):
        return remote.exists(f"{str(location).rstrip('/')}/zarr.json")
    return (Path(location) / "zarr.json").is_file()


def store_complete(location: str | Path) -> bool:
    """Whether a finished store is at ``location`` (local: it exists under its final name;
    object storage: its :data:`COMPLETE_MARKER` exists)."""
    if is_url(location):
        return remote.exists(f"{str(location).rstrip('/')}/{COMPLETE_MARKER}")
    return Path(location).exists()


def publish_store(staging: str | Path, final: str | Path) -> None:
    """Make the finished store at ``staging`` the one at ``final`` (see
    :func:`staging_location`): one rename, or the completion marker written last."""
    if is_url(final):
        stamp = {"complete": True, "code_version": __version__, "time": time.time()}
        remote.write_bytes(f"{str(final).rstrip('/')}/{COMPLETE_MARKER}",
                           json.dumps(stamp).encode())  # fmt: skip
    else:
        os.replace(staging, final)


def unpublish_store(location: str | Path) -> None:
    """Make a store on object storage count as unfinished again (its marker removed) before
    it is rewritten in place; a local store needs nothing."""
    if is_url(location):
        remote.delete(f"{str(location).rstrip('/')}/{COMPLETE_MARKER}")


def remove_store(location: str | Path) -> None:
    """Remove the store at ``location`` (a directory, or every object under a prefix)."""
    if is_url(location):
        remote.remove_prefix(str(location).rstrip("/"))
    else:
        remove_tree(Path(location))


def _codecs(level: int) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=level, shuffle="bitshuffle")


class SceneStore:
    """A scene store opened from ``path``.

    Use :meth:`create` for a new store and :meth:`open` for an existing one.
    """

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        #: a local directory, or the URL of a store on object storage
        self.path: Path | str = str(path) if is_url(path) else Path(path)
        self.group = group
        self._arrays: dict[str, zarr.Array] = {}
        self._writers: dict[str, ChunkWriter | None] = {}

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(  # noqa: PLR0913 (keyword-only store options)
        cls,
        path: str | Path,
        *,
        bands: Iterable[str],
        height: int,
        width: int,
        dtype: str | np.dtype[Any],
        chunk: int = 512,
        shard: int | None = None,
        compression_level: int = 3,
        nodata: float | None = None,
        georef: GeoRef | None = None,
        slide: SlideInfo | None = None,
        source: SourceRecord | None = None,
        classes: Iterable[ClassDef] = (),
        ignore_index: int = 255,
        valid_fill: bool = False,
    ) -> SceneStore:
        """Create an empty store with its ``image`` and ``valid`` arrays and attributes.

        ``path`` must not hold a store yet (an existing directory without one is used).
        ``valid_fill`` is the fill value of ``valid``: a chunk equal to it is not stored, so
        ingest, which writes every unit, uses True and stores only the chunks that the
        footprint's edge crosses (most of an image is inside it).
        """
        p, target = _location(path, write=True)
        if store_exists(p) or (isinstance(p, Path) and p.is_file()):
            raise StoreError(f"store already exists: {str(p)!r}: remove it or choose another --out")
        band_names = tuple(bands)
        grid = BlockGrid(height, width, shard or chunk)
        # "a": the directory may already hold our own non-Zarr files (checked above: no group)
        group = zarr.open_group(target, mode="a", zarr_format=3)
        meta: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "code_version": __version__,
            "source": asdict(source) if source else None,
            "georef": asdict(georef) if georef else None,
            "slide": asdict(slide) if slide else None,
            "bands": list(band_names),
            "nodata": nodata,
            "classes": [c.model_dump() for c in classes],
            "ignore_index": ignore_index,
            "chunk": chunk,
            "shard": shard,
            "compression_level": compression_level,
            "height": height,
            "width": width,
            "arrays": {},
        }
        attrs: dict[str, Any] = {"segflow": meta}
        if georef is not None:
            attrs.update(_geozarr_attrs(georef, height, width))
        group.attrs.update(attrs)
        store = cls(p, group)
        if georef is not None:
            store._write_spatial_ref(georef, height, width)
        store.create_array("image", dtype=dtype, fill_value=nodata or 0, bands=len(band_names))
        store.create_array("valid", dtype=bool, fill_value=valid_fill)
        log.debug(
            "created store %s (%d x %d, %d bands, grid %s)",
            p,
            height,
            width,
            len(band_names),
            grid.shape_in_blocks,
        )
        return store

    @classmethod
    def open(cls, path: str | Path, *, mode: str = "r", unfinished: bool = False) -> SceneStore:
        """Open an existing store (``mode`` ``"r"`` or ``"r+"``).

        A store on object storage opens only once complete (its :data:`COMPLETE_MARKER`
        exists), unless ``unfinished`` (its builder resuming it).
        """
        p, target = _location(path, write=mode != "r")
        if isinstance(p, str) and not unfinished and not store_complete(p) and store_exists(p):
            raise StoreError(f"the store at {p!r} is unfinished: re-run ingest to finish it")
        if not store_exists(p):
            hint = (
                f" (an unfinished one is at {str(staging_path(p))!r}: re-run ingest to finish it)"
                if isinstance(p, Path) and staging_path(p).exists()
                else ": run flows/ingest.py first"
            )
            raise StoreError(f"no scene store at {str(p)!r}{hint}")
        # consolidated metadata is for readers like xarray; segflow reads the real metadata,
        # so arrays added after the last consolidation are always seen
        group = zarr.open_group(target, mode=mode, zarr_format=3, use_consolidated=False)  # type: ignore[arg-type]
        if "segflow" not in group.attrs:
            raise StoreError(f"{str(p)!r} is a Zarr group but not a segflow scene store")
        return cls(p, group)

    # --------------------------------------------------------------- attributes
    @property
    def meta(self) -> dict[str, Any]:
        """The ``segflow`` attribute dictionary (a copy)."""
        return dict(self.group.attrs["segflow"])  # type: ignore[arg-type]

    def update_meta(self, **values: Any) -> None:
        """Merge ``values`` into the ``segflow`` attribute (coordinator only)."""
        meta = self.meta
        meta.update(values)
        self.group.attrs["segflow"] = meta
        self.consolidate()  # an attribute write drops the consolidated listing: renew it for xarray

    @property
    def height(self) -> int:
        return int(self.meta["height"])

    @property
    def width(self) -> int:
        return int(self.meta["width"])

    @property
    def chunk(self) -> int:
        return int(self.meta["chunk"])

    @property
    def write_unit(self) -> int:
        """Side of the unit one writer owns: the shard when sharded, else the chunk."""
        return int(self.meta["shard"] or self.meta["chunk"])

    @property
    def grid(self) -> BlockGrid:
        """The grid of write units over the level-0 pixels."""
        return BlockGrid(self.height, self.width, self.write_unit)

    @property
    def georef(self) -> GeoRef | None:
        g = self.meta.get("georef")
        if not g:
            return None
        return GeoRef(crs_wkt=g["crs_wkt"], epsg=g["epsg"], geotransform=tuple(g["geotransform"]))

    @property
    def slide(self) -> SlideInfo | None:
        s = self.meta.get("slide")
        return SlideInfo(**s) if s else None

    @property
    def classes(self) -> tuple[ClassDef, ...]:
        return tuple(ClassDef.model_validate(c) for c in self.meta.get("classes", []))

    @property
    def ignore_index(self) -> int:
        return int(self.meta.get("ignore_index", 255))

    # ------------------------------------------------------------------- arrays
    def has(self, name: str) -> bool:
        """Whether array ``name`` exists *and* is recorded complete."""
        return bool(self.meta["arrays"].get(name, {}).get("complete"))

    def array(self, name: str) -> zarr.Array:
        """The Zarr array ``name`` (e.g. ``"image"``, ``"prediction/labels"``).

        Opened arrays are kept by this object (opening reads metadata from the store).
        """
        if name in self._arrays:
            return self._arrays[name]
        try:
            node = self.group[name]
        except KeyError:
            raise StoreError(
                f"store {str(self.path)!r} has no array {name!r}: "
                f"it has {sorted(self.meta['arrays'])}"
            ) from None
        assert isinstance(node, zarr.Array)
        self._arrays[name] = node
        return node

    def create_array(
        self,
        name: str,
        *,
        dtype: str | np.dtype[Any] | type,
        fill_value: Any = 0,
        bands: int | None = None,
        dims: tuple[str, ...] | None = None,
        attrs: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> zarr.Array:
        """Create a 2-D (y, x) array, or 3-D (``bands``, y, x), on the store's grid."""
        self._arrays.pop(name, None)
        self._writers.pop(name, None)
        dims = dims or ARRAY_DIMS.get(name) or (("band", "y", "x") if bands else ("y", "x"))
        h, w, c = self.height, self.width, self.chunk
        shape: tuple[int, ...] = (h, w)
        chunks: tuple[int, ...] = (min(c, h), min(c, w))
        shards: tuple[int, ...] | None = None
        if self.meta["shard"]:
            s = int(self.meta["shard"])
            # a shard must be a whole multiple of the chunk, also when the image is smaller
            shards = (
                -(-min(s, h) // chunks[0]) * chunks[0],
                -(-min(s, w) // chunks[1]) * chunks[1],
            )
        if bands is not None:
            shape, chunks = (bands, *shape), (bands, *chunks)
            # a band-less image (a prediction store's) has no chunks to group
            shards = (bands, *shards) if shards and bands else None
        all_attrs: dict[str, Any] = dict(attrs or {})
        if self.meta.get("georef"):
            all_attrs.setdefault("grid_mapping", "spatial_ref")
            all_attrs.setdefault("coordinates", "spatial_ref")
        arr = zarr.create_array(
            store=self.group.store,
            name=f"{self.group.path}/{name}".lstrip("/") if self.group.path else name,
            shape=shape,
            chunks=chunks,
            shards=shards,
            dtype=dtype,
            fill_value=fill_value,
            compressors=_codecs(int(self.meta.get("compression_level", 3))),
            dimension_names=dims,
            attributes=all_attrs,
            zarr_format=3,
            overwrite=overwrite,
        )
        return arr

    def write_window(self, name: str, window: Window, data: np.ndarray) -> None:
        """Write ``data`` at ``window`` of array ``name``; the window must be whole write units.

        Whole units (clipped at the image edge) keep one writer per chunk/shard, the rule that
        prevents the silent data loss described in FIELD-NOTES.md.
        """
        u = self.write_unit
        aligned = (
            window.row_off % u == 0
            and window.col_off % u == 0
            and (window.height % u == 0 or window.row_stop == self.height)
            and (window.width % u == 0 or window.col_stop == self.width)
        )
        if not aligned:
            raise StoreError(f"write to {name!r} at {window} is not aligned to {u}-pixel units")
        writer = self._chunk_writer(name)
        if writer is not None:  # Zarr's own path costs more than the codec (segflow.io.chunks)
            lead = (0,) * (data.ndim - 2)
            write_chunks(writer, (*lead, window.row_off, window.col_off), data)
        else:
            self.array(name)[(..., *window.slices)] = data

    def _chunk_writer(self, name: str) -> ChunkWriter | None:
        """The direct chunk writer of array ``name`` (local, unsharded stores), once."""
        if name not in self._writers:
            here = self.path if isinstance(self.path, Path) else None
            self._writers[name] = chunk_writer(self.array(name), here / name) if here else None
        return self._writers[name]

    def record_array(self, name: str, **params: Any) -> None:
        """Record array ``name`` complete, with how it was made (coordinator only)."""
        arrays = dict(self.meta["arrays"])
        arrays[name] = {"complete": True, "code_version": __version__, "params": params}
        self.update_meta(arrays=arrays)

    def forget_array(self, name: str) -> None:
        """Mark ``name`` incomplete (before it is rewritten)."""
        arrays = dict(self.meta["arrays"])
        arrays.pop(name, None)
        self.update_meta(arrays=arrays)

    def array_params(self, name: str) -> dict[str, Any] | None:
        rec = self.meta["arrays"].get(name)
        return dict(rec["params"]) if rec else None

    # ----------------------------------------------------------------- progress
    def progress(self, name: str, *, group: tuple[int, int] = (1, 1)) -> Progress:
        """The progress record of array ``name`` (created on first use).

        ``group``: the units (rows, columns) one marker file holds, used when the record is
        created. (1, 1) lets any number of writers mark units at once; a single coordinator
        that marks whole groups (ingest, one task at a time) writes fewer files with more.
        """
        return Progress(self, name, group=group)

    def consolidate(self) -> None:
        """Write consolidated metadata so ``xarray.open_zarr`` opens without listing."""
        with (
            warnings.catch_warnings()
        ):  # "not part of the v3 spec": xarray reads it, we rely on nothing else
            warnings.simplefilter("ignore", UserWarning)
            zarr.consolidate_metadata(self.group.store, path=self.group.path)

    # ------------------------------------------------------------------ helpers
    def _write_spatial_ref(self, georef: GeoRef, height: int, width: int) -> None:
        gt = georef.geotransform
        cf: dict[str, Any] = {
            "crs_wkt": georef.crs_wkt,
            "spatial_ref": georef.crs_wkt,
            "GeoTransform": " ".join(repr(float(v)) for v in gt),
        }
        ref = zarr.create_array(
            store=self.group.store,
            name="spatial_ref",
            shape=(),
            dtype="int64",
            fill_value=0,
            dimension_names=(),
            attributes=cf,
            zarr_format=3,
        )
        ref[...] = 0
        # pixel-centre coordinates (north-up grids); rioxarray reads GeoTransform first
        x = gt[0] + (np.arange(width) + 0.5) * gt[1]
        y = gt[3] + (np.arange(height) + 0.5) * gt[5]
        for name, values, dim in (("x", x, "x"), ("y", y, "y")):
            arr = zarr.create_array(
                store=self.group.store,
                name=name,
                shape=values.shape,
                chunks=(min(len(values), 65536),),
                dtype="float64",
                fill_value=0.0,
                dimension_names=(dim,),
                zarr_format=3,
                attributes={"axis": dim.upper()},
            )
            arr[:] = values


def _location(path: str | Path, *, write: bool) -> tuple[Path | str, Any]:
    """A store's location (absolute local path, or URL) and what zarr opens for it."""
    text = check_location(path, what="scene store", write=write)
    if is_url(text):
        return text, zarr_store(text, read_only=not write)
    p = Path(text).absolute()  # Dask workers may run in another directory
    return p, str(p)


def _geozarr_attrs(georef: GeoRef, height: int, width: int) -> dict[str, Any]:
    """GeoZarr ``proj:`` / ``spatial:`` convention attributes."""
    from affine import Affine

    a = Affine.from_gdal(*georef.geotransform)
    out: dict[str, Any] = {
        "proj:wkt2": georef.crs_wkt,
        "spatial:transform": [a.a, a.b, a.c, a.d, a.e, a.f],
        "spatial:shape": [height, width],
        "spatial:dimensions": ["y", "x"],
    }
    if georef.epsg is not None:
        out["proj:code"] = f"EPSG:{georef.epsg}"
    return out


class Progress:
    """Which write units of one array are finished (one marker element per unit)."""

    def __init__(self, store: SceneStore, name: str, *, group: tuple[int, int] = (1, 1)) -> None:
        self._store = store
        self.name = name
        rows, cols = store.grid.shape_in_blocks
        key = f"{_PROGRESS}/{name}"
        try:
            node = store.group[key]
            assert isinstance(node, zarr.Array)
            self._arr = node
        except KeyError:
            self._arr = zarr.create_array(
                store=store.group.store,
                name=key,
                shape=(rows, cols),
                chunks=(min(group[0], rows), min(group[1], cols)),
                dtype="uint8",
                fill_value=0,
                compressors=None,
                zarr_format=3,
            )
        # a mark is a 1-byte chunk file: written directly, not through Zarr's event loop
        self._writer = store._chunk_writer(key)

    def done(self) -> set[BlockIndex]:
        """The finished units."""
        marks = np.asarray(self._arr[...])
        return {BlockIndex(int(r), int(c)) for r, c in zip(*np.nonzero(marks), strict=True)}

    def mark(self, index: BlockIndex) -> None:
        """Record unit ``index`` finished (call after its data is written)."""
        self._mark(index.row, index.col, 1, 1)

    def mark_many(self, indices: Iterable[BlockIndex]) -> None:
        """Record several units finished; a full rectangle of units is one (concurrent) write."""
        units = sorted(set(indices))
        if not units:
            return
        rows = [u.row for u in units]
        cols = [u.col for u in units]
        r0, r1, c0, c1 = min(rows), max(rows) + 1, min(cols), max(cols) + 1
        if (r1 - r0) * (c1 - c0) == len(units):
            self._mark(r0, c0, r1 - r0, c1 - c0)
        else:
            for u in units:
                self.mark(u)

    def _mark(self, row: int, col: int, rows: int, cols: int) -> None:
        """Mark a rectangle of units: whole marker chunks directly on local disk, else
        through Zarr (which reads and rewrites a partly marked chunk)."""
        w = self._writer
        if w is not None and whole_chunks(w, (row, col), (rows, cols)):
            write_chunks(w, (row, col), np.ones((rows, cols), np.uint8))
        else:
            self._arr[row : row + rows, col : col + cols] = 1

    def reset(self) -> None:
        """Forget all progress (before an array is rebuilt from scratch)."""
        self._arr[...] = 0


def remove_tree(path: Path) -> None:
    """Remove a store directory if it exists."""
    if path.exists():
        shutil.rmtree(path)
