"""flows/evaluate.py's memory and time against the in-memory evaluation a user would write.

    python benchmarks/bench_evaluate.py [--sizes 4096 8192 16384] [--workdir bench-data]
        [--json OUT.json]

For each size, two class COGs of round "nuclei" (about one per 24 x 24 pixels, ~460,000 at
16384^2) are synthesized window by window: the reference, and a prediction whose objects are
shifted, shrunk or missing. Then, each in its own process (peak RSS of the process tree):

- ``segflow``: :func:`segflow.evaluation.evaluate` (streamed windows, temporary Zarr labels);
- ``numpy``: both rasters read whole, ``scipy.ndimage.label``, one ``bincount`` confusion
  matrix and a ``np.unique`` of (predicted, reference) id pairs: the in-memory route.

Both print their pixel accuracy and matched-object count, which must agree. Reported: wall
time, peak RSS and their ratios; segflow's peak must stay flat as the image grows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _measure import measure, python

PITCH = 24


class Nuclei:
    """A lazy class map of discs on a jittered grid (``shift``: the prediction's version)."""

    def __init__(self, size: int, *, prediction: bool) -> None:
        self.shape = (size, size)
        self.dtype = np.dtype("uint8")
        self.prediction = prediction

    def __getitem__(self, key: tuple[Any, ...]) -> np.ndarray:
        rows, cols = (k for k in key if k is not Ellipsis)
        y = np.arange(rows.start or 0, rows.stop)[:, None]
        x = np.arange(cols.start or 0, cols.stop)[None, :]
        cy, cx = y // PITCH, x // PITCH
        h = (cy * 73856093) ^ (cx * 19349663)
        radius = 6 + h % 5
        oy = cy * PITCH + PITCH // 2 + (h >> 3) % 3 - 1
        ox = cx * PITCH + PITCH // 2 + (h >> 5) % 3 - 1
        if self.prediction:
            ox = ox + (h % 2)  # half the objects one pixel off
            radius = radius - ((h >> 7) % 3 == 0)  # a third one pixel smaller
        inside = (y - oy) ** 2 + (x - ox) ** 2 <= radius**2
        if self.prediction:
            inside &= h % 17 != 0  # some nuclei missed
        return inside.astype("uint8")


def make(size: int, work: Path) -> tuple[Path, Path]:
    from segflow.config import ClassDef
    from segflow.io.export import write_cog

    classes = (ClassDef(id=0, name="background"), ClassDef(id=1, name="nucleus"))
    out = []
    for name, pred in (("reference", False), ("prediction", True)):
        path = work / f"{name}-{size}.tif"
        if not path.exists():
            write_cog(
                Nuclei(size, prediction=pred),
                path,
                georef=None,
                classes=classes,
                threads="ALL_CPUS",
            )
        out.append(path)
    return out[1], out[0]


def run_segflow(pred: str, ref: str) -> dict[str, Any]:
    from segflow.config.evaluate import EvaluateRequest
    from segflow.evaluation import evaluate

    r = evaluate(EvaluateRequest(prediction=pred, reference=ref, reference_kind="classes"))
    return {
        "pixel_accuracy": r["pixels"]["pixel_accuracy"],
        "tp": r["objects"]["tp"],
        "objects": r["objects"]["reference"],
    }


def run_numpy(pred: str, ref: str) -> dict[str, Any]:
    import rasterio
    from scipy import ndimage

    with rasterio.open(pred) as a, rasterio.open(ref) as b:
        p, r = a.read(1), b.read(1)
    cm = np.bincount(r.ravel().astype("int64") * 2 + p.ravel(), minlength=4).reshape(2, 2)
    lp, _ = ndimage.label(p == 1)
    lr, nr = ndimage.label(r == 1)
    keys, inter = np.unique(
        lp.astype("uint64") << np.uint64(32) | lr.astype("uint64"), return_counts=True
    )
    ap, ar = np.bincount(lp.ravel()), np.bincount(lr.ravel())
    kp, kr = (keys >> np.uint64(32)).astype("int64"), (keys & np.uint64(2**32 - 1)).astype("int64")
    ok = (kp > 0) & (kr > 0)
    iou = inter[ok] / (ap[kp[ok]] + ar[kr[ok]] - inter[ok])
    return {
        "pixel_accuracy": float(np.trace(cm) / cm.sum()),
        "tp": int((iou >= 0.5).sum()),
        "objects": int(nr),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--workdir", type=Path, default=Path("bench-data"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--run", nargs=3, metavar=("ROUTE", "PRED", "REF"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        route, pred, ref = args.run
        print(json.dumps((run_segflow if route == "segflow" else run_numpy)(pred, ref)))
        return
    work = args.workdir / "evaluate"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        pred, ref = make(size, work)
        row: dict[str, Any] = {"size": size}
        for route in ("segflow", "numpy"):
            m = measure(python(__file__, "--run", route, str(pred), str(ref)))
            if m.returncode:
                raise SystemExit(f"{route} failed:\n{m.output[-3000:]}")
            row[route] = {
                **json.loads(m.output.strip().splitlines()[-1]),
                "wall_s": round(m.seconds, 1),
                "peak_gib": round(m.peak_gib, 3),
            }
        s, n = row["segflow"], row["numpy"]
        assert s["objects"] == n["objects"] and s["tp"] == n["tp"], row
        assert abs(s["pixel_accuracy"] - n["pixel_accuracy"]) < 1e-12, row
        row["time_segflow_over_numpy"] = round(s["wall_s"] / n["wall_s"], 2)
        row["peak_segflow_over_numpy"] = round(s["peak_gib"] / n["peak_gib"], 3)
        rows.append(row)
        print(
            f"{size:>6}^2: {s['objects']} objects, segflow {s['wall_s']} s / {s['peak_gib']} GiB, "
            f"numpy {n['wall_s']} s / {n['peak_gib']} GiB (time x{row['time_segflow_over_numpy']}, "
            f"memory x{row['peak_segflow_over_numpy']})",
            flush=True,
        )
    result = {
        "rows": rows,
        "segflow_peak_growth": round(
            rows[-1]["segflow"]["peak_gib"] / rows[0]["segflow"]["peak_gib"], 2
        ),
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
