"""Prefect flow: training targets for a scene store (border weights, class weights, fingerprint).

    python flows/prepare.py STORE.zarr [--w0 10] [--sigma 5] [--eps 1e-3]
        [--class-weights none|inverse|median|explicit] [--explicit-weights 0=1,1=5]
        [--train-bbox R0 C0 R1 C1 | --train-blocks BLOCK EVERY] [--fingerprint PATH]
        [--config pipelines/NAME.yaml] [--dask-address ADDR] [--force] [--no-progress]

Four coarse tasks share one Dask client: instances (given, or connected components of the
labels), class frequencies and weights, the weight map, the fingerprint. A re-run with the same
parameters on a finished store does nothing; a killed run resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# a loaded machine can take longer than Prefect's default 20 s to start the temporary API server
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # flows/_common.py
from _common import run_cli
from _warm_api import prefect_api, warm_prefect_api

if __name__ == "__main__":  # Prefect's API server comes up while the command loads
    warm_prefect_api()
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from segflow.cluster import dask_client
from segflow.config import PrepareConfig, load_config
from segflow.config.cli import add_options
from segflow.prepare import check_inputs, config_with, is_current, open_store, prepare_store

# the nested options have command-line forms of their own (below)
NESTED = ("explicit_class_weights", "train_region")
FLAGS = [name for name in PrepareConfig.model_fields if name not in NESTED]


def as_task(name: str, work: Callable[[], Any]) -> Any:
    """One step of the prepare stage as a Prefect task of its own."""
    return task(name=name, cache_policy=NO_CACHE)(work)()


@flow(name="prepare", log_prints=False)
def prepare_flow(
    store_path: str,
    config: dict[str, Any],
    fingerprint_path: str | None = None,
    dask_address: str | None = None,
    force: bool = False,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Compute the training targets of the scene store at ``store_path``."""
    cfg = PrepareConfig.model_validate(config)
    if not force and is_current(open_store(store_path), cfg):  # no cluster to start
        r = prepare_store(store_path, cfg, fingerprint_path=fingerprint_path)
        return {"store": store_path, "skipped": True, "fingerprint": str(r.fingerprint_path)}
    with dask_client(dask_address) as client:
        from distributed import progress

        bar = (lambda fut: progress(fut, notebook=False)) if show_progress else None
        r = prepare_store(store_path, cfg, client=client, progress=bar,
                          fingerprint_path=fingerprint_path, force=force, step=as_task)  # fmt: skip
    result = {
        "store": store_path,
        "skipped": False,
        "instances": r.instances,
        "class_counts": r.class_counts,
        "class_weights": r.class_weights,
        "fingerprint": str(r.fingerprint_path),
    }
    create_markdown_artifact(
        key="prepare-summary",
        markdown=_summary(result, cfg),
        description=f"prepare of {store_path}",
    )
    return result


def _summary(r: dict[str, Any], cfg: PrepareConfig) -> str:
    rows = "".join(
        f"| {c} | {n} | {r['class_weights'].get(c, 1.0):.4g} |\n"
        for c, n in r["class_counts"].items()
    )
    return (
        f"### segflow prepare\n\n`{r['store']}`: border weights w0={cfg.w0:g}, sigma={cfg.sigma:g} px, "
        f"eps={cfg.eps:g}; class weights {cfg.class_weights}; instances from {r['instances']}; "
        f"fingerprint `{r['fingerprint']}`\n\n| class | pixels (training region) | weight |\n"
        f"|---|---|---|\n{rows}"
    )


def build_config(args: argparse.Namespace) -> PrepareConfig:
    """Options from a pipeline config (if given), overridden by the command line."""
    base = load_config(args.config).prepare.model_dump() if args.config else {}
    return config_with(
        base,
        overrides={name: getattr(args, name, None) for name in FLAGS},
        explicit_weights=args.explicit_weights,
        train_bbox=args.train_bbox,
        train_blocks=args.train_blocks,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python flows/prepare.py",
        description="Border-weight map, class weights and normalization fingerprint of a scene store.",
    )
    p.add_argument("store", help="scene store (STORE.zarr) written by flows/ingest.py")
    add_options(p, PrepareConfig, skip=NESTED)  # --w0, --sigma, --eps, --class-weights
    p.add_argument("--explicit-weights", help="explicit class weights, e.g. 0=1,1=5")
    p.add_argument("--train-bbox", type=int, nargs=4, metavar=("R0", "C0", "R1", "C1"),
                   help="training region: pixel rows [R0, R1) and columns [C0, C1)")  # fmt: skip
    p.add_argument("--train-blocks", type=int, nargs=2, metavar=("BLOCK", "EVERY"),
                   help="training region: hold out every EVERY-th block of BLOCK pixels")  # fmt: skip
    p.add_argument("--fingerprint", help="fingerprint JSON to write (default: NAME.fingerprint.json)")
    p.add_argument("--config", help="pipeline YAML whose 'prepare' section to start from")
    p.add_argument(
        "--dask-address", help="Dask scheduler (default: $SEGFLOW_DASK_ADDRESS or a local cluster)"
    )
    p.add_argument("--force", action="store_true", help="recompute even if the store is current")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cfg = build_config(args)
    store = open_store(args.store)
    check_inputs(store, cfg)  # fail in a second, before Prefect and Dask start
    if not args.force and is_current(store, cfg):
        print(
            f"{args.store}: prepare is up to date (fingerprint {store.meta['prepare']['fingerprint_path']})"
        )
        return
    show = not args.no_progress and sys.stdout.isatty()
    with prefect_api():
        r = prepare_flow(
            args.store, cfg.model_dump(mode="json"), args.fingerprint, args.dask_address,
            args.force, show,
        )  # fmt: skip
    weights = ", ".join(f"{k}: {v:.4g}" for k, v in r["class_weights"].items()) or "1 (no labels)"
    source = "given" if r["instances"] == "instances" else "connected components of the labels"
    print(
        f"{r['store']}: weights written (instances: {source}); class weights {weights}; "
        f"fingerprint {r['fingerprint']}"
    )


if __name__ == "__main__":
    run_cli(main)
