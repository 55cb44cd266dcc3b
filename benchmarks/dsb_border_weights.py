"""Do the U-Net border weights separate touching nuclei? DSB 2018, with and without them.

    python benchmarks/dsb_border_weights.py [--data ../shared/data/dsb2018_nuclei_instances]
        [--seconds 300] [--out outputs/dsb_border_weights] [--json RESULT.json]

The U-Net paper's claim: weighting the loss by w(x) = w_c(x) + w0 exp(-(d1 + d2)^2 / 2 sigma^2)
(d1, d2: distances to the nearest and second-nearest object) makes the network predict the
thin background gaps between touching objects, so that connected components of the mask
separate them. The experiment:

- the six DSB 2018 images with instance labels (``../shared``): four train (both brightfield
  stains, sparse and medium fluorescence), two held out (432f367a4c5b, very dense, and
  1962d0c5faf3, elongated touching fluorescent nuclei: 271 touching pairs together);
  images as RGB (one has an alpha band, dropped), labels nucleus / background, and the
  instance rasters given to prepare so that the border term sees every nucleus;
- the same small U-Net, the same patches, augmentations, seed and CPU time budget, trained
  once with ``pixel_weighted_ce`` (w0 = 10, sigma = 5, as in the paper) and once with plain
  ``ce``, each with ``flows/train.py``;
- each model segments the held-out images (``segment_region`` with instances: connected
  components of the nucleus class, and also split at their necks by
  ``instance_split: distance``), evaluated with ``flows/evaluate.py``'s library against
  the instance labels: AP at IoU 0.5, AP over 0.5:0.95 (the DSB score), F1, and how many of
  the touching reference pairs end up as two matched nuclei.

Prints a table and writes the JSON result (``--json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# every modality is in the training set (two brightfield stains, sparse and medium
# fluorescence); held out: the two fluorescence images with the most touching nuclei
TRAIN = ("697a05c6fe4a", "fe9adb627a6f", "3c4c675825f7", "472b1c5ff988")
HELD_OUT = ("432f367a4c5b", "1962d0c5faf3")
#: how instances are formed at inference: connected components, or also split at necks
SPLITS = ("none", "distance")
LOSSES = {"border_weighted": "pixel_weighted_ce", "plain": "ce"}


def prepare_data(src: Path, out: Path) -> None:
    """RGB images, nucleus/background labels and the instance rasters, one set per image."""
    import rasterio
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for key in TRAIN + HELD_OUT:
        image = np.asarray(Image.open(src / "images" / f"{key}.png").convert("RGB"))
        Image.fromarray(image).save(out / f"{key}_image.png")
        with rasterio.open(src / "labels" / f"{key}.png") as ds:
            ids = ds.read(1)
        Image.fromarray(ids.astype("uint16")).save(out / f"{key}_instances.png")
        Image.fromarray((ids > 0).astype("uint8")).save(out / f"{key}_labels.png")


def config(out: Path, data: Path, loss: str, seconds: int) -> Path:
    """A pipeline config training on TRAIN with ``loss``; the stores are shared."""
    import yaml

    stores = [
        {
            "store": str(out / "stores" / f"{k}.zarr"),
            "source": str(data / f"{k}_image.png"),
            "labels": str(data / f"{k}_labels.png"),
            "instances": str(data / f"{k}_instances.png"),
        }
        for k in TRAIN
    ]
    doc = {
        "schema_version": 1,
        "name": f"dsb_{loss}",
        "classes": [
            {"id": 0, "name": "background", "color": "#000000"},
            {"id": 1, "name": "nucleus", "color": "#30ff30"},
        ],
        "work_dir": str(out / loss),
        "ingest": {
            "source": stores[0]["source"],
            "labels": stores[0]["labels"],
            "instances": stores[0]["instances"],
            "chunk": 128,
        },
        "prepare": {"w0": 10, "sigma": 5, "class_weights": "none"},
        "train": {
            "stores": {"train": stores, "split": {"block": 128, "val_every": 5}},
            "model": {
                "arch": "unet",
                "in_channels": 3,
                "out_channels": 2,
                "features": 16,
                "depth": 3,
                "num_res_units": 0,
            },
            "loss": {"name": loss},
            "optimizer": {"name": "adam", "lr": 0.003},
            "schedule": {
                "name": "cosine",
                "warmup_steps": 20,
                "min_lr_ratio": 0.05,
                "horizon": "time",
            },
            "patch": 128,
            "batch_size": 8,
            "steps": 100000,
            "time_limit_s": seconds,
            "augment": {"flips": True, "rot90": True},
            "val_interval": 100,
            "checkpoint_interval": 100,
            "seed": 0,
        },
    }
    path = out / f"{loss}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def train(cfg: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)  # every run of the experiment trains afresh
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "flows" / "train.py"),
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--no-prefect",
            "--no-progress",
        ],
        check=True,
    )
    return time.perf_counter() - t0


def evaluate_model(model: Path, data: Path, out: Path, split: str) -> dict[str, Any]:
    """segment_region with instances on each held-out image, evaluated against its labels."""
    from segflow.config.evaluate import EvaluateRequest
    from segflow.config.segment import SegmentRequest
    from segflow.evaluation import evaluate
    from segflow.segment import segment_region

    per_image = {}
    keys = (
        "predicted",
        "reference",
        "tp",
        "fp",
        "fn",
        "f1",
        "ap_50",
        "ap_50_95",
        "pq",
        "touching_pairs",
        "touching_pairs_separated",
    )
    for key in HELD_OUT:
        inst = out / f"{key}_{split}.tif"
        segment_region(
            SegmentRequest(
                image=str(data / f"{key}_image.png"),
                model=str(model),
                out=str(out / f"{key}.tif"),
                tile=128,
                instances=str(inst),
                instance_split=split,
                overwrite=True,
                device="cpu",
            )
        )
        # the instance COG: its objects as segment_region formed them
        report = evaluate(
            EvaluateRequest(
                prediction=str(inst),
                reference=str(data / f"{key}_instances.png"),
                reference_kind="instances",
            )
        )
        per_image[key] = {k: report["objects"][k] for k in keys}
        per_image[key]["mean_iou"] = report["pixels"]["mean_iou"]
    mean = {
        k: float(np.mean([v[k] or 0.0 for v in per_image.values()]))
        for k in ("f1", "ap_50", "ap_50_95", "pq", "mean_iou")
    }
    touching = sum(v["touching_pairs"] for v in per_image.values())
    separated = sum(v["touching_pairs_separated"] for v in per_image.values())
    return {
        "per_image": per_image,
        "mean": mean,
        "touching_pairs": touching,
        "separated": separated,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared/data/dsb2018_nuclei_instances"
    )
    ap.add_argument("--seconds", type=int, default=300, help="CPU training budget per model")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs/dsb_border_weights")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not (args.data / "labels").is_dir():
        sys.exit(f"error: DSB 2018 data not found at {str(args.data)!r}: pass --data (../shared)")
    data = args.out / "data"
    prepare_data(args.data, data)
    results: dict[str, Any] = {"train": TRAIN, "held_out": HELD_OUT, "seconds": args.seconds}
    for name, loss in LOSSES.items():
        cfg = config(args.out, data, loss, args.seconds)
        wall = train(cfg, args.out / loss / "train")
        model = args.out / loss / "train" / "best"
        results[name] = {s: evaluate_model(model, data, args.out / loss, s) for s in SPLITS}
        results[name]["train_seconds"] = round(wall, 1)
    head = f"{'model':16} {'split':9} {'AP@0.5':>7} {'AP.5:.95':>8} {'F1':>6} {'PQ':>6} {'mIoU':>6}"
    print(head + " separated")
    for name in LOSSES:
        for split in SPLITS:
            r = results[name][split]
            m = r["mean"]
            print(
                f"{name:16} {split:9} {m['ap_50']:7.3f} {m['ap_50_95']:8.3f} {m['f1']:6.3f} "
                f"{m['pq']:6.3f} {m['mean_iou']:6.3f} {r['separated']} of {r['touching_pairs']}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
