"""A prediction against reference labels: pixel metrics and object metrics, in bounded memory.

Pixel metrics come from one confusion matrix (:mod:`segflow.train.metrics`: pixel accuracy,
mean class accuracy, IoU per class and its mean, frequency-weighted IoU, Dice). Object
metrics match predicted objects to reference objects of the same class by their IoU:

- an object is an instance: an id of an instance raster or a polygon of a vector layer, or,
  for a class map, a 4-connected region of one class (:func:`segflow.instances.label_instances`);
- a predicted and a reference object *match at threshold t* when their IoU is >= t, each
  object at most once, pairs taken in decreasing IoU. Above 0.5 a match is unique anyway (two
  objects with IoU > 0.5 cannot both overlap a third that much), so the matches at every
  t >= 0.5 are those of 0.5 with IoU >= t;
- precision ``TP / (TP + FP)``, recall ``TP / (TP + FN)`` and F1 at ``iou`` (SpaceNet's
  building F1 at 0.5); average precision as the 2018 Data Science Bowl scored it, the mean
  over t = 0.50, 0.55, ..., 0.95 of ``TP(t) / (TP(t) + FP(t) + FN(t))``; panoptic quality
  (Kirillov et al. 2019) ``sum of matched IoUs / (TP + FP / 2 + FN / 2)`` at 0.5, and its
  segmentation and recognition factors;
- touching reference pairs (4-adjacent objects, e.g. nuclei pressed together) and how many
  of them the prediction separates: both matched, to two different predicted objects.

Everything streams over ``block`` x ``block`` windows of the region: the class maps are
labelled into temporary Zarr arrays, then one pass counts the confusion matrix, each object's
area, each (predicted, reference) overlap and each touching pair. Memory: a few windows and a
few numbers per object, whatever the image size.

Examples
--------
>>> import numpy as np
>>> pred = np.array([[1, 1, 0, 0], [1, 1, 0, 1]], "uint8")
>>> ref = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], "uint8")
>>> r = evaluate_arrays(pred, ref, classes=[{"id": 0, "name": "bg"}, {"id": 1, "name": "fg"}])
>>> r["objects"]["tp"], r["objects"]["fp"], r["objects"]["fn"], r["objects"]["f1"]
(1, 1, 0, 0.6666666666666666)
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segflow.config import ClassDef
from segflow.errors import ConfigError
from segflow.geometry import BlockGrid, Window
from segflow.instances import INSTANCE_DTYPE, label_instances

__all__ = [
    "AP_THRESHOLDS",
    "ObjectLayer",
    "Overlaps",
    "evaluate_arrays",
    "evaluate_layers",
    "match_objects",
    "object_metrics",
    "report_markdown",
]

log = logging.getLogger(__name__)

#: The IoU thresholds of average precision (the 2018 Data Science Bowl's): 0.50 .. 0.95.
AP_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
_COMPACT = 2_000_000  # counted keys held before they are summed into one table


# ---------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class ObjectLayer:
    """One side of an evaluation on the evaluation grid: class ids and object ids by window.

    Attributes
    ----------
    classes
        Window -> ``(y, x)`` class ids (255: not counted).
    ids
        Window -> ``(y, x)`` object ids (0: no object).
    class_of
        Object ids -> their class ids.
    """

    classes: Callable[[Window], np.ndarray]
    ids: Callable[[Window], np.ndarray]
    class_of: Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- counting
class _Counts:
    """Sums of counts per uint64 key, accumulated from many windows in bounded memory."""

    def __init__(self) -> None:
        self.keys: list[np.ndarray] = [np.zeros(0, "uint64")]
        self.counts: list[np.ndarray] = [np.zeros(0, "int64")]
        self.held = 0

    def add(self, keys: np.ndarray) -> None:
        if keys.size:
            u, c = np.unique(keys, return_counts=True)
            self.keys.append(u)
            self.counts.append(c.astype("int64"))
            self.held += u.size
            if self.held > _COMPACT:
                self.keys, self.counts = [self.keys[0]], [self.counts[0]]
                self.keys[0], self.counts[0] = self.table()
                self.held = self.keys[0].size

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct keys (sorted) and their summed counts."""
        keys, counts = np.concatenate(self.keys), np.concatenate(self.counts)
        u, inverse = np.unique(keys, return_inverse=True)
        return u, np.bincount(inverse, weights=counts, minlength=u.size).astype("int64")


def _pair_keys(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype("uint64") << np.uint64(32)) | b.astype("uint64")


def _split_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (keys >> np.uint64(32)).astype("int64"), (keys & np.uint64(0xFFFFFFFF)).astype("int64")


@dataclass
class Overlaps:
    """Object areas, (predicted, reference) overlaps and touching reference pairs, counted
    window by window (:meth:`add`)."""

    pred: _Counts = field(default_factory=_Counts)
    ref: _Counts = field(default_factory=_Counts)
    both: _Counts = field(default_factory=_Counts)
    touching: _Counts = field(default_factory=_Counts)

    def add(self, pred: np.ndarray, ref: np.ndarray, *, core: tuple[int, int]) -> None:
        """Count a window of object ids; the last row/column beyond ``core`` (its height and
        width) only serve to find reference objects touching across the window's edge."""
        h, w = core
        p, r = pred[:h, :w].ravel(), ref[:h, :w].ravel()
        self.pred.add(p[p > 0].astype("uint64"))
        self.ref.add(r[r > 0].astype("uint64"))
        hit = (p > 0) & (r > 0)
        self.both.add(_pair_keys(p[hit], r[hit]))
        for a, b in ((ref[:h, :-1], ref[:h, 1:]), (ref[:-1, :w], ref[1:, :w])):
            a, b = a[:h, :w].ravel(), b[:h, :w].ravel()
            t = (a > 0) & (b > 0) & (a != b)
            self.touching.add(_pair_keys(np.minimum(a[t], b[t]), np.maximum(a[t], b[t])))


# --------------------------------------------------------------------------- matching
@dataclass(frozen=True)
class _Objects:
    """The counted objects of both sides and their candidate matches."""

    pred_ids: np.ndarray
    pred_cls: np.ndarray
    ref_ids: np.ndarray
    ref_cls: np.ndarray
    pairs_pred: np.ndarray  # candidate pairs (IoU >= 0.5, same class), best first
    pairs_ref: np.ndarray
    pairs_iou: np.ndarray


def match_objects(
    overlaps: Overlaps,
    pred_class: Callable[[np.ndarray], np.ndarray],
    ref_class: Callable[[np.ndarray], np.ndarray],
    *,
    min_pixels: int = 0,
) -> tuple[_Objects, np.ndarray]:
    """The objects, and which candidate pairs match (greedy in decreasing IoU, t = 0.5);
    predicted objects under ``min_pixels`` pixels are left out (speckle)."""
    pred_ids, pred_area = overlaps.pred.table()
    ref_ids, ref_area = overlaps.ref.table()
    keys, inter = overlaps.both.table()
    p, r = _split_keys(keys)
    ap = pred_area[np.searchsorted(pred_ids.astype("int64"), p)]
    ar = ref_area[np.searchsorted(ref_ids.astype("int64"), r)]
    iou = inter / (ap + ar - inter)
    keep = (iou >= AP_THRESHOLDS[0]) & (pred_class(p) == ref_class(r)) & (ap >= min_pixels)
    pred_ids = pred_ids[pred_area >= min_pixels]
    p, r, iou = p[keep], r[keep], iou[keep]
    order = np.lexsort((r, p, -iou))
    p, r, iou = p[order], r[order], iou[order]
    matched = np.zeros(p.size, bool)
    used_p: set[int] = set()
    used_r: set[int] = set()
    for k in range(p.size):  # candidates only: about one per object
        if int(p[k]) not in used_p and int(r[k]) not in used_r:
            matched[k] = True
            used_p.add(int(p[k]))
            used_r.add(int(r[k]))
    objects = _Objects(
        pred_ids.astype("int64"), pred_class(pred_ids.astype("int64")),
        ref_ids.astype("int64"), ref_class(ref_ids.astype("int64")), p, r, iou,
    )  # fmt: skip
    return objects, matched


def _scores(ious: np.ndarray, iou: float, n_pred: int, n_ref: int) -> dict[str, Any]:
    """Counts and ratios of one class (or all), from the IoUs of its matches: tp/fp/fn at
    ``iou``, and at every threshold of :data:`AP_THRESHOLDS`."""

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    def hits(t: float) -> int:
        return int((ious >= t).sum())

    tp = hits(iou)
    fp, fn = n_pred - tp, n_ref - tp
    per_t = {f"{t:.2f}": ratio(hits(t), n_pred + n_ref - hits(t)) for t in AP_THRESHOLDS}
    defined = [v for v in per_t.values() if v is not None]
    matched_iou = float(ious[ious >= 0.5].sum())
    n05 = hits(0.5)
    rq = ratio(n05, n05 + (n_pred - n05) / 2 + (n_ref - n05) / 2)
    sq = ratio(matched_iou, n05)
    return {
        "predicted": n_pred,
        "reference": n_ref,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "ap_50": per_t["0.50"],
        "ap_50_95": sum(defined) / len(defined) if defined else None,
        "ap_per_threshold": per_t,
        "pq": None if rq is None else (sq or 0.0) * rq,  # no match: PQ 0 (RQ 0)
        "sq": sq,
        "rq": rq,
    }


def object_metrics(
    overlaps: Overlaps,
    *,
    pred_class: Callable[[np.ndarray], np.ndarray],
    ref_class: Callable[[np.ndarray], np.ndarray],
    iou: float = 0.5,
    names: Mapping[int, str] | None = None,
    min_pixels: int = 0,
) -> dict[str, Any]:
    """Object metrics of counted ``overlaps`` (see the module docstring), overall and per class.

    ``iou`` is the threshold of ``tp``/``fp``/``fn``, precision, recall and F1 (>= 0.5).
    """
    if not 0.5 <= iou < 1:
        raise ConfigError(f"iou must be in [0.5, 1), got {iou}: matches below 0.5 are not unique")
    obj, matched = match_objects(overlaps, pred_class, ref_class, min_pixels=min_pixels)
    ious = obj.pairs_iou[matched]
    cls = obj.pairs_ref[matched]
    match_cls = ref_class(cls) if cls.size else np.zeros(0, "int64")
    out = _scores(ious, iou, obj.pred_ids.size, obj.ref_ids.size)
    out["iou_threshold"] = iou
    out["per_class"] = {}
    for c in sorted(set(obj.pred_cls.tolist()) | set(obj.ref_cls.tolist())):
        sel = match_cls == c
        name = (names or {}).get(int(c), str(c))
        out["per_class"][name] = _scores(ious[sel], iou, int((obj.pred_cls == c).sum()),
                                         int((obj.ref_cls == c).sum()))  # fmt: skip
    out.update(_touching(overlaps, obj, matched))
    return out


def _touching(overlaps: Overlaps, obj: _Objects, matched: np.ndarray) -> dict[str, int]:
    """Touching reference pairs, and those whose objects both matched (so: separated)."""
    keys, _ = overlaps.touching.table()
    a, b = _split_keys(keys)
    hit = np.isin(a, obj.pairs_ref[matched]) & np.isin(b, obj.pairs_ref[matched])
    return {"touching_pairs": int(keys.size), "touching_pairs_separated": int(hit.sum())}


# ------------------------------------------------------------------------- evaluation
def _windows(region: Window, block: int) -> Iterator[Window]:
    for _, win in BlockGrid(region.height, region.width, block):
        yield win


def evaluate_layers(
    pred: ObjectLayer,
    ref: ObjectLayer,
    *,
    region: Window,
    classes: Sequence[ClassDef],
    iou: float = 0.5,
    block: int = 2048,
    min_pixels: int = 0,
) -> dict[str, Any]:
    """Pixel and object metrics of ``pred`` against ``ref`` over ``region`` (its windows are
    what the layers are asked for, in region coordinates); predicted objects under
    ``min_pixels`` pixels are not counted as objects."""
    from segflow.train.metrics import ConfusionMatrix, summary

    k = max(c.id for c in classes) + 1
    cm = ConfusionMatrix(k, ignore_index=None)
    overlaps = Overlaps()
    for win in _windows(region, block):
        p, r = pred.classes(win), ref.classes(win)
        valid = (p != 255) & (r != 255)
        cm.update(np.where(valid, p, 0), np.where(valid, r, 0), valid=valid)
        grown = Window.from_bounds(win.row_off, win.col_off, min(win.row_stop + 1, region.height),
                                   min(win.col_stop + 1, region.width))  # fmt: skip
        overlaps.add(pred.ids(grown), ref.ids(grown), core=win.shape)
    names = {c.id: c.name for c in classes}
    pixels = summary(cm)
    pixels["class_names"] = [names.get(i, str(i)) for i in range(k)]
    pixels["confusion_matrix"] = cm.counts.tolist()
    objects = object_metrics(overlaps, pred_class=pred.class_of, ref_class=ref.class_of,
                             iou=iou, names=names, min_pixels=min_pixels)  # fmt: skip
    objects["min_pixels"] = min_pixels
    return {"pixels": pixels, "objects": objects, "region": _region_dict(region)}


def _region_dict(region: Window) -> dict[str, int]:
    return {"row_off": region.row_off, "col_off": region.col_off,
            "height": region.height, "width": region.width}  # fmt: skip


def labelled_layer(
    class_map: Callable[[Window], np.ndarray],
    *,
    region: Window,
    object_classes: Iterable[int],
    scratch: Path,
    name: str,
    block: int = 2048,
) -> ObjectLayer:
    """An :class:`ObjectLayer` of a class map whose objects are its 4-connected regions of
    ``object_classes``, labelled into a Zarr array under ``scratch``."""
    import zarr

    ids = zarr.create_array(scratch / f"{name}.zarr", shape=(region.height, region.width),
                            chunks=(min(block, region.height), min(block, region.width)),
                            dtype=INSTANCE_DTYPE, fill_value=0)  # fmt: skip
    view = _WindowArray(class_map, region)
    table = label_instances(view, ids, classes=object_classes, block=block)
    log.info("%s: %d objects", name, table.count)
    lookup = table.classes

    return ObjectLayer(
        classes=class_map,
        ids=lambda w: np.asarray(ids[w.slices]),
        class_of=lambda i: lookup[i],
    )


class _WindowArray:
    """A read-only array-like over a window-reading function (for label_instances)."""

    def __init__(self, read: Callable[[Window], np.ndarray], region: Window) -> None:
        self.read = read
        self.shape = (region.height, region.width)
        self.dtype = np.dtype("uint8")

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        return self.read(Window.from_bounds(rows.start, cols.start, rows.stop, cols.stop))


def evaluate_arrays(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    classes: Iterable[ClassDef | Mapping[str, Any]],
    object_classes: Iterable[int] | None = None,
    iou: float = 0.5,
    block: int = 2048,
    min_pixels: int = 0,
) -> dict[str, Any]:
    """:func:`evaluate_layers` of two in-memory class maps (objects: their 4-connected regions)."""
    table = [c if isinstance(c, ClassDef) else ClassDef.model_validate(c) for c in classes]
    wanted = list(object_classes) if object_classes is not None else [c.id for c in table if c.id]
    region = Window(0, 0, *pred.shape)
    with tempfile.TemporaryDirectory(prefix="segflow-evaluate-") as tmp:
        layers = [
            labelled_layer(
                _array_reader(a),
                region=region,
                object_classes=wanted,
                scratch=Path(tmp),
                name=name,
                block=block,
            )
            for a, name in ((pred, "pred"), (ref, "ref"))
        ]
        return evaluate_layers(layers[0], layers[1], region=region, classes=table, iou=iou,
                               block=block, min_pixels=min_pixels)  # fmt: skip


def _array_reader(array: np.ndarray) -> Callable[[Window], np.ndarray]:
    return lambda w: array[w.slices]


# ---------------------------------------------------------------------------- reports
def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def report_markdown(report: Mapping[str, Any]) -> str:
    """A markdown summary of an evaluation report (pixel metrics, object metrics)."""
    px, ob = report["pixels"], report["objects"]
    lines = ["### segflow evaluate", ""]
    if report.get("prediction"):
        lines += [
            f"prediction `{report['prediction']}` against reference `{report['reference']}`",
            "",
        ]
    lines += ["| pixel metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(px.get(k))} |" for k in
              ("pixel_accuracy", "mean_class_accuracy", "mean_iou", "frequency_weighted_iou",
               "mean_dice")]  # fmt: skip
    lines += ["", "| class | IoU | Dice |", "|---|---|---|"]
    for i, name in enumerate(px["class_names"]):
        lines.append(
            f"| {name} | {_fmt(px['per_class_iou'][i])} | {_fmt(px['per_class_dice'][i])} |"
        )
    lines += ["", f"| objects (IoU >= {ob['iou_threshold']}) | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(ob[k])} |" for k in
              ("predicted", "reference", "tp", "fp", "fn", "precision", "recall", "f1", "ap_50",
               "ap_50_95", "pq", "sq", "rq", "touching_pairs", "touching_pairs_separated")]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], *, json_path: Path | None, markdown_path: Path | None
                 ) -> None:  # fmt: skip
    """Write the report as JSON and markdown (each under a temporary name, then moved)."""
    from segflow.atomic import write_text_atomic

    if json_path is not None:
        write_text_atomic(json_path, json.dumps(report, indent=2, default=float) + "\n")
    if markdown_path is not None:
        write_text_atomic(markdown_path, report_markdown(report))
