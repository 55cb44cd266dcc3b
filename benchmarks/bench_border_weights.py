"""U-Net border weights: segflow's local method vs the naive whole-image method, side by side.

    python benchmarks/bench_border_weights.py [--size 2048] [--naive-objects N] [--json OUT]

Builds a ``size`` x ``size`` instance image by tiling the six real DSB 2018 nucleus label images
(``../shared/data/dsb2018_nuclei_instances/labels``; the bundled one if that is missing) with
seeded flips/rotations, every copy's ids offset so they stay unique. Then times

* naive: one Euclidean distance transform per object over the whole image, keeping the two
  smallest distances per pixel (a running min/second-min, so it fits in memory; cost
  objects x pixels). ``--naive-objects N`` times only the first N objects and extrapolates
  linearly (the cost per object is constant: one whole-image transform); by default all
  objects are timed and the results compared;
* ours: :func:`segflow.weights.border_term` on the whole array (one process, one thread),
  and :func:`segflow.weights.border_term_dask` with 512-pixel chunks on the synchronous
  scheduler (the same work as a Dask worker does);

then ours again on 2 x 2 copies of that mosaic (4x the pixels and objects, same density) to
show linear cost. Wall time and CPU time of
this process are both reported; the ratios use CPU time, which other load on a shared machine
does not inflate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segflow.weights import border_radius, border_term, border_term_dask  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "dsb2018_nuclei_instances" / "labels"
BUNDLED = ROOT / "data" / "samples" / "dsb2018" / "labels_697a05c6fe4a.png"


def dsb_labels() -> list[np.ndarray]:
    files = sorted(SHARED.glob("*.png")) if SHARED.is_dir() else [BUNDLED]
    return [np.asarray(Image.open(f)).astype(np.uint32) for f in files]


def mosaic(size: int, *, seed: int = 0, tiles: list[np.ndarray] | None = None) -> np.ndarray:
    """A ``size`` x ``size`` uint32 instance image tiled from real label images, ids unique
    (not necessarily contiguous)."""
    rng = np.random.default_rng(seed)
    tiles = tiles or dsb_labels()
    out = np.zeros((size, size), np.uint32)
    next_id = 1
    r = 0
    while r < size:
        c, row_h = 0, 0
        while c < size:
            t = tiles[int(rng.integers(len(tiles)))]
            t = np.rot90(t, int(rng.integers(4)))
            if rng.integers(2):
                t = t[:, ::-1]
            h, w = min(t.shape[0], size - r), min(t.shape[1], size - c)
            piece = t[:h, :w]  # ids 1..N; cropping may leave gaps, which is fine
            out[r : r + h, c : c + w] = np.where(piece > 0, piece + np.uint32(next_id - 1), 0)
            next_id += int(t.max())
            c += w
            row_h = max(row_h, h)
        r += row_h
    return out


def count_objects(inst: np.ndarray) -> int:
    return int(np.count_nonzero(np.bincount(inst.ravel())[1:]))


def naive_term(
    inst: np.ndarray, *, w0: float, sigma: float, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The naive method: one whole-image distance transform per object (no cut-off).

    Returns the term (float64) and ``d1 + d2``.
    """
    d1 = np.full(inst.shape, np.inf)
    d2 = np.full(inst.shape, np.inf)
    ids = np.unique(inst)
    ids = ids[ids != 0][:limit]
    for i in ids:
        d = ndimage.distance_transform_edt(inst != i)
        np.minimum(d2, np.maximum(d1, d), out=d2)
        np.minimum(d1, d, out=d1)
    s = d1 + d2
    return np.where(inst == 0, w0 * np.exp(-(s * s) / (2 * sigma * sigma)), 0.0), s


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[Any, float, float]:
    """(result, best wall seconds, best CPU seconds of this process)."""
    best_wall, best_cpu, out = np.inf, np.inf, None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return out, best_wall, best_cpu


def ours(
    arrays: list[np.ndarray], *, w0: float, sigma: float, eps: float, repeat: int
) -> list[dict[str, Any]]:
    """Time both of our paths on each array; repeats interleave the arrays (so a change in the
    machine's load hits all of them alike) and the best time of each is kept."""
    import dask
    import dask.array as da

    out: list[dict[str, Any]] = [
        {
            "numpy_wall_s": np.inf,
            "numpy_cpu_s": np.inf,
            "dask512_wall_s": np.inf,
            "dask512_cpu_s": np.inf,
        }
        for _ in arrays
    ]
    with dask.config.set(scheduler="synchronous"):
        for _ in range(repeat):
            for inst, res in zip(arrays, out, strict=True):
                term, wall, cpu = timed(
                    lambda inst=inst: border_term(inst, w0=w0, sigma=sigma, eps=eps)
                )
                x = da.from_array(inst, chunks=512)
                dterm, dwall, dcpu = timed(
                    lambda x=x: border_term_dask(x, w0=w0, sigma=sigma, eps=eps).compute()
                )
                assert np.array_equal(term, dterm), "chunked result differs from whole-image result"
                res["term"] = term
                for key, v in (
                    ("numpy_wall_s", wall),
                    ("numpy_cpu_s", cpu),
                    ("dask512_wall_s", dwall),
                    ("dask512_cpu_s", dcpu),
                ):
                    res[key] = min(res[key], v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument(
        "--naive-objects",
        type=int,
        default=None,
        help="time the naive method on this many objects and extrapolate (default: all)",
    )
    ap.add_argument("--w0", type=float, default=10.0)
    ap.add_argument("--sigma", type=float, default=5.0)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--repeat", type=int, default=7, help="repeats of our timings (best kept)")
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args()
    p = {"w0": args.w0, "sigma": args.sigma, "eps": args.eps}

    tiles = dsb_labels()
    small = mosaic(args.size, seed=0, tiles=tiles)
    # 4x the pixels at the same density: 2 x 2 copies of the mosaic, ids offset to stay unique
    m = np.uint32(small.max())
    quads = [np.where(small > 0, small + k * m, 0).astype(np.uint32) for k in range(4)]
    big = np.block([[quads[0], quads[1]], [quads[2], quads[3]]])
    n_small = count_objects(small)
    n_big = count_objects(big)
    print(
        f"{args.size}^2 mosaic of {len(tiles)} DSB label images: {n_small} objects; "
        f"{2 * args.size}^2: {n_big} objects; r = {border_radius(**p):.2f} px"
    )

    o_small, o_big = ours([small, big], **p, repeat=args.repeat)

    limit = args.naive_objects
    (ref, s), n_wall, n_cpu = timed(
        lambda: naive_term(small, w0=args.w0, sigma=args.sigma, limit=limit)
    )
    timed_objects = n_small if limit is None else min(limit, n_small)
    scale = n_small / timed_objects
    naive_wall, naive_cpu = n_wall * scale, n_cpu * scale
    max_diff = float(np.abs(ref - o_small["term"]).max()) if limit is None else None
    # with segflow's cut-off applied to the naive sums the two must be identical, bit for bit
    cut = np.where((s <= border_radius(**p)) & (small == 0), ref, 0.0).astype(np.float32)
    identical = bool(np.array_equal(cut, o_small["term"])) if limit is None else None

    res = {
        "size": args.size,
        "objects": n_small,
        "params": p,
        "naive_timed_objects": timed_objects,
        "naive_extrapolated": limit is not None,
        "naive_wall_s": naive_wall,
        "naive_cpu_s": naive_cpu,
        "ours_numpy_wall_s": o_small["numpy_wall_s"],
        "ours_numpy_cpu_s": o_small["numpy_cpu_s"],
        "ours_dask512_wall_s": o_small["dask512_wall_s"],
        "ours_dask512_cpu_s": o_small["dask512_cpu_s"],
        "speedup_numpy_cpu": naive_cpu / o_small["numpy_cpu_s"],
        "speedup_dask512_cpu": naive_cpu / o_small["dask512_cpu_s"],
        "max_abs_diff_vs_naive": max_diff,
        "identical_to_naive_with_cutoff": identical,
        "big_size": 2 * args.size,
        "big_objects": n_big,
        "big_numpy_cpu_s": o_big["numpy_cpu_s"],
        "big_dask512_cpu_s": o_big["dask512_cpu_s"],
        "big_numpy_wall_s": o_big["numpy_wall_s"],
        "big_dask512_wall_s": o_big["dask512_wall_s"],
        "scaling_4x_pixels_numpy": o_big["numpy_cpu_s"] / o_small["numpy_cpu_s"],
        "scaling_4x_pixels_dask512": o_big["dask512_cpu_s"] / o_small["dask512_cpu_s"],
    }
    how = "measured" if limit is None else f"extrapolated from {timed_objects} objects"
    print(f"\n{'method':<34}{'wall s':>10}{'CPU s':>10}")
    print(f"{'naive (' + how + ')':<34}{naive_wall:>10.2f}{naive_cpu:>10.2f}")
    print(
        f"{'ours, whole array':<34}{o_small['numpy_wall_s']:>10.3f}{o_small['numpy_cpu_s']:>10.3f}"
    )
    print(
        f"{'ours, dask map_overlap 512':<34}{o_small['dask512_wall_s']:>10.3f}{o_small['dask512_cpu_s']:>10.3f}"
    )
    print(
        f"speed-up (CPU): {res['speedup_numpy_cpu']:.0f}x whole array, "
        f"{res['speedup_dask512_cpu']:.0f}x dask 512"
    )
    if max_diff is not None:
        print(f"max |naive - ours| = {max_diff:.2e} (bound: eps = {args.eps:g})")
        print(f"identical to naive with the same cut-off, bit for bit: {identical}")
    print(
        f"4x pixels ({2 * args.size}^2, {n_big} objects): CPU time x{res['scaling_4x_pixels_numpy']:.2f} "
        f"whole array, x{res['scaling_4x_pixels_dask512']:.2f} dask 512 (limit 4.5)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
