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
import logging
import os
import sys
from pathlib import Path
from typing import Any

# a loaded machine can take longer than Prefect's default 20 s to start the temporary API server
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # flows/_common.py
from _common import run_cli
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from segflow.cluster import dask_client
from segflow.config import PrepareConfig, load_config
from segflow.errors import ConfigError
from segflow.prepare import (
    check_inputs,
    compute_class_counts,
    compute_class_weights,
    compute_fingerprint,
    ensure_instances,
    is_current,
    make_config,
    open_store,
    write_fingerprint,
    write_weights,
)


def _client_and_bar(show: bool) -> tuple[Any, Any]:
    from distributed import default_client, progress

    return default_client(), (lambda fut: progress(fut, notebook=False)) if show else None


@task(name="instances", cache_policy=NO_CACHE)
def instances_task(store_path: str, show_progress: bool) -> str:
    client, bar = _client_and_bar(show_progress)
    return ensure_instances(open_store(store_path), client=client, progress=bar)


@task(name="class-weights", cache_policy=NO_CACHE)
def class_weights_task(
    store_path: str, config: dict[str, Any], show_progress: bool
) -> dict[str, Any]:
    client, bar = _client_and_bar(show_progress)
    cfg = PrepareConfig.model_validate(config)
    counts = compute_class_counts(open_store(store_path), cfg, client=client, progress=bar)
    return {"counts": counts, "weights": compute_class_weights(counts, cfg)}


@task(name="weight-map", cache_policy=NO_CACHE)
def weight_map_task(
    store_path: str,
    config: dict[str, Any],
    class_weights: dict[int, float],
    force: bool,
    show_progress: bool,
) -> bool:
    client, bar = _client_and_bar(show_progress)
    return write_weights(
        open_store(store_path),
        PrepareConfig.model_validate(config),
        class_weights,
        client=client,
        progress=bar,
        force=force,
    )


@task(name="fingerprint", cache_policy=NO_CACHE)
def fingerprint_task(
    store_path: str,
    config: dict[str, Any],
    counts: dict[int, int],
    class_weights: dict[int, float],
    fingerprint_path: str | None,
    show_progress: bool,
) -> str:
    client, bar = _client_and_bar(show_progress)
    store = open_store(store_path)
    cfg = PrepareConfig.model_validate(config)
    fp = compute_fingerprint(store, cfg, counts, class_weights, client=client, progress=bar)
    return str(write_fingerprint(store, fp, cfg, fingerprint_path))


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
    store = open_store(store_path)
    check_inputs(store, cfg)
    if not force and is_current(store, cfg):
        return {
            "store": store_path,
            "skipped": True,
            "fingerprint": store.meta["prepare"]["fingerprint_path"],
        }
    for name in (
        "distributed",
        "distributed.scheduler",
        "distributed.worker",
        "distributed.core",
        "distributed.http.proxy",
        "distributed.nanny",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)  # cluster start-up chatter
    with dask_client(dask_address):
        source = instances_task(store_path, show_progress)
        cw = class_weights_task(store_path, config, show_progress)
        written = weight_map_task(store_path, config, cw["weights"], force, show_progress)
        out = fingerprint_task(
            store_path, config, cw["counts"], cw["weights"], fingerprint_path, show_progress
        )
    result = {
        "store": store_path,
        "skipped": False,
        "instances": source,
        "weights_written": written,
        "class_counts": cw["counts"],
        "class_weights": cw["weights"],
        "fingerprint": out,
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


def _explicit(text: str | None) -> dict[int, float] | None:
    if text is None:
        return None
    try:
        pairs = [p.split("=") for p in text.split(",") if p.strip()]
        return {int(k): float(v) for k, v in pairs}
    except ValueError:
        raise ConfigError(
            f"--explicit-weights must be id=weight pairs separated by commas, e.g. 0=1,1=5: got {text!r}"
        ) from None


def build_config(args: argparse.Namespace) -> PrepareConfig:
    """Options from a pipeline config (if given), overridden by the command line."""
    base: dict[str, Any] = {}
    if args.config:
        base = load_config(args.config).prepare.model_dump()
    for key in ("w0", "sigma", "eps", "class_weights"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    explicit = _explicit(args.explicit_weights)
    if explicit is not None:
        base["explicit_class_weights"] = explicit
        if args.class_weights is None:
            base["class_weights"] = "explicit"
    if args.train_bbox and args.train_blocks:
        raise ConfigError("give either --train-bbox or --train-blocks, not both")
    if args.train_bbox:
        base["train_region"] = {"bbox": tuple(args.train_bbox)}
    elif args.train_blocks:
        base["train_region"] = {
            "block": args.train_blocks[0],
            "holdout_every": args.train_blocks[1],
        }
    return make_config(**base)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python flows/prepare.py",
        description="Border-weight map, class weights and normalization fingerprint of a scene store.",
    )
    p.add_argument("store", help="scene store (STORE.zarr) written by flows/ingest.py")
    p.add_argument("--w0", type=float, help="border weight w0 (default 10; 0 = no border term)")
    p.add_argument("--sigma", type=float, help="border width sigma in pixels (default 5)")
    p.add_argument("--eps", type=float, help="cut the border term off below eps (default 1e-3)")
    p.add_argument(
        "--class-weights",
        choices=["none", "inverse", "median", "explicit"],
        help="class weight mode (default none: w_c = 1)",
    )
    p.add_argument("--explicit-weights", help="explicit class weights, e.g. 0=1,1=5")
    p.add_argument(
        "--train-bbox",
        type=int,
        nargs=4,
        metavar=("R0", "C0", "R1", "C1"),
        help="training region: pixel rows [R0, R1) and columns [C0, C1)",
    )
    p.add_argument(
        "--train-blocks",
        type=int,
        nargs=2,
        metavar=("BLOCK", "EVERY"),
        help="training region: hold out every EVERY-th block of BLOCK pixels",
    )
    p.add_argument(
        "--fingerprint",
        help="where to write the fingerprint JSON (default: beside the store, NAME.fingerprint.json)",
    )
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
    r = prepare_flow(
        args.store,
        cfg.model_dump(mode="json"),
        args.fingerprint,
        args.dask_address,
        args.force,
        show,
    )
    weights = ", ".join(f"{k}: {v:.4g}" for k, v in r["class_weights"].items()) or "1 (no labels)"
    source = "given" if r["instances"] == "instances" else "connected components of the labels"
    print(
        f"{r['store']}: weights written (instances: {source}); class weights {weights}; "
        f"fingerprint {r['fingerprint']}"
    )


if __name__ == "__main__":
    run_cli(main)
