"""Benchmark streaming inference (segflow) against MONAI's whole-image sliding window.

A square RGB image (default 8192 x 8192) is built by mirror-tiling the bundled Landsat scene
(``data/samples/landsat/RGB.byte.tif``, real pixels) and written once to a scene store (chunk
512) and to a ``.npy`` file. A small seeded fully convolutional model (3 conv layers, 16
channels, 3 classes) is run over it, each in a fresh subprocess that reports its wall time,
pure model time and peak RSS (``ru_maxrss``), plus the RSS right after the imports:

- ``ours``   :func:`segflow.infer.predict_region`, ``mode="gaussian"``, reading the store
  window by window, writing uint8 probabilities + labels to a standalone prediction store.
- ``monai``  ``monai.inferers.sliding_window_inference(mode="gaussian")`` on the whole image
  loaded in memory as one float32 tensor, output kept in memory, labels = argmax.

Both use the same window (``--window``), overlap and batch size, and ``halo = 0`` for ours,
so both compute exactly the same windows (same count, same places): the label maps are
compared pixel by pixel at the end. "model" time is the forward + softmax time over those
windows (the same work in both); the rest of the wall time is reading, padding, normalizing,
blending and writing.

Usage::

    python benchmarks/bench_infer_vs_monai.py [--size 8192] [--window 512] [--overlap 0.5]
        [--batch 8] [--out outputs/bench_infer] [--only ours,monai]

Prints a Markdown table and writes ``results-<size>.json`` in ``--out``. At 8192 on 2 shared
CPU cores each run takes 7-8 minutes (the model is about 97 % of it); ``--size 4096`` takes a
quarter of that.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "samples" / "landsat" / "RGB.byte.tif"
CHUNK = 512
MODES = ("ours", "monai")


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_model() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 3, 3, padding=1),
    ).eval()


def make_inputs(size: int, out: Path) -> tuple[Path, Path, list[float], list[float]]:
    """The mirror-tiled image as a scene store and a .npy file; per-band mean/std."""
    import rasterio

    from segflow.geometry import BlockGrid
    from segflow.io.store import SceneStore

    store_path, npy_path = out / f"image-{size}.zarr", out / f"image-{size}.npy"
    with rasterio.open(SAMPLE) as src:
        tile = src.read()  # (3, 718, 791) uint8
    mean = [float(b.mean()) for b in tile]
    std = [float(b.std()) for b in tile]
    if store_path.exists() and npy_path.exists():
        return store_path, npy_path, mean, std
    h, w = tile.shape[1:]
    # mirror-tile: flip every other copy so the scene continues across copy borders
    row = np.concatenate(
        [tile if i % 2 == 0 else tile[:, :, ::-1] for i in range(-(-size // w))], axis=2
    )
    rows = [row if j % 2 == 0 else row[:, ::-1] for j in range(-(-size // h))]
    image = np.ascontiguousarray(np.concatenate(rows, axis=1)[:, :size, :size])
    np.save(npy_path, image)
    if store_path.exists():
        shutil.rmtree(store_path)
    store = SceneStore.create(
        store_path,
        bands=("red", "green", "blue"),
        height=size,
        width=size,
        dtype="uint8",
        chunk=CHUNK,
    )
    for _, win in BlockGrid(size, size, CHUNK):
        store.write_window("image", win, image[(slice(None), *win.slices)])
        store.write_window("valid", win, np.ones(win.shape, bool))
    store.record_array("image")
    store.record_array("valid")
    return store_path, npy_path, mean, std


# ------------------------------------------------------------------------------- workers
def worker(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from segflow.geometry import Window
    from segflow.infer import InferenceOptions, StoreReader, predict_region
    from segflow.io.store import SceneStore

    out = Path(args.out)
    mean, std = json.loads(args.stats)
    model = build_model()
    after_imports = rss_now()
    labels_path = out / f"labels-{mode}-{args.size}.npy"
    if mode == "ours":
        pred = out / f"pred-ours-{args.size}.zarr"
        for p in (pred, pred.with_name(pred.name + ".partial")):
            if p.exists():
                shutil.rmtree(p)
        t0 = time.perf_counter()
        store = SceneStore.open(out / f"image-{args.size}.zarr")
        rep = predict_region(
            StoreReader(store),
            model,
            Window(0, 0, args.size, args.size),
            pred,
            options=InferenceOptions(
                tile=args.window,
                halo=0,
                mode="gaussian",
                overlap=args.overlap,
                batch_size=args.batch,
                device="cpu",
            ),
            mean=mean,
            std=std,
        )
        seconds = time.perf_counter() - t0
        peak = peak_rss()
        np.save(labels_path, SceneStore.open(rep.store_path).array("prediction/labels")[...])
        return {
            "seconds": seconds,
            "model_seconds": rep.seconds_in_model,
            "tiles": rep.tiles,
            "peak_rss": peak,
            "rss_after_imports": after_imports,
        }

    from monai.inferers import sliding_window_inference

    timing = {"model": 0.0, "tiles": 0}

    def predictor(x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        p = torch.softmax(model(x), 1)
        timing["model"] += time.perf_counter() - t
        timing["tiles"] += x.shape[0]
        return p

    t0 = time.perf_counter()
    image = np.load(out / f"image-{args.size}.npy")
    x = torch.from_numpy(image).float()[None]
    del image
    x -= torch.tensor(mean).view(1, -1, 1, 1)
    x /= torch.tensor(std).view(1, -1, 1, 1)
    with torch.inference_mode():
        prob = sliding_window_inference(
            x,
            (args.window, args.window),
            args.batch,
            predictor,
            overlap=args.overlap,
            mode="gaussian",
            padding_mode="reflect",
        )
        labels = prob[0].argmax(0).to(torch.uint8).numpy()
    seconds = time.perf_counter() - t0
    peak = peak_rss()
    np.save(labels_path, labels)
    return {
        "seconds": seconds,
        "model_seconds": timing["model"],
        "tiles": timing["tiles"],
        "peak_rss": peak,
        "rss_after_imports": after_imports,
    }


# ------------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench_infer"))
    ap.add_argument("--only", default=",".join(MODES))
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    _, _, mean, std = make_inputs(args.size, out)
    print(f"inputs ready in {time.perf_counter() - t:.1f} s ({args.size} x {args.size} x 3)")
    results: dict[str, dict[str, Any]] = {}
    for mode in args.only.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            mode,
            "--size",
            str(args.size),
            "--window",
            str(args.window),
            "--overlap",
            str(args.overlap),
            "--batch",
            str(args.batch),
            "--out",
            str(out),
            "--stats",
            json.dumps([mean, std]),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            results[mode] = {"failed": proc.returncode}
            continue
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(
            f"{mode}: {r['seconds']:.1f} s, model {r['model_seconds']:.1f} s, "
            f"{r['tiles']} windows, peak RSS {r['peak_rss'] / 2**30:.2f} GiB"
        )

    if all(m in results and "failed" not in results[m] for m in MODES):
        a = np.load(out / f"labels-ours-{args.size}.npy")
        b = np.load(out / f"labels-monai-{args.size}.npy")
        results["agreement"] = {
            "equal_label_fraction": float((a == b).mean()),
            "differing_pixels": int((a != b).sum()),
        }

    gib = 2**30
    print(
        f"\n{args.size} x {args.size} x 3 uint8, window {args.window}, overlap "
        f"{args.overlap}, batch {args.batch}, {os.cpu_count()} CPUs, torch threads default\n"
    )
    print(
        "| run | wall s | model s | wall / model | windows | peak RSS GiB | "
        "RSS after imports GiB | peak - imports GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode in MODES:
        r = results.get(mode)
        if not r or "failed" in r:
            continue
        print(
            f"| {mode} | {r['seconds']:.1f} | {r['model_seconds']:.1f} | "
            f"{r['seconds'] / r['model_seconds']:.2f} | {r['tiles']} | {r['peak_rss'] / gib:.2f} | "
            f"{r['rss_after_imports'] / gib:.2f} | "
            f"{(r['peak_rss'] - r['rss_after_imports']) / gib:.2f} |"
        )
    if "agreement" in results:
        o, m = results["ours"], results["monai"]
        ratios = {
            "time ours / monai": o["seconds"] / m["seconds"],
            "peak RSS ours / monai": o["peak_rss"] / m["peak_rss"],
            "peak-above-imports ours / monai": (o["peak_rss"] - o["rss_after_imports"])
            / (m["peak_rss"] - m["rss_after_imports"]),
        }
        results["ratios"] = ratios
        print()
        for k, v in ratios.items():
            print(f"- {k}: {v:.2f}")
        agree = results["agreement"]
        print(
            f"- labels differ on {agree['differing_pixels']} of {args.size**2} pixels "
            "(near-ties: probabilities agree to float32 rounding, batches differ)"
        )
    (out / f"results-{args.size}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
