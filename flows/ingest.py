"""Prefect flow: ingest a GeoTIFF / VRT mosaic / whole-slide image / plain image into a scene store.

    python flows/ingest.py SOURCE --out STORE.zarr [--labels PATH] [--instances PATH]
        [--class-field NAME] [--class-map JSON] [--classes JSON] [--chunk 512] [--shard N]
        [--level 0] [--config pipelines/NAME.yaml] [--dask-address ADDR]

Killed runs resume: run the same command again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flows/_common.py
from _common import run_cli, tqdm_progress
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from segflow.cluster import dask_client
from segflow.config import DEFAULT_CLASSES, ClassDef, load_config
from segflow.errors import ConfigError
from segflow.ingest import IngestReport, IngestSpec, check_inputs, ingest


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


def _parse_json(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--{what} is not valid JSON ({err.msg}): got {text!r}") from err


def build_spec(args: argparse.Namespace) -> IngestSpec:
    """Turn command-line arguments (and an optional pipeline config) into a validated spec."""
    classes: tuple[ClassDef, ...] = DEFAULT_CLASSES
    ignore_index = 255
    if args.config:
        cfg = load_config(args.config)
        classes, ignore_index = cfg.classes, cfg.ignore_index
    raw_classes = _parse_json(args.classes, "classes")
    if raw_classes is not None:
        try:
            classes = tuple(ClassDef.model_validate(c) for c in raw_classes)
        except Exception as err:
            raise ConfigError(
                f"--classes must be a JSON list of {{id, name, color}}: {err}"
            ) from err
    class_map = _parse_json(args.class_map, "class-map")
    if class_map is not None:
        try:
            class_map = {int(k): int(v) for k, v in class_map.items()}
        except (AttributeError, ValueError) as err:
            raise ConfigError(
                f'--class-map must map raw values to class ids, e.g. {{"0": 1, "255": 0}}: got {args.class_map!r}'
            ) from err
    return IngestSpec(
        source=args.source,
        out=args.out,
        labels=args.labels,
        instances=args.instances,
        class_field=args.class_field,
        class_value=args.class_value,
        class_map=class_map,
        chunk=args.chunk,
        shard=args.shard,
        level=args.level,
        classes=classes,
        ignore_index=ignore_index,
    ).validated()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python flows/ingest.py",
        description="Ingest an image (GeoTIFF, COG, VRT, SVS/OME-TIFF slide, PNG/TIFF) and its labels into a chunked Zarr scene store.",
    )
    p.add_argument("source", help="image to ingest")
    p.add_argument("--out", required=True, help="scene store to write (STORE.zarr)")
    p.add_argument("--labels", help="vector (GeoJSON/GPKG/SHP/GeoParquet) or raster class labels")
    p.add_argument("--instances", help="instance-id raster (0 = background)")
    p.add_argument("--class-field", help="vector attribute holding the class id")
    p.add_argument(
        "--class-value",
        type=int,
        default=1,
        help="class of every vector feature when no --class-field (default 1)",
    )
    p.add_argument(
        "--class-map", help='raw label value -> class id, JSON, e.g. \'{"0": 1, "255": 0}\''
    )
    p.add_argument("--classes", help='class table, JSON list of {"id", "name", "color"}')
    p.add_argument("--config", help="pipeline YAML whose class table to use")
    p.add_argument("--chunk", type=int, default=512, help="chunk size in pixels (default 512)")
    p.add_argument("--shard", type=int, help="shard size in pixels (a multiple of --chunk)")
    p.add_argument("--level", type=int, default=0, help="pyramid level of a slide (default 0)")
    p.add_argument(
        "--dask-address",
        help="Dask scheduler address (default: $SEGFLOW_DASK_ADDRESS or a local cluster)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    spec = build_spec(args)
    check_inputs(spec)  # fail in a second, before Prefect and Dask start
    report = ingest_flow(spec, args.dask_address)
    print(
        f"{report['store']}: {report['width']} x {report['height']} px, "
        f"{report['units_written']} units written, {report['units_skipped']} skipped, "
        f"{report['seconds']:.1f} s"
    )


if __name__ == "__main__":
    run_cli(main)
