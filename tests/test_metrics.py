"""Confusion-matrix metrics against numpy and a hand-computed 3-class example."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from segflow.errors import ConfigError, LabelError
from segflow.train.metrics import (
    ConfusionMatrix,
    dice,
    frequency_weighted_iou,
    mean_class_accuracy,
    mean_dice,
    mean_iou,
    per_class_accuracy,
    per_class_iou,
    pixel_accuracy,
    pixel_error,
    summary,
)


def test_hand_computed_three_class_example() -> None:
    #           pred: 0  1  2
    target = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 255])
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 2, 0, 2])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.counts.tolist() == [[3, 1, 0], [0, 2, 1], [1, 0, 1]]
    assert cm.total == 9
    assert pixel_accuracy(cm) == pytest.approx(6 / 9)
    assert pixel_error(cm) == pytest.approx(3 / 9)
    np.testing.assert_allclose(per_class_accuracy(cm), [3 / 4, 2 / 3, 1 / 2])
    assert mean_class_accuracy(cm) == pytest.approx((3 / 4 + 2 / 3 + 1 / 2) / 3)
    # IoU: class 0: 3 / (4 + 4 - 3); class 1: 2 / (3 + 3 - 2); class 2: 1 / (2 + 2 - 1)
    iou = [3 / 5, 2 / 4, 1 / 3]
    np.testing.assert_allclose(per_class_iou(cm), iou)
    assert mean_iou(cm) == pytest.approx(sum(iou) / 3)
    assert frequency_weighted_iou(cm) == pytest.approx((4 * 3 / 5 + 3 * 2 / 4 + 2 * 1 / 3) / 9)
    np.testing.assert_allclose(dice(cm), [6 / 8, 4 / 6, 2 / 4])
    assert mean_dice(cm) == pytest.approx((6 / 8 + 4 / 6 + 2 / 4) / 3)


def _numpy_reference(pred: np.ndarray, target: np.ndarray, k: int) -> dict[str, object]:
    keep = target != 255
    p, t = pred[keep], target[keep]
    counts = np.zeros((k, k), dtype=np.int64)
    for a, b in zip(t, p, strict=True):
        counts[a, b] += 1
    ious, dices, accs, freqs = [], [], [], []
    for c in range(k):
        tp = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        size = np.sum(p == c) + np.sum(t == c)
        ious.append(tp / union if union else np.nan)
        dices.append(2 * tp / size if size else np.nan)
        accs.append(tp / np.sum(t == c) if np.sum(t == c) else np.nan)
        freqs.append(np.sum(t == c) / len(t))
    fw = sum(f * i for f, i in zip(freqs, ious, strict=True) if f > 0)
    return {"counts": counts, "acc": np.mean(p == t), "iou": np.array(ious),
            "dice": np.array(dices), "class_acc": np.array(accs), "fwiou": fw}


@pytest.mark.parametrize("seed", range(5))
def test_random_arrays_match_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 4
    cm = ConfusionMatrix(k)
    preds, targets = [], []
    for _ in range(3):  # three tiles
        target = rng.integers(0, k - 1, size=(5, 7))  # class 3 never in the target
        target[rng.uniform(size=target.shape) < 0.1] = 255
        pred = rng.integers(0, k - 1 if seed % 2 else k, size=(5, 7))  # odd seeds: 3 absent
        cm.update(pred, target)
        preds.append(pred.ravel())
        targets.append(target.ravel())
    ref = _numpy_reference(np.concatenate(preds), np.concatenate(targets), k)
    np.testing.assert_array_equal(cm.counts, ref["counts"])
    assert pixel_accuracy(cm) == pytest.approx(ref["acc"])
    np.testing.assert_allclose(per_class_iou(cm), ref["iou"])
    np.testing.assert_allclose(dice(cm), ref["dice"])
    np.testing.assert_allclose(per_class_accuracy(cm), ref["class_acc"])
    assert mean_iou(cm) == pytest.approx(np.nanmean(ref["iou"]))
    assert mean_dice(cm) == pytest.approx(np.nanmean(ref["dice"]))
    assert mean_class_accuracy(cm) == pytest.approx(np.nanmean(ref["class_acc"]))
    assert frequency_weighted_iou(cm) == pytest.approx(ref["fwiou"])


def test_absent_classes_are_left_out_of_means() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0]))
    iou = per_class_iou(cm)
    assert math.isnan(iou[2])
    assert mean_iou(cm) == pytest.approx((2 / 3 + 1 / 2) / 2)
    # a class predicted but absent from the target: IoU 0 (counts), accuracy undefined
    cm2 = ConfusionMatrix(3)
    cm2.update(np.array([0, 2]), np.array([0, 0]))
    assert per_class_iou(cm2)[2] == 0.0
    assert math.isnan(per_class_accuracy(cm2)[2])
    assert mean_class_accuracy(cm2) == pytest.approx(0.5)
    empty = ConfusionMatrix(2)
    assert math.isnan(pixel_accuracy(empty)) and math.isnan(mean_iou(empty))
    assert math.isnan(frequency_weighted_iou(empty))


def test_valid_mask_and_ignore_index_skip_pixels() -> None:
    target = np.array([[0, 1], [2, 255]])
    pred = np.array([[0, 0], [2, 1]])
    valid = np.array([[True, False], [True, True]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target, valid=valid)
    assert cm.counts.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]
    no_ignore = ConfusionMatrix(3, ignore_index=None)
    with pytest.raises(LabelError, match=r"target value 255 is not a class id 0..2"):
        no_ignore.update(pred, target)


def test_torch_tensors_match_numpy() -> None:
    rng = np.random.default_rng(3)
    target = rng.integers(0, 3, size=(2, 6, 6))
    target[0, 0] = 255
    pred = rng.integers(0, 3, size=(2, 6, 6))
    valid = rng.uniform(size=(2, 6, 6)) < 0.8
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(pred, target, valid=valid)
    b.update(torch.from_numpy(pred), torch.from_numpy(target), valid=torch.from_numpy(valid))
    np.testing.assert_array_equal(a.counts, b.counts)
    assert b.counts.dtype == np.int64
    logits = torch.randn(2, 3, 6, 6)
    c = ConfusionMatrix(3)
    c.update(logits.argmax(1), torch.from_numpy(target))
    assert c.total == int((target != 255).sum())


def test_merge_and_from_counts_for_ddp() -> None:
    rng = np.random.default_rng(4)
    parts = [(rng.integers(0, 3, 20), rng.integers(0, 3, 20)) for _ in range(3)]
    whole = ConfusionMatrix(3)
    ranks = []
    for pred, target in parts:
        whole.update(pred, target)
        r = ConfusionMatrix(3)
        r.update(pred, target)
        ranks.append(r)
    merged = ConfusionMatrix(3)
    for r in ranks:
        merged.merge(r)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    # what the caller does under DDP: all_reduce(sum) a tensor of the counts
    reduced = sum(torch.from_numpy(r.counts) for r in ranks)
    again = ConfusionMatrix.from_counts(reduced)
    np.testing.assert_array_equal(again.counts, whole.counts)
    assert mean_iou(again) == mean_iou(whole) == mean_iou(whole.counts)
    with pytest.raises(ConfigError, match="cannot merge"):
        merged.merge(ConfusionMatrix(4))
    with pytest.raises(ConfigError, match="square"):
        ConfusionMatrix.from_counts(np.zeros((2, 3)))
    merged.reset()
    assert merged.total == 0


def test_bad_inputs() -> None:
    cm = ConfusionMatrix(2)
    with pytest.raises(LabelError, match="same shape"):
        cm.update(np.zeros(3), np.zeros(4))
    with pytest.raises(LabelError, match=r"pred value 2 is not a class id 0..1"):
        cm.update(np.array([2]), np.array([0]))
    with pytest.raises(LabelError, match="target value -1"):
        cm.update(torch.tensor([0]), torch.tensor([-1]))
    with pytest.raises(ConfigError):
        ConfusionMatrix(0)
    assert cm.total == 0  # failed updates count nothing


def test_summary_is_json_ready() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    s = summary(cm)
    json.dumps(s, allow_nan=False)
    assert s["per_class_iou"][2] is None
    assert s["pixel_error"] == pytest.approx(1 / 3)
    assert s["pixels"] == 3
