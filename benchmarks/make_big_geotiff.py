"""Build a large GeoTIFF mosaic from a real scene, window by window (never whole in memory).

    python benchmarks/make_big_geotiff.py OUT.tif --size 32768 [--source data/samples/spacenet_atlanta/sample_geotiff.tif]

The real chip is tiled with alternating mirror flips (so tile borders are continuous), and the
result keeps the chip's CRS and pixel size, with the origin of the chip. Tiled 512 x 512,
DEFLATE, BigTIFF: what a user's gigapixel orthomosaic looks like.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]


def mosaic_block(chip: np.ndarray, row: int, col: int, h: int, w: int) -> np.ndarray:
    """Pixels [row:row+h, col:col+w] of the infinite mirror-tiled mosaic of ``chip``."""
    ch, cw = chip.shape[-2:]
    rows = np.arange(row, row + h)
    cols = np.arange(col, col + w)
    r = np.where((rows // ch) % 2 == 0, rows % ch, ch - 1 - rows % ch)
    c = np.where((cols // cw) % 2 == 0, cols % cw, cw - 1 - cols % cw)
    return chip[:, r[:, None], c[None, :]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=32768)
    ap.add_argument(
        "--source", default=str(ROOT / "data/samples/spacenet_atlanta/sample_geotiff.tif")
    )
    ap.add_argument("--block", type=int, default=512)
    args = ap.parse_args()
    with rasterio.open(args.source) as src:
        chip = src.read()
        profile = src.profile
    profile.update(
        width=args.size,
        height=args.size,
        tiled=True,
        blockxsize=args.block,
        blockysize=args.block,
        compress="deflate",
        BIGTIFF="YES",
        NUM_THREADS="ALL_CPUS",
    )
    step = args.block * 8
    with rasterio.open(args.out, "w", **profile) as dst:
        for r in range(0, args.size, step):
            for c in range(0, args.size, step):
                h, w = min(step, args.size - r), min(step, args.size - c)
                dst.write(mosaic_block(chip, r, c, h, w), window=Window(c, r, w, h))
    print(f"wrote {args.out}: {args.size} x {args.size} px ({args.size**2 / 1e9:.2f} gigapixels)")


if __name__ == "__main__":
    main()
