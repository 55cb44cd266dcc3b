"""Which scene stores a training run reads: the ``train.stores`` section (its entry forms are
described in :mod:`segflow.config.train`), and the held-out validation split.
"""

from __future__ import annotations

import glob
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, model_validator

from segflow.config.base import SchemaModel

__all__ = ["SplitConfig", "StoreRef", "StoresConfig"]


class StoreRef(SchemaModel):
    """One scene store, and optionally where it is built from (source image + labels).

    Attributes
    ----------
    store
        Path of the scene store (a Zarr directory). Training needs its ``image``,
        ``labels``, a fingerprint (``normalization: zscore``) and ``weights``
        (``pixel_weighted_ce``); a validation store needs ``image`` and ``labels``.
    source
        Image to build the store from: ``flows/train.py`` ingests it when the store is
        missing, with the pipeline's ``ingest`` section (this path replacing
        ``ingest.source``), and prepares it with ``prepare`` unless current
        (``flows/pipeline.py`` builds none). Null: the store must exist, prepared.
    labels
        Label file for ``source``; it replaces ``ingest.labels`` (null builds a store
        without labels, which cannot train).
    instances
        Raster of object ids (0 = none) for ``source``, giving prepare's border weights the
        objects (e.g. touching nuclei) that class labels cannot separate; it replaces
        ``ingest.instances``. Null: ``ingest.instances`` for the ingest source itself, else
        objects derived from the labels.
    """

    store: Annotated[str, Field(min_length=1)]
    source: str | None = None
    labels: str | None = None
    instances: str | None = None


def _sources(e: Mapping[str, Any]) -> list[str]:
    """The images a ``glob:`` or ``list:`` entry names, in order (a list's relative paths:
    from its folder)."""
    if "glob" in e:
        found = sorted(glob.glob(str(e["glob"]), recursive=True))
        if not found:
            raise ValueError(f"glob {e['glob']!r} matches no file")
        return found
    listing = Path(str(e["list"]))
    if not listing.is_file():
        raise ValueError(f"list {str(listing)!r} does not exist")
    lines = [ln.strip() for ln in listing.read_text().splitlines()]
    return [str(listing.parent / ln) for ln in lines if ln and not ln.startswith("#")]


def _stem(path: str) -> str:
    return Path(path).name.split(".", 1)[0]


def _expand(entries: Any) -> Any:
    """Expand ``ids: [start, stop]``, ``glob:`` and ``list:`` entries and plain strings into
    StoreRef mappings."""
    if not isinstance(entries, list | tuple):
        return entries
    out: list[Any] = []
    for e in entries:
        if isinstance(e, str):
            out.append({"store": e})
        elif isinstance(e, Mapping) and ("glob" in e or "list" in e):
            if "store" not in e:
                raise ValueError("a glob: or list: entry needs store: with {stem}")
            rest = {k: v for k, v in e.items() if k not in ("glob", "list")}
            for source in _sources(e):
                fields = {k: v.format(stem=_stem(source)) if isinstance(v, str) else v
                          for k, v in rest.items()}  # fmt: skip
                out.append({**fields, "source": source})
        elif isinstance(e, Mapping) and "ids" in e:
            ids = e["ids"]
            if (
                not isinstance(ids, list | tuple)
                or len(ids) != 2
                or not all(isinstance(i, int) for i in ids)
                or ids[1] <= ids[0]
            ):
                raise ValueError(f"ids must be [start, stop] with stop > start, got {ids!r}")
            rest = {k: v for k, v in e.items() if k != "ids"}
            for i in range(ids[0], ids[1]):
                out.append({k: v.format(i=i) if isinstance(v, str) else v for k, v in rest.items()})
        else:
            out.append(e)
    return out


class SplitConfig(SchemaModel):
    """A spatially blocked train/validation split of each train store.

    Attributes
    ----------
    block
        Side (pixels) of the square blocks each train store is cut into, numbered
        row-major from 0; larger blocks make validation less correlated with training.
    val_every
        Block ``k`` is validation when ``k % val_every == val_every - 1`` (one block in
        ``val_every``). Give ``prepare.train_region`` the same ``block`` and
        ``holdout_every`` so normalization and class weights leave these blocks out.
    margin
        Minimum distance (pixels, Chebyshev) between training patch centres and validation
        pixels, minus one. Null: ``patch // 2``, so no patch covers validation pixels; add
        about ``3 * augment.elastic.sigma`` to keep the elastic context clear as well.
    """

    block: Annotated[int, Field(gt=0)]
    val_every: Annotated[int, Field(ge=2)]
    margin: Annotated[int, Field(ge=0)] | None = None


class StoresConfig(SchemaModel):
    """Which stores train and validate (entry forms: see **Data** above).

    Attributes
    ----------
    train
        Stores patches are sampled from (at least one); a string, a ``StoreRef`` mapping,
        an ``ids: [start, stop]`` template expanded over ``{i}``, or a ``glob:`` pattern or
        ``list:`` file of source images with ``store`` (and ``labels``, ``instances``)
        templates over each image's ``{stem}``: ``{glob: tiles/*.tif, store:
        stores/{stem}.zarr, labels: labels/{stem}.geojson}``; ``flows/train.py`` builds the
        missing stores in parallel.
    val
        Stores validated whole (every labelled, valid pixel), never sampled; same entry
        forms. Exclusive with ``split``; with neither there is no validation, so no
        ``best`` checkpoint and no early stopping.
    split
        Hold out blocks of every train store for validation instead of ``val`` stores.
    """

    train: tuple[StoreRef, ...]
    val: tuple[StoreRef, ...] = ()
    split: SplitConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _expand_entries(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data = dict(data)
            for key in ("train", "val"):
                if key in data:
                    data[key] = _expand(data[key])
        return data

    @model_validator(mode="after")
    def _check(self) -> StoresConfig:
        if not self.train:
            raise ValueError("stores.train must list at least one store")
        if self.val and self.split is not None:
            raise ValueError("give either stores.val or stores.split, not both")
        return self
