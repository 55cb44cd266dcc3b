"""The prediction store: where ``prediction/probabilities`` and ``prediction/labels`` are
written, in write units (chunks or shards) sized to a memory budget.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from segflow.config import ClassDef
from segflow.errors import StoreError
from segflow.geometry import Window
from segflow.infer.options import InferenceOptions
from segflow.infer.readers import WindowReader
from segflow.io.remote import check_location, is_url
from segflow.io.store import (
    GeoRef,
    SceneStore,
    SlideInfo,
    SourceRecord,
    remove_store,
    staging_location,
    store_complete,
    store_exists,
)

__all__ = [
    "LABELS",
    "PROBABILITIES",
    "UNIT_BUDGET_BYTES",
    "open_prediction_store",
    "prediction_arrays",
    "prediction_unit",
]


PROBABILITIES = "prediction/probabilities"
LABELS = "prediction/labels"
_META_KEY = "prediction_store"  # set on standalone prediction stores (source window)
_RUN_KEY = "prediction_run"  # parameters of the prediction being written


def prediction_arrays(options: InferenceOptions) -> list[str]:
    """The arrays a prediction with ``options`` writes; the first one's progress record says
    which units are done."""
    return [
        name
        for name, kind in ((LABELS, "labels"), (PROBABILITIES, "probabilities"))
        if options.output in (kind, "both")
    ]


# ----------------------------------------------------------------------------- stores
#: Largest memory one open unit's buffers may take in :func:`prediction_unit`.
UNIT_BUDGET_BYTES = 32 * 2**20


def prediction_unit(options: InferenceOptions, *, chunk: int, num_classes: int) -> int:
    """Side of a prediction store's write unit (its shard): ``chunk`` doubled up to 2048.

    Each unit costs one Zarr write per array and one progress mark, each a trip through
    Zarr's event loop, and with one 512-pixel chunk per unit those trips were most of the
    writer's CPU (labels and mask of 8192^2 pixels: 2.4-2.9 CPU s in 512-pixel units, 0.8-1.1
    in 2048-pixel shards; segment_region of 16384^2 with the demo's U-Net: 49.6 s -> 40 s).
    A larger unit holds more memory open (the accumulators of a few unit rows of a strip),
    so the side is the largest whose buffers fit :data:`UNIT_BUDGET_BYTES` (the valid mask,
    and class ids, or float32 class sums and weights when probabilities are blended or
    written) and that is at most two output tiles wide (a killed run loses little).
    """
    per_pixel = 1 + (4 if options.labels_only else 4 * max(num_classes, 2) + 4)
    cap = min(2048, 2 * max(options.tile, chunk))
    side = chunk
    while 2 * side <= cap and (2 * side) ** 2 * per_pixel <= UNIT_BUDGET_BYTES:
        side *= 2
    return side


def open_prediction_store(
    path: str | Path,
    region: Window,
    *,
    chunk: int = 512,
    shard: int | None = None,
    georef: GeoRef | None = None,
    slide: SlideInfo | None = None,
    source: SourceRecord | None = None,
    classes: Sequence[ClassDef] = (),
    ignore_index: int = 255,
) -> SceneStore:
    """A standalone prediction store for ``region`` of a source image (e.g. a GeoTIFF).

    A scene store whose pixel grid is the region (``georef`` is the *source's* georeference;
    the store gets the region's own geotransform), with no image bands, so exporters read it
    like any scene store. ``meta["prediction_store"]["source_window"]`` records where the
    region lies in the source. Returns the finished store at ``path`` if there is one,
    else the unfinished one at ``path.partial`` (resumed), else a new one there;
    :func:`predict_region` moves it to ``path`` once every unit is done. On object storage
    the store is built at ``path`` itself and completed by its marker
    (:func:`~segflow.io.store.publish_store`).
    """
    window = {
        "row_off": region.row_off,
        "col_off": region.col_off,
        "height": region.height,
        "width": region.width,
    }
    here = check_location(path, what="prediction store", write=True)
    p = here if is_url(here) else Path(here)
    stage = staging_location(p)
    for candidate in (stage,) if isinstance(p, str) else (p, stage):
        if not store_exists(candidate):
            continue
        store = _set_up(candidate, unfinished=candidate != p or not store_complete(p))
        if store is None:
            break
        got = store.meta.get(_META_KEY, {}).get("source_window")
        if got != window:
            raise StoreError(
                f"{str(candidate)!r} holds predictions for source window {got}, not {window}: "
                "remove it or choose another output path"
            )
        return store
    if isinstance(stage, Path) and stage.exists():
        shutil.rmtree(stage)  # a staging directory without metadata: nothing to resume
    store = SceneStore.create(
        stage,
        bands=(),
        height=region.height,
        width=region.width,
        dtype="uint8",
        chunk=chunk,
        shard=shard,
        georef=georef[region] if georef else None,
        slide=slide,
        source=source,
        classes=classes,
        ignore_index=ignore_index,
    )
    store.update_meta(**{_META_KEY: {"source_window": window}})
    return store


def _set_up(location: str | Path, *, unfinished: bool) -> SceneStore | None:
    """The prediction store at ``location``, or None where an ``unfinished`` one was killed
    before its set-up ended (its source window is recorded last): removed, nothing to resume."""
    try:
        store: SceneStore | None = SceneStore.open(location, mode="r+", unfinished=True)
    except StoreError:  # a Zarr group without segflow's attributes yet
        if not unfinished:
            raise
        store = None
    if store is None or (unfinished and _META_KEY not in store.meta):
        remove_store(location)
        return None
    return store


def _store_origin(store: SceneStore, reader: WindowReader) -> tuple[int, int]:
    """Image coordinates of the store's pixel (0, 0)."""
    rec = store.meta.get(_META_KEY)
    if rec:
        w = rec["source_window"]
        return int(w["row_off"]), int(w["col_off"])
    if (store.height, store.width) != (reader.height, reader.width):
        raise StoreError(
            f"store {str(store.path)!r} is {store.height} x {store.width} pixels but the image is "
            f"{reader.height} x {reader.width}: predict into the image's own scene store or a "
            "prediction store made by open_prediction_store()"
        )
    return 0, 0
