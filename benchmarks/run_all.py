"""Run every benchmark in sequence and print one summary table (what ``make bench`` calls).

    python benchmarks/run_all.py [--full] [--only NAME,NAME] [--dry-run] [--json OUT]

By default each benchmark runs at a small size that checks it end to end in a few minutes
on 2 cores (the numbers are not the published ones). ``--full`` runs the published sizes (the
scripts' own defaults: gigapixel mosaics, an 8192^2 inference comparison and a 20-minute ISBI
training: hours on 2 cores, and about 10 GB of disk under ``bench-data/``). ``--dry-run``
lists the commands without running them.

Each benchmark runs in its own process; this script measures its wall time and the peak
resident memory of its whole process tree (``_measure.measure``), keeps its full output in
``outputs/bench/<name>.log``, and reads its headline numbers from its JSON result. The exit
status is 1 when any benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure, python

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
OUT = ROOT / "outputs" / "bench"
WORK = ROOT / "bench-data"


def _last_json(output: str) -> dict[str, Any]:
    """The last top-level JSON object a script printed (possibly indented over many lines)."""
    lines = output.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                doc = json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict):
                return doc
    raise ValueError("no JSON result in the output")


def _read(path: Path | None) -> dict[str, Any]:
    if path is None:
        raise ValueError("this benchmark writes no result file")
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return doc


# Headlines: the numbers each benchmark exists to show, from its own JSON result.
def _border(output: str, res: Path | None) -> str:
    r = _read(res)
    return (f"{r['objects']} objects: {r['speedup_numpy_cpu']:.0f}x faster than naive (CPU), "
            f"4x pixels cost x{r['scaling_4x_pixels_numpy']:.2f}")


def _prepare(output: str, res: Path | None) -> str:
    r = _read(res)
    return (f"{r['pixels_per_s'] / 1e6:.2f} Mpx/s on {r['workers']} worker(s), worker peak "
            f"{r['max_worker_peak_gib']:.2f} GiB, {r['windows_checked']} windows exact")


def _ingest(output: str, res: Path | None) -> str:
    r = _last_json(output)
    return (f"segflow {r['segflow_s']} s vs rioxarray {r['rioxarray_s']} s "
            f"(x{r['speedup_vs_rioxarray']}), peak {r['segflow_peak_gib']} vs "
            f"{r['rioxarray_peak_gib']} GiB; library / decode+encode limit "
            f"{r['segflow_library_over_limit_median']} (median of "
            f"{len(r['segflow_library_over_limit_rounds'])})")


def _segment(output: str, res: Path | None) -> str:
    r = _last_json(output)
    return (f"inference / model time {r['inference_over_model']}, end to end / model "
            f"{r['end_to_end_over_model']}, peak {r['peak_rss_gib_process_tree']} GiB")


def _reads(output: str, res: Path | None) -> str:
    r = _last_json(output)
    return (f"column bands / any free thread: CPU x{r['cpu_bands_over_free']}, wall "
            f"x{r['wall_bands_over_free']} ({r['windows']} windows)")


def _export(output: str, res: Path | None) -> str:
    r = _read(res)
    parts = []
    for mode, base in (("cog", "cog_whole"), ("vec", "vec_whole")):
        if mode in r and base in r:
            parts.append(f"{mode} {r[mode]['wall_s']} s / {r[mode]['peak_rss_mib']} MiB vs whole "
                         f"{r[base]['wall_s']} s / {r[base]['peak_rss_mib']} MiB")
    return "; ".join(parts) or "done"


def _infer(output: str, res: Path | None) -> str:
    r = _read(res)
    ratios = r.get("ratios", {})
    if not ratios:
        return "done (no ratios: a run failed)"
    return (f"ours / MONAI: time {ratios['time ours / monai']:.2f}, peak RSS "
            f"{ratios['peak RSS ours / monai']:.2f}; labels differ on "
            f"{r['agreement']['differing_pixels']} px")


def _train(output: str, res: Path | None) -> str:
    r = _last_json(output)
    return (f"{r['steps']} steps ({r['steps_per_s']} /s), pixel error final "
            f"{r['final_pixel_error']:.4f}, best {r['best_pixel_error']:.4f}")


def _evaluate(output: str, res: Path | None) -> str:
    r = _last_json(output)
    big = r["rows"][-1]
    return (f"{big['size']}^2: segflow {big['segflow']['peak_gib']} GiB vs numpy "
            f"{big['numpy']['peak_gib']} GiB (x{big['peak_segflow_over_numpy']}), time "
            f"x{big['time_segflow_over_numpy']}; segflow peak growth x{r['segflow_peak_growth']}")


def _lines(output: str, *starts: str) -> str:
    """The printed lines that start with one of ``starts``, joined (their own ratios)."""
    picked = [ln.strip() for ln in output.splitlines() if ln.strip().startswith(starts)]
    return "; ".join(picked) or "done (no summary line)"


def _remote_ingest(output: str, res: Path | None) -> str:
    return _lines(output, "throughput ratio", "without the server")


def _zarr_stores(output: str, res: Path | None) -> str:
    return _lines(output, "fsspec")


def _collection(output: str, res: Path | None) -> str:
    return _lines(output, "speed-up", "per scene", "peak memory")


def _gpu(output: str, res: Path | None) -> str:
    r = _last_json(output)
    t, seg = r["training"], r["segment_region"]
    return (f"{r['device']}: segment_region {seg['megapixels_per_s']} Mpx/s, "
            f"{seg['end_to_end_over_pure_model']}x the pure forward; training "
            f"{t['loop_steps_per_s']} steps/s, {t['busy_fraction_at_most']} of the pure step; "
            f"loader {t['loader_patches_per_s_per_core']['config']} patches/s per core")


@dataclass(frozen=True)
class Bench:
    """One benchmark script: its quick and full arguments and where its result lands."""

    name: str
    script: str
    quick: tuple[str, ...]
    full: tuple[str, ...]
    common: tuple[str, ...]  # both modes (output places)
    result: Callable[[bool], Path | None]  # full? -> the JSON result file (None: stdout)
    headline: Callable[[str, Path | None], str]  # (its output, its result file) -> summary
    clean: tuple[Path, ...] = field(default=())  # removed first (a training run must be new)

    def command(self, full: bool) -> list[str]:
        return python(str(BENCH / self.script), *(self.full if full else self.quick),
                      *self.common)


BENCHES: tuple[Bench, ...] = (
    Bench("border_weights", "bench_border_weights.py",
          quick=("--size", "512", "--repeat", "1", "--json", str(OUT / "border_weights-quick.json")),
          full=("--json", str(OUT / "border_weights.json")), common=(),
          result=lambda full: OUT / f"border_weights{'' if full else '-quick'}.json",
          headline=_border),
    Bench("prepare_scale", "bench_prepare_scale.py",
          quick=("--size", "2048", "--shard", "1024", "--check", "2",
                 "--json", str(OUT / "prepare_scale-quick.json")),
          full=("--json", str(OUT / "prepare_scale.json")),
          common=("--workdir", str(WORK / "prepare")),
          result=lambda full: OUT / f"prepare_scale{'' if full else '-quick'}.json",
          headline=_prepare),
    Bench("ingest", "bench_ingest.py", quick=("--size", "2048", "--skip-flow"), full=(),
          common=("--workdir", str(WORK)), result=lambda full: None, headline=_ingest),
    Bench("segment_scale", "bench_segment_scale.py", quick=("--size", "2048", "--tile", "512"),
          full=(), common=("--workdir", str(WORK)), result=lambda full: None,
          headline=_segment),
    Bench("source_reads", "bench_source_reads.py", quick=("--size", "4096"), full=(),
          common=("--workdir", str(WORK)), result=lambda full: None, headline=_reads),
    Bench("export", "bench_export.py", quick=("--size", "2048"), full=(),
          common=("--out", str(OUT / "export")),
          result=lambda full: OUT / "export" / ("16384/results-16384.json" if full
                                                 else "2048/results-2048.json"),
          headline=_export),
    Bench("infer_vs_monai", "bench_infer_vs_monai.py", quick=("--size", "1024"), full=(),
          common=("--out", str(OUT / "infer")),
          result=lambda full: OUT / "infer" / f"results-{8192 if full else 1024}.json",
          headline=_infer),
    Bench("evaluate", "bench_evaluate.py", quick=("--sizes", "1024", "2048"), full=(),
          common=("--workdir", str(WORK)), result=lambda full: None, headline=_evaluate),
    Bench("remote_ingest", "bench_remote_ingest.py", quick=("--size", "2048"), full=(),
          common=("--workdir", str(WORK)), result=lambda full: None, headline=_remote_ingest),
    Bench("zarr_stores", "bench_zarr_stores.py", quick=("--size", "2048"), full=(), common=(),
          result=lambda full: None, headline=_zarr_stores),
    Bench("collection", "bench_collection.py", quick=("--scenes", "12"), full=(),
          common=("--workdir", str(WORK)), result=lambda full: None, headline=_collection),
    Bench("gpu", "bench_gpu.py", quick=("--size", "2048", "--steps", "20"), full=(),
          common=("--workdir", str(WORK)), result=lambda full: None, headline=_gpu),
    Bench("train_isbi", "train_isbi.py", quick=("--minutes", "0.5", "--steps", "40"), full=(),
          common=("--out", str(OUT / "train_isbi")), result=lambda full: None,
          headline=_train, clean=(OUT / "train_isbi",)),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the published sizes (hours)")
    ap.add_argument("--only", help="comma-separated names: " + ",".join(b.name for b in BENCHES))
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--json", help="also write the summary here")
    args = ap.parse_args()
    chosen = list(BENCHES)
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {b.name for b in BENCHES})
        if unknown:
            ap.error(f"unknown benchmark(s) {unknown}: choose from {[b.name for b in BENCHES]}")
        chosen = [b for b in BENCHES if b.name in names]
    mode = "full" if args.full else "quick"
    if args.dry_run:
        for b in chosen:
            print(" ".join(b.command(args.full)))
        return 0

    OUT.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for b in chosen:
        for path in b.clean:
            shutil.rmtree(path, ignore_errors=True)
        cmd = b.command(args.full)
        print(f"[{b.name}] {' '.join(cmd)}", file=sys.stderr, flush=True)
        m = measure(cmd)
        log = OUT / f"{b.name}{'' if args.full else '-quick'}.log"
        log.write_text(m.output)
        row: dict[str, Any] = {"name": b.name, "mode": mode, "returncode": m.returncode,
                               "wall_s": round(m.seconds, 1), "peak_gib": round(m.peak_gib, 2),
                               "log": str(log.relative_to(ROOT))}
        if m.returncode == 0:
            try:
                row["result"] = b.headline(m.output, b.result(args.full))
            except (OSError, ValueError, KeyError, TypeError) as err:
                row["result"] = f"finished, but its result was unreadable ({err!r})"
        else:
            tail = m.output.strip().splitlines()[-1:] or [""]
            row["result"] = f"FAILED: {tail[0][:160]}"
        print(f"[{b.name}] exit {m.returncode} in {row['wall_s']} s: {row['result']}",
              file=sys.stderr, flush=True)
        rows.append(row)

    print(f"\n## segflow benchmarks ({mode} sizes; full output in outputs/bench/*.log)\n")
    print("| benchmark | exit | wall s | peak RSS GiB (process tree) | result |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['returncode']} | {r['wall_s']} | {r['peak_gib']} | "
              f"{r['result']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any(r["returncode"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
