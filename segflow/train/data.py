"""Training patches from scene stores: sampling, reading with mirror padding, the Dataset.

Nothing here reads a whole scene. The pieces, from pure to I/O:

- :func:`read_window`: any window of a store array, mirrored (numpy ``reflect``:
  ``d c b | a b c d``, the plan :func:`segflow.tiling.mirror_plan` inference uses) where it
  leaves the scene, read as the bounding box of the pixels it needs (a few chunks).
- :class:`SceneInfo` / :func:`scan_scenes`: what the sampler needs to know about each train
  store: size, chunk, the training region (whole scene, or the train part of a blocked
  split, eroded by a margin) and, per chunk, the number of eligible patch centres of each
  class (a cheap pass over the labels, one chunk at a time). Built once, before training.
- :class:`PatchSampler`: patch ``k`` of epoch ``e`` -> ``(scene, row, col)``, a pure
  function of ``(seed, e, k)`` (its own :class:`numpy.random.Generator` per patch, from
  ``SeedSequence([seed, e, k])``), so a resumed run or any DDP rank draws exactly the
  patches an uninterrupted single-process run would. ``random``: a chunk with probability
  proportional to its eligible pixels, then a pixel within it; ``class_balanced``: a class
  with the configured probabilities (renormalised over the classes present), a chunk
  proportional to that class's count, then a pixel of that class within the chunk.
- :class:`PatchDataset`: a map-style ``torch.utils.data.Dataset`` over *global* patch
  indices ``g = e * epoch_len + k``; it opens its stores lazily in each DataLoader worker.
  :class:`StepBatchSampler` yields, for every step, this rank's slice of the global batch.

Examples
--------
>>> read_window(np.arange(4)[None], Window(0, -3, 1, 9), height=1, width=4).tolist()
[[3, 2, 1, 0, 1, 2, 3, 2, 1]]
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from segflow.config import ClassDef, TrainRegion
from segflow.config.train import AugmentConfig, SamplingConfig, SplitConfig
from segflow.errors import ConfigError, LabelError, StoreError
from segflow.geometry import Window
from segflow.io.store import SceneStore
from segflow.normalization import Normalization
from segflow.stats import train_mask_for_window
from segflow.tiling import mirror_plan
from segflow.train.augment import augment_patch

__all__ = [
    "Normalization",
    "PatchDataset",
    "PatchSampler",
    "SceneInfo",
    "StepBatchSampler",
    "check_store",
    "eligible_mask",
    "read_window",
    "scan_scenes",
    "split_region",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- reading
def read_window(arr: Any, window: Window, *, height: int, width: int) -> np.ndarray:
    """Read ``window`` of a (…, y, x) array, mirrored (``reflect``) outside ``height x width``.

    Reads only the bounding box of the source pixels the window needs. Equals
    ``np.pad(a, pad, mode="reflect")[..., window]`` for any window.
    """
    # the same mirror plan as inference (segflow.tiling): one convention in both
    plan = mirror_plan(window, height, width)
    return plan.take(np.asarray(arr[(..., *plan.source.slices)]))


# --------------------------------------------------------------------------- regions
def split_region(split: SplitConfig | None) -> TrainRegion | None:
    """The :class:`TrainRegion` (stats convention) of a blocked split (None: whole scene)."""
    if split is None:
        return None
    return TrainRegion(block=split.block, holdout_every=split.val_every)


def eligible_mask(
    region: TrainRegion | None, window: Window, *, image_shape: tuple[int, int], margin: int
) -> np.ndarray:
    """Pixels of ``window`` that may be patch centres: in the training region and at least
    ``margin + 1`` pixels (Chebyshev) from every held-out pixel inside the image."""
    if region is None:
        return np.ones(window.shape, bool)
    h, w = image_shape
    outer = window.pad(margin).intersection(Window(0, 0, h, w))
    held = ~train_mask_for_window(region, outer, image_shape=image_shape)
    if margin > 0 and held.any():
        held = ndimage.maximum_filter(held, size=2 * margin + 1, mode="constant", cval=False)
    inner = window.relative_to(outer)
    return np.asarray(~held[inner.slices])


@dataclass(frozen=True)
class SceneInfo:
    """What the sampler knows about one train store (no open handles: cheap to pickle).

    ``counts[i, j, c]`` is the number of eligible labelled pixels of class ``c`` in chunk
    ``(i, j)``; ``eligible[i, j]`` the number of eligible pixels (labelled or not).
    """

    path: str
    height: int
    width: int
    chunk: int
    region: TrainRegion | None
    margin: int
    counts: np.ndarray
    eligible: np.ndarray

    def chunk_window(self, i: int, j: int) -> Window:
        r0, c0 = i * self.chunk, j * self.chunk
        return Window.from_bounds(
            r0, c0, min(r0 + self.chunk, self.height), min(c0 + self.chunk, self.width)
        )


def check_store(
    store: SceneStore,
    *,
    in_channels: int,
    classes: Sequence[ClassDef] | None,
    out_channels: int,
    need_weights: bool,
) -> None:
    """Validate a store for training; one-line errors naming the store, value and fix."""
    p = str(store.path)
    for name in ("image", "labels"):
        if not store.has(name):
            raise StoreError(
                f"store {p!r} has no complete {name!r} array: run flows/ingest.py with labels"
            )
    bands = int(store.array("image").shape[0])
    if bands != in_channels:
        raise ConfigError(
            f"store {p!r} has {bands} image bands {store.meta.get('bands')} but the model takes "
            f"in_channels={in_channels}: set model.in_channels to {bands} or use matching stores"
        )
    if need_weights and not store.has("weights"):
        raise StoreError(
            f"the loss needs pixel weights but store {p!r} has no complete 'weights' array: "
            "run flows/prepare.py on it or choose a loss without pixel weights"
        )
    ids = {c.id for c in store.classes}
    if classes is not None:
        want = {c.id for c in classes}
        if ids and ids != want:
            raise LabelError(
                f"store {p!r} has class ids {sorted(ids)} but the config has {sorted(want)}: "
                "re-ingest with the pipeline's class table or fix the config classes"
            )
        ids = want
    bad = sorted(i for i in ids if i >= out_channels)
    if bad:
        raise LabelError(
            f"class ids {bad} of store {p!r} do not fit model.out_channels={out_channels}: "
            f"use ids 0..{out_channels - 1} or set out_channels to {max(ids) + 1}"
        )


def _scan_one(
    store: SceneStore, region: TrainRegion | None, margin: int, n_classes: int
) -> SceneInfo:
    h, w, c = store.height, store.width, store.chunk
    rows, cols = -(-h // c), -(-w // c)
    counts = np.zeros((rows, cols, n_classes), np.int64)
    eligible = np.zeros((rows, cols), np.int64)
    labels = store.array("labels")
    valid = store.array("valid") if store.has("valid") else None
    ignore = store.ignore_index
    for i in range(rows):
        for j in range(cols):
            win = Window.from_bounds(i * c, j * c, min((i + 1) * c, h), min((j + 1) * c, w))
            mask = eligible_mask(region, win, image_shape=(h, w), margin=margin)
            if valid is not None:
                mask &= np.asarray(valid[win.slices], bool)
            eligible[i, j] = int(mask.sum())
            if not eligible[i, j]:
                continue
            lab = np.asarray(labels[win.slices])[mask]
            lab = lab[lab != ignore]
            if lab.size and int(lab.max()) >= n_classes:
                raise LabelError(
                    f"store {str(store.path)!r} has label {int(lab.max())} at chunk {(i, j)}, "
                    f"outside the class table (ids 0..{n_classes - 1}, ignore {ignore}): fix the "
                    "labels or the class table"
                )
            counts[i, j] = np.bincount(lab, minlength=n_classes)[:n_classes]
    return SceneInfo(str(store.path), h, w, c, region, margin, counts, eligible)


def scan_scenes(
    paths: Sequence[str | Path],
    *,
    n_classes: int,
    split: SplitConfig | None = None,
    margin: int = 0,
) -> list[SceneInfo]:
    """One pass over the labels of each train store, chunk by chunk (see :class:`SceneInfo`).

    Raises :class:`LabelError` for labels outside ``0..n_classes-1`` (besides the store's
    ignore_index) and :class:`ConfigError` if no eligible pixel is left.
    """
    region = split_region(split)
    infos = [_scan_one(SceneStore.open(p), region, margin, n_classes) for p in paths]
    if sum(int(s.eligible.sum()) for s in infos) == 0:
        raise ConfigError(
            f"no pixel of the train stores can be a patch centre (split {split}, margin "
            f"{margin}): use larger stores, a larger split.val_every or a smaller margin"
        )
    return infos


# --------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class PatchSampler:
    """Patch centres as a pure function of ``(seed, epoch, k)`` (see the module docstring)."""

    scenes: tuple[SceneInfo, ...]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        w_chunks = np.concatenate([s.eligible.ravel() for s in self.scenes]).astype(np.float64)
        object.__setattr__(self, "_chunk_p", w_chunks / w_chunks.sum())
        table = [
            (si, i, j)
            for si, s in enumerate(self.scenes)
            for i in range(s.eligible.shape[0])
            for j in range(s.eligible.shape[1])
        ]
        object.__setattr__(self, "_table", table)
        per_class = np.concatenate(
            [s.counts.reshape(-1, s.counts.shape[-1]) for s in self.scenes]
        ).astype(np.float64)
        object.__setattr__(self, "_per_class", per_class)
        n = per_class.shape[1]
        totals = per_class.sum(axis=0)
        if self.sampling.mode == "class_balanced":
            want = (
                np.ones(n)
                if self.sampling.class_probs is None
                else np.array([self.sampling.class_probs.get(c, 0.0) for c in range(n)])
            )
            extra = sorted(set(self.sampling.class_probs or {}) - set(range(n)))
            if extra:
                raise ConfigError(
                    f"sampling.class_probs names classes {extra} outside 0..{n - 1}: remove them"
                )
            want = np.where(totals > 0, want, 0.0)
            if want.sum() <= 0:
                raise ConfigError(
                    f"class-balanced sampling: none of the requested classes occurs in the "
                    f"training pixels (counts {totals.astype(int).tolist()}): change class_probs"
                )
            object.__setattr__(self, "_class_p", want / want.sum())

    @property
    def class_probabilities(self) -> np.ndarray | None:
        """The class probabilities actually used (class-balanced mode)."""
        return getattr(self, "_class_p", None)

    def rng(self, epoch: int, k: int) -> np.random.Generator:
        """The generator of patch ``k`` of ``epoch`` (also used for its augmentation)."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, epoch, k]))

    def centre(
        self, epoch: int, k: int, rng: np.random.Generator | None = None
    ) -> tuple[int, int, int]:
        """``(scene index, row, col)`` of patch ``k`` of ``epoch``."""
        rng = rng if rng is not None else self.rng(epoch, k)
        cls: int | None = None
        if self.sampling.mode == "class_balanced":
            cls = int(rng.choice(len(self._class_p), p=self._class_p))  # type: ignore[attr-defined]
            w = self._per_class[:, cls]  # type: ignore[attr-defined]
            ci = int(rng.choice(len(w), p=w / w.sum()))
        else:
            ci = int(rng.choice(len(self._chunk_p), p=self._chunk_p))  # type: ignore[attr-defined]
        si, i, j = self._table[ci]  # type: ignore[attr-defined]
        scene = self.scenes[si]
        win = scene.chunk_window(i, j)
        store = _open(scene.path)
        mask = eligible_mask(
            scene.region, win, image_shape=(scene.height, scene.width), margin=scene.margin
        )
        if store.has("valid"):
            mask &= np.asarray(store.array("valid")[win.slices], bool)
        if cls is not None:
            mask &= np.asarray(store.array("labels")[win.slices]) == cls
        flat = np.flatnonzero(mask)
        if flat.size == 0:  # the scan said otherwise: the store changed since
            raise StoreError(f"store {scene.path!r} changed during training: restart the run")
        r, c = divmod(int(flat[int(rng.integers(flat.size))]), win.width)
        return si, win.row_off + r, win.col_off + c


_STORES: dict[str, SceneStore] = {}


def _open(path: str) -> SceneStore:
    """A per-process cache of open stores (each DataLoader worker opens its own)."""
    s = _STORES.get(path)
    if s is None:
        s = _STORES[path] = SceneStore.open(path)
    return s


# --------------------------------------------------------------------------- dataset
class PatchDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Augmented, normalised training patches by global index ``g = epoch * epoch_len + k``.

    Items are dicts: ``image`` (C, P, P) float32, ``labels`` (P, P) int64 with unlabelled
    and invalid pixels (and the ``loss_margin`` pixels along each side) set to
    ``ignore_value``, ``mask`` (P, P) bool (the pixels the loss counts), and ``weights``
    (P, P) float32 when ``with_weights``.
    """

    def __init__(
        self,
        sampler: PatchSampler,
        *,
        patch: int,
        epoch_len: int,
        normalization: Normalization,
        augment: AugmentConfig | None = None,
        with_weights: bool = False,
        ignore_value: int = 255,
        loss_margin: int = 0,
    ) -> None:
        self.sampler = sampler
        self.loss_margin = loss_margin
        self.patch = patch
        self.epoch_len = epoch_len
        self.normalization = normalization
        self.augment = augment
        self.with_weights = with_weights
        self.ignore_value = ignore_value

    def __len__(self) -> int:
        return self.epoch_len

    def raw_patch(self, epoch: int, k: int) -> dict[str, Any]:
        """The un-augmented patch arrays (and the generator, advanced past sampling)."""
        rng = self.sampler.rng(epoch, k)
        si, r, c = self.sampler.centre(epoch, k, rng)
        return self._read(si, r, c, rng)

    def _read(self, si: int, r: int, c: int, rng: np.random.Generator) -> dict[str, Any]:
        scene = self.sampler.scenes[si]
        store = _open(scene.path)
        ctx = 0
        if self.augment is not None and self.augment.elastic is not None:
            ctx = int(np.ceil(3 * self.augment.elastic.sigma))
        p = self.patch
        win = Window(r - p // 2 - ctx, c - p // 2 - ctx, p + 2 * ctx, p + 2 * ctx)
        hw = {"height": scene.height, "width": scene.width}
        out: dict[str, Any] = {
            "image": read_window(store.array("image"), win, **hw),
            "labels": read_window(store.array("labels"), win, **hw),
            "rng": rng,
            "context": ctx,
        }
        # valid pixels: the store's mask, and finite in every band (NaN and inf are nodata)
        valid = np.isfinite(out["image"]).all(axis=0)
        if store.has("valid"):
            valid &= read_window(store.array("valid"), win, **hw).astype(bool)
        out["valid"] = valid
        out["mask"] = (out["labels"] != store.ignore_index) & valid
        if self.with_weights:
            out["weights"] = read_window(store.array("weights"), win, **hw).astype(np.float32)
        return out

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        epoch, k = divmod(int(g), self.epoch_len)
        d = self.raw_patch(epoch, k)
        rng: np.random.Generator = d["rng"]
        # invalid pixels hold 0, the normalization mean, as at inference (infer.engine)
        image = self.normalization.apply(d["image"], d["valid"])
        labels = d["labels"].astype(np.int64)
        labels[~d["mask"]] = self.ignore_value
        weights = d.get("weights")
        if self.augment is not None:
            image, labels, weights = augment_patch(
                rng, image, labels, weights, self.augment, ignore_value=self.ignore_value
            )
        ctx = d["context"]
        if ctx:
            s = (slice(ctx, ctx + self.patch), slice(ctx, ctx + self.patch))
            image, labels = image[(..., *s)], labels[s]
            weights = weights[s] if weights is not None else None
        if self.loss_margin:
            labels = _ignore_border(labels, self.loss_margin, self.ignore_value)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image, np.float32)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, np.int64)),
            "mask": torch.from_numpy(np.ascontiguousarray(labels != self.ignore_value)),
        }
        if weights is not None:
            item["weights"] = torch.from_numpy(np.ascontiguousarray(weights, np.float32))
        return item


def _ignore_border(labels: np.ndarray, margin: int, ignore_value: int) -> np.ndarray:
    """``labels`` with the ``margin`` pixels along each side set to ``ignore_value``."""
    out = np.full_like(labels, ignore_value)
    inner = (slice(margin, labels.shape[0] - margin), slice(margin, labels.shape[1] - margin))
    out[inner] = labels[inner]
    return out


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Global patch indices of this rank for steps ``start, start + 1, ..., stop - 1``.

    The global batch of step ``s`` is ``[s * B, (s + 1) * B)``; rank ``r`` of ``W`` takes
    ``[s * B + r * B / W, s * B + (r + 1) * B / W)``. Deterministic, so a resumed run and every
    rank see exactly the patches of the uninterrupted single-process run.
    """

    def __init__(
        self, *, start: int, stop: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size % world_size:
            raise ConfigError(
                f"batch_size {batch_size} is not divisible by the {world_size} DDP ranks: "
                f"use a multiple of {world_size}"
            )
        self.start, self.stop = start, stop
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        per = self.batch_size // self.world_size
        for s in range(self.start, self.stop):
            base = s * self.batch_size + self.rank * per
            yield list(range(base, base + per))
