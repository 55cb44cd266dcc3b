"""segment_region at gigapixel scale: peak memory, and end-to-end vs pure model time.

    python benchmarks/bench_segment_scale.py [--size 32768] [--workdir bench-data]
        [--features 8 --depth 2] [--batch-size 4] [--tile 1024] [--device cpu|cuda]

On CUDA the flow and the pure forward both run with segment_region's default mixed
precision (bf16 where the GPU has it, else fp16).

Uses the mosaic GeoTIFF of benchmarks/make_big_geotiff.py and a small U-Net checkpoint
(default features 8, depth 2, random weights: speed and memory do not depend on the weights).
Runs the whole flow (`flows/segment_region.py`) in a subprocess, sampling the peak RSS of its
process tree, and reports:
  * inference wall time vs the model's own forward time over the same tiles (the engine
    measures the forward; the ratio is the price of reading, padding, stitching and writing);
  * end-to-end time including the COG export, over that time and over the *pure* forward
    time: the same number of windows of the same shape through the model in a fresh process
    with nothing else running (32 batches timed, extrapolated), which the engine's own
    measurement exceeds by whatever its reader and writer threads take from the model. The
    pure time is measured before and after the flow and averaged: this VM's speed drifts by
    10-20 % over minutes, so one measurement on one side would skew the ratio;
  * peak memory of the whole process tree.

Results for three U-Net sizes on the 2-core CPU VM: README, section "Performance". The
flow's own cost is about the same whatever the model, so the ratio is 1 + that / the model's
time; peak memory follows the batch of windows through the model, not the image.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import ensure_mosaic, measure, python

from segflow.tiling import round_up

ROOT = Path(__file__).resolve().parents[1]

MAKE_CKPT = """
import sys, torch
from segflow.config import ClassDef
from segflow.train.checkpoint import build_meta, save_checkpoint
from segflow.train.models import ModelConfig, build_model
torch.manual_seed(0)
cfg = ModelConfig(arch="unet", in_channels=1, out_channels=2, features=int(sys.argv[2]),
                  depth=int(sys.argv[3]), num_res_units=0)
meta = build_meta(cfg, bands=("pan",), mean=[400.0], std=[300.0], tile=512,
                  classes=(ClassDef(id=0, name="background"), ClassDef(id=1, name="building")))
model = build_model(cfg).eval()
save_checkpoint(sys.argv[1], model, meta, overwrite=True)
print(meta.halo, sum(p.numel() for p in model.parameters()))
"""

# The model alone, in a fresh process with nothing else running: `batches` forwards of a
# (batch, bands, side, side) input already on the device (a conv net's time does not depend
# on the values), with segment_region's default autocast there.
PURE_FORWARD = """
import contextlib, sys, time, torch
from segflow.infer.forward import resolve_device
from segflow.infer.options import InferenceOptions
from segflow.runtime import tune_malloc
from segflow.train.checkpoint import load_checkpoint
tune_malloc()  # as the flows do
side, batch, batches = (int(v) for v in sys.argv[2:5])
dev, amp, _ = resolve_device(InferenceOptions(tile=side, halo=0, device=sys.argv[5]))
model, meta = load_checkpoint(sys.argv[1])
model.eval().to(dev)
x = torch.randn(batch, len(meta.bands), side, side, device=dev)
cast = torch.autocast(dev.type, dtype=amp) if amp else contextlib.nullcontext()
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
with torch.inference_mode(), cast:
    for _ in range(3 if dev.type == "cuda" else 1):  # warm-up (cuDNN picks its kernels)
        model(x)
    sync()
    t = time.perf_counter()
    for _ in range(batches):
        model(x)
    sync()
print(time.perf_counter() - t)
"""


def pure_forward_seconds(
    ckpt: Path, *, side: int, batch: int, tiles: int, device: str = "cpu"
) -> float:
    """Model-only time for ``tiles`` windows, from up to 32 timed batches (extrapolated)."""
    batches = -(-tiles // batch)
    timed = min(batches, 32)
    out = subprocess.run(
        python("-c", PURE_FORWARD, str(ckpt), str(side), str(batch), str(timed), device),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip().splitlines()[-1]) * batches / timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=32768)
    ap.add_argument("--workdir", default=str(ROOT / "bench-data"))
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--features", type=int, default=8, help="U-Net width (default 8)")
    ap.add_argument("--depth", type=int, default=2, help="U-Net depth (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(exist_ok=True)
    big = ensure_mosaic(work, args.size)
    ckpt = work / "small_unet"
    halo, params = subprocess.run(
        python("-c", MAKE_CKPT, str(ckpt), str(args.features), str(args.depth)),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[-2:]
    side = round_up(args.tile + 2 * int(halo), 2**args.depth)  # the engine's window side
    tiles = (-(-args.size // args.tile)) ** 2

    def pure() -> float:
        return pure_forward_seconds(
            ckpt, side=side, batch=args.batch_size, tiles=tiles, device=args.device
        )

    pure_before = pure()
    out = work / "seg.tif"
    for p in work.glob("seg.*"):  # the COG, its STAC Item, the prediction store
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    m = measure(
        python(
            str(ROOT / "flows/segment_region.py"),
            "--image",
            str(big),
            "--model",
            str(ckpt),
            "--out",
            str(out),
            "--tile",
            str(args.tile),
            "--batch-size",
            str(args.batch_size),
            "--device",
            args.device,
        )
    )
    if m.returncode != 0:
        raise SystemExit(m.output[-3000:])
    line = next(ln for ln in m.output.splitlines() if ln.startswith(str(out)))
    total, infer_s, model_s = (float(v) for v in re.findall(r"([\d.]+) s", line)[:3])
    pure_after = pure()
    pure_s = (pure_before + pure_after) / 2
    summary = {
        "device": args.device,
        "gigapixels": round(args.size**2 / 1e9, 3),
        "megapixels_per_s": round(args.size**2 / 1e6 / total, 1),
        "halo": int(halo),
        "model": f"unet features {args.features} depth {args.depth}",
        "model_parameters": int(params),
        "batch_size": args.batch_size,
        "tile": args.tile,
        "flow_wall_s": round(m.seconds, 1),
        "segment_region_s": total,
        "tiles": tiles,
        "model_forward_s": model_s,
        "pure_model_forward_s": round(pure_s, 1),
        "pure_model_forward_before_after_s": [round(pure_before, 1), round(pure_after, 1)],
        "inference_s": infer_s,
        "inference_over_model": round(infer_s / model_s, 3),
        "end_to_end_over_model": round(total / model_s, 3),
        "end_to_end_over_pure_model": round(total / pure_s, 3),
        "peak_rss_gib_process_tree": round(m.peak_gib, 2),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
