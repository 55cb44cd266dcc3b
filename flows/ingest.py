"""Prefect flow: ingest a GeoTIFF / VRT mosaic / whole-slide image / plain image into a scene store.

    python flows/ingest.py SOURCE --out STORE.zarr [--labels PATH] [--instances PATH]
        [--class-field NAME] [--class-map JSON] [--classes JSON] [--chunk 512] [--shard N]
        [--level 0] [--config pipelines/NAME.yaml] [--dask-address ADDR]

Killed runs resume: run the same command again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flows/_common.py
from _common import run_cli, tqdm_progress
from _warm_api import prefect_api, warm_prefect_api

if __name__ == "__main__":  # Prefect's API server comes up while the command loads
    warm_prefect_api()
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from segflow.cluster import dask_client
from segflow.config import IngestConfig, load_config
from segflow.config.cli import add_options
from segflow.ingest import IngestReport, IngestSpec, check_inputs, ingest

# the ingest section's options, as flags (the class map has a JSON form of its own)
FLAGS = [name for name in IngestConfig.model_fields if name != "class_map"]


@task(name="ingest-scene", retries=0)
def ingest_scene(spec: IngestSpec, dask_address: str | None) -> dict[str, Any]:
    """One coarse task: every block runs on Dask inside it."""
    bar: Any = None

    def start(todo: int, done: int) -> None:
        nonlocal bar
        bar = tqdm_progress(todo, f"ingest {Path(spec.source).name}")
        if done:
            bar.write(f"resuming: {done} units already written")

    with dask_client(dask_address) as client:
        report: IngestReport = ingest(
            spec,
            executor=client.get_executor(),
            on_start=start,
            progress=lambda n: bar.update(n) if bar else None,
        )
    if bar is not None:
        bar.close()
    return report.to_dict()


@flow(name="ingest", log_prints=False)
def ingest_flow(spec: IngestSpec, dask_address: str | None = None) -> dict[str, Any]:
    """Ingest ``spec.source`` into the scene store ``spec.out``."""
    report = ingest_scene(spec, dask_address)
    create_markdown_artifact(
        key="ingest-summary",
        markdown=_summary(report),
        description=f"ingest of {spec.source}",
    )
    return report


def _summary(r: dict[str, Any]) -> str:
    status = "already complete" if r["already_complete"] else "written"
    return (
        f"### segflow ingest\n\n| | |\n|---|---|\n| store | `{r['store']}` ({status}) |\n"
        f"| size | {r['width']} x {r['height']} px, {r['bands']} bands |\n"
        f"| units | {r['units_written']} written, {r['units_skipped']} skipped of {r['units_total']} |\n"
        f"| arrays | {', '.join(r['arrays'])} |\n| time | {r['seconds']:.1f} s |\n"
    )


def build_spec(args: argparse.Namespace) -> IngestSpec:
    """Turn command-line arguments (and an optional pipeline config) into a validated spec."""
    return IngestSpec.from_command_line(
        out=args.out,
        options={name: getattr(args, name, None) for name in FLAGS},
        classes_json=args.classes,
        class_map_json=args.class_map,
        pipeline=load_config(args.config) if args.config else None,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python flows/ingest.py",
        description="Ingest an image (GeoTIFF, COG, VRT, SVS/OME-TIFF slide, PNG/TIFF) and its labels into a chunked Zarr scene store.",
    )
    p.add_argument("source", help="image to ingest")
    p.add_argument("--out", required=True, help="scene store to write (STORE.zarr)")
    # --labels, --chunk, ...
    add_options(p, IngestConfig, skip=("source", "class_map"), flags={"assets": "--asset"})
    p.add_argument(
        "--class-map", help='raw label value -> class id, JSON, e.g. \'{"0": 1, "255": 0}\''
    )
    p.add_argument("--classes", help='class table, JSON list of {"id", "name", "color"}')
    p.add_argument("--config", help="pipeline YAML whose class table to use")
    p.add_argument(
        "--dask-address",
        help="Dask scheduler address (default: $SEGFLOW_DASK_ADDRESS or a local cluster)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    spec = build_spec(args)
    check_inputs(spec)  # fail in a second, before Prefect and Dask start
    with prefect_api():
        report = ingest_flow(spec, args.dask_address)
    print(
        f"{report['store']}: {report['width']} x {report['height']} px, "
        f"{report['units_written']} units written, {report['units_skipped']} skipped, "
        f"{report['seconds']:.1f} s"
    )


if __name__ == "__main__":
    run_cli(main)
