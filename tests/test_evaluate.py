"""Evaluation metrics against plain numpy and brute-force references on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from test_instances import blobs

from segflow.evaluation.metrics import AP_THRESHOLDS, evaluate_arrays

CLASSES = [{"id": 0, "name": "bg"}, {"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def numpy_pixel_metrics(pred: np.ndarray, ref: np.ndarray, k: int) -> dict[str, object]:
    """Long et al.'s definitions, straight from a bincount confusion matrix."""
    n = np.bincount(ref.ravel() * k + pred.ravel(), minlength=k * k).reshape(k, k).astype(float)
    t, p, d = n.sum(1), n.sum(0), np.diag(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = d / (t + p - d)
        dice = 2 * d / (t + p)
        acc = d / t
    return {
        "pixel_accuracy": d.sum() / n.sum(),
        "mean_class_accuracy": np.nanmean(acc),
        "mean_iou": np.nanmean(iou),
        "frequency_weighted_iou": (t[t > 0] * iou[t > 0]).sum() / t.sum(),
        "per_class_iou": iou,
        "per_class_dice": dice,
    }


def brute_objects(pred: np.ndarray, ref: np.ndarray, classes: list[int]) -> dict[str, object]:
    """Every pair's IoU from full masks, a greedy matching per threshold, touching pairs by
    dilation: the definitions, without any of the streaming machinery."""
    objs = {}
    for side, a in (("p", pred), ("r", ref)):
        objs[side] = []
        for c in classes:
            lab, n = ndimage.label(a == c)
            objs[side] += [(lab == i, c) for i in range(1, n + 1)]
    iou = np.zeros((len(objs["p"]), len(objs["r"])))
    for i, (mp, cp) in enumerate(objs["p"]):
        for j, (mr, cr) in enumerate(objs["r"]):
            if cp == cr:
                iou[i, j] = (mp & mr).sum() / (mp | mr).sum()
    out = {"predicted": len(objs["p"]), "reference": len(objs["r"])}
    per_t = {}
    for t in AP_THRESHOLDS:
        pairs = sorted(((iou[i, j], i, j) for i, j in zip(*np.nonzero(iou >= t), strict=True)),
                       key=lambda x: -x[0])  # fmt: skip
        used_p, used_r, matched = set(), set(), []
        for v, i, j in pairs:
            if i not in used_p and j not in used_r:
                used_p.add(i), used_r.add(j), matched.append((v, i, j))
        tp = len(matched)
        per_t[t] = (tp, matched)
    tp, matched = per_t[0.5]
    fp, fn = out["predicted"] - tp, out["reference"] - tp
    out.update(tp=tp, fp=fp, fn=fn, f1=2 * tp / (2 * tp + fp + fn))
    out["ap_50_95"] = np.mean([m[0] / (m[0] + (out["predicted"] - m[0]) + (out["reference"] - m[0]))
                               for m in per_t.values()])  # fmt: skip
    out["pq"] = sum(v for v, _, _ in matched) / (tp + fp / 2 + fn / 2)
    refs = [m for m, _ in objs["r"]]
    touching = [(a, b) for a in range(len(refs)) for b in range(a + 1, len(refs))
                if (ndimage.binary_dilation(refs[a]) & refs[b]).any()]  # fmt: skip
    hit = {j for _, _, j in matched}
    out["touching_pairs"] = len(touching)
    out["touching_pairs_separated"] = sum(a in hit and b in hit for a, b in touching)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block", [13, 2048])
def test_metrics_equal_numpy_and_brute_force(seed: int, block: int) -> None:
    ref = blobs((90, 110), seed=seed)
    pred = ref.copy()
    rng = np.random.default_rng(seed)
    pred = ndimage.grey_erosion(pred, size=(2, 2)) if seed % 2 else ndimage.grey_dilation(pred, 3)
    noise = rng.random(pred.shape) < 0.02
    pred[noise] = rng.integers(0, 3, noise.sum())
    got = evaluate_arrays(pred, ref, classes=CLASSES, block=block)
    px = numpy_pixel_metrics(pred, ref, 3)
    for key in ("pixel_accuracy", "mean_class_accuracy", "mean_iou", "frequency_weighted_iou"):
        assert got["pixels"][key] == pytest.approx(px[key])
    np.testing.assert_allclose(got["pixels"]["per_class_iou"], px["per_class_iou"])
    np.testing.assert_allclose(got["pixels"]["per_class_dice"], px["per_class_dice"])
    want = brute_objects(pred, ref, [1, 2])
    ob = got["objects"]
    for key in ("predicted", "reference", "tp", "fp", "fn", "touching_pairs",
                "touching_pairs_separated"):  # fmt: skip
        assert ob[key] == want[key], key
    for key in ("f1", "ap_50_95", "pq"):
        assert ob[key] == pytest.approx(want[key]), key
    assert want["tp"] > 5 and want["touching_pairs"] > 0


def test_perfect_prediction_scores_one() -> None:
    ref = blobs((64, 64), seed=9)
    got = evaluate_arrays(ref, ref, classes=CLASSES)
    assert got["pixels"]["mean_iou"] == 1.0
    ob = got["objects"]
    assert ob["f1"] == ob["ap_50_95"] == ob["pq"] == 1.0
    assert ob["touching_pairs_separated"] == ob["touching_pairs"] > 0


def test_merged_touching_objects_are_not_separated() -> None:
    """Two touching objects (of two classes: in a class map, touching objects of one class are
    one object) predicted as one: IoU 0.4 with the larger, so no match and no separation."""
    ref = np.zeros((20, 30), "uint8")
    ref[5:15, 5:13] = 1
    ref[5:15, 13:25] = 2
    pred = np.where(ref > 0, 1, 0).astype("uint8")
    ob = evaluate_arrays(pred, ref, classes=CLASSES)["objects"]
    assert ob["touching_pairs"] == 1 and ob["touching_pairs_separated"] == 0
    assert (ob["tp"], ob["fp"], ob["fn"]) == (0, 1, 2)


# --------------------------------------------------------------------- files and CLI
import csv  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import geopandas as gpd  # noqa: E402
import rasterio  # noqa: E402
from rasterio.features import rasterize  # noqa: E402

from segflow.config import ClassDef  # noqa: E402
from segflow.config.evaluate import EvaluateRequest  # noqa: E402
from segflow.evaluation import evaluate  # noqa: E402
from segflow.io.export import write_cog  # noqa: E402
from segflow.io.sources import open_source  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUILDINGS = (ClassDef(id=0, name="background"), ClassDef(id=1, name="building"))


def _footprint_cog(samples: Path, out: Path, *, drop: int = 0) -> Path:
    """A 'prediction' COG: the SpaceNet footprints rasterized, less the first ``drop``."""
    atl = samples / "spacenet_atlanta"
    gdf = gpd.read_file(atl / "geotiff_labels.geojson").iloc[drop:]
    src = open_source(atl / "sample_geotiff.tif")
    with rasterio.open(atl / "sample_geotiff.tif") as ds:
        mask = rasterize(((g, 1) for g in gdf.geometry), out_shape=ds.shape,
                         transform=ds.transform, dtype="uint8")  # fmt: skip
    return write_cog(mask, out, georef=src.info.georef, classes=BUILDINGS, block=256)


def test_buildings_against_vector_footprints(samples: Path, tmp_path: Path) -> None:
    """The footprints' own raster scores F1 1 against them (every building one object, unless
    footprints touch); dropping 5 buildings costs exactly 5 false negatives."""
    ref = samples / "spacenet_atlanta" / "geotiff_labels.geojson"
    n = len(gpd.read_file(ref))
    full = evaluate(EvaluateRequest(prediction=str(_footprint_cog(samples, tmp_path / "a.tif")),
                                    reference=str(ref), out_json=str(tmp_path / "r.json"),
                                    out_markdown=str(tmp_path / "r.md")))  # fmt: skip
    ob = full["objects"]
    with rasterio.open(tmp_path / "a.tif") as ds:  # a footprint may rasterize in two pieces
        assert ob["predicted"] == ndimage.label(ds.read(1) == 1)[1]
    assert ob["reference"] == n == 43
    assert ob["tp"] + ob["fn"] == n and ob["tp"] >= n - 2
    assert full["pixels"]["mean_iou"] > 0.99
    import json

    assert json.loads((tmp_path / "r.json").read_text())["objects"]["tp"] == ob["tp"]
    assert "| f1 |" in (tmp_path / "r.md").read_text()
    less = evaluate(EvaluateRequest(prediction=str(_footprint_cog(samples, tmp_path / "b.tif", drop=5)),
                                    reference=str(ref)))["objects"]  # fmt: skip
    assert less["fn"] == ob["fn"] + 5 and less["fp"] == ob["fp"]
    # the window option: a region of the chip counts only the objects there
    part = evaluate(EvaluateRequest(prediction=str(tmp_path / "a.tif"), reference=str(ref),
                                    window=(0, 0, 450, 900)))["objects"]  # fmt: skip
    assert 0 < part["reference"] < n


def test_instance_raster_reference_counts_touching_nuclei(samples: Path, tmp_path: Path) -> None:
    """DSB 2018 nuclei: a binary prediction (labels > 0) merges touching nuclei; the touching
    pairs counted equal the data set's own count, and none of them is separated."""
    labels = samples / "dsb2018" / "labels_697a05c6fe4a.png"
    with rasterio.open(labels) as ds:
        ids = ds.read(1)
    pred = write_cog((ids > 0).astype("uint8"), tmp_path / "p.tif", georef=None,
                     classes=(ClassDef(id=0, name="bg"), ClassDef(id=1, name="nucleus")), block=64)  # fmt: skip
    r = evaluate(EvaluateRequest(prediction=str(pred), reference=str(labels)))
    ob = r["objects"]
    assert ob["reference"] == len(np.unique(ids)) - 1
    touching = {  # by dilating each nucleus with the 4-neighbourhood
        (i, int(j)) for i in range(1, int(ids.max()) + 1)
        for j in np.unique(ids[ndimage.binary_dilation(ids == i)]) if j > i
    }  # fmt: skip
    assert ob["touching_pairs"] == len(touching) > 0
    index = ROOT.parent / "shared" / "data" / "dsb2018_nuclei_instances" / "index.csv"
    if index.exists():  # the data set's own count, made when it was assembled
        rows = {row["file"]: row for row in csv.DictReader(index.open())}
        assert ob["touching_pairs"] == int(rows["697a05c6fe4a.png"]["n_touching_pairs_4conn"])
    assert ob["touching_pairs_separated"] == 0
    assert r["pixels"]["pixel_accuracy"] == 1.0  # every nucleus pixel is foreground


def test_cli_reports_and_refuses_bad_input(samples: Path, tmp_path: Path) -> None:
    pred = _footprint_cog(samples, tmp_path / "a.tif")
    ref = samples / "spacenet_atlanta" / "geotiff_labels.geojson"
    cmd = [sys.executable, str(ROOT / "flows" / "evaluate.py")]
    bad = [
        (
            ["--prediction", str(pred), "--reference", str(tmp_path / "nope.geojson")],
            "reference not found",
        ),
        (
            ["--prediction", str(tmp_path / "nope.tif"), "--reference", str(ref)],
            "prediction not found",
        ),
        (
            ["--prediction", str(pred), "--reference", str(ref), "--object-classes", "7"],
            "object-classes",
        ),
        (
            ["--prediction", str(pred), "--reference", str(samples / "landsat" / "RGB.byte.tif")],
            "another CRS",
        ),
    ]
    report = ["--out-json", str(tmp_path / "r.json")]
    for args, message in bad:
        out = subprocess.run(cmd + args + report, capture_output=True, text=True, timeout=120)
        assert not (tmp_path / "r.json").exists()
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_min_pixels_leaves_speckle_out_of_the_objects_only() -> None:
    ref = np.zeros((20, 20), "uint8")
    ref[2:8, 2:8] = 1
    pred = ref.copy()
    pred[15, 15] = pred[15, 16] = 1  # a 2-pixel speckle
    table = [{"id": 0, "name": "bg"}, {"id": 1, "name": "fg"}]
    raw = evaluate_arrays(pred, ref, classes=table)
    clean = evaluate_arrays(pred, ref, classes=table, min_pixels=3)
    assert (raw["objects"]["predicted"], raw["objects"]["fp"]) == (2, 1)
    assert (clean["objects"]["predicted"], clean["objects"]["fp"], clean["objects"]["f1"]) == (
        1,
        0,
        1.0,
    )
    assert clean["pixels"] == raw["pixels"]


def test_an_instance_cog_prediction_keeps_its_objects_apart(samples: Path, tmp_path: Path) -> None:
    """segment_region's instance COG as the prediction: its ids are the objects, so touching
    nuclei it separates count as separated (here: the labels themselves, all of them)."""
    from segflow.io.export.instance_cog import write_instance_cog

    labels = samples / "dsb2018" / "labels_697a05c6fe4a.png"
    with rasterio.open(labels) as ds:
        ids = ds.read(1).astype("uint32")
    pred = write_instance_cog(ids, tmp_path / "i.tif", georef=None, count=int(ids.max()),
                              classes=[{"id": 1, "name": "nucleus"}], block=64)  # fmt: skip
    ob = evaluate(EvaluateRequest(prediction=str(pred), reference=str(labels)))["objects"]
    assert ob["tp"] == ob["reference"] == ob["predicted"] == len(np.unique(ids)) - 1
    assert ob["touching_pairs_separated"] == ob["touching_pairs"] > 0
    assert ob["ap_50_95"] == 1.0
