"""Prefect flow: build the training stores a pipeline lists (ingest + prepare), then train.

    python flows/train.py --config pipelines/NAME.yaml [--out DIR] [--resume]
        [--steps N] [--time-limit SECONDS] [--device cpu|cuda:0] [--prepare-only]
        [--no-prefect] [--no-progress]

Two coarse tasks: ``prepare-data`` (every store of ``train.stores`` that is missing and has a
``source`` is ingested with the pipeline's ``ingest`` section as a template and prepared with
its ``prepare`` section; current stores are skipped) and ``train`` (the library's
:func:`segflow.train.loop.train`). The default output directory is the config's
``work_dir`` + ``/train`` (``outputs/NAME/train`` unless set), where the pipeline looks.

DDP (many GPUs or CPU processes): build the stores once, then launch every rank without
Prefect (the flow does this by itself when ``WORLD_SIZE`` is set):

    python flows/train.py --config pipelines/NAME.yaml --prepare-only
    torchrun --nproc_per_node=2 flows/train.py --config pipelines/NAME.yaml --no-prefect
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # flows/_common.py
from _common import run_cli
from _warm_api import prefect_api, warm_prefect_api

from segflow.config import PipelineConfig, load_config
from segflow.config.train import TrainConfig, make_train_config
from segflow.io import locations, remote
from segflow.stages.report import training_markdown
from segflow.stages.training import (
    build_training_stores,
    check_training_request,
    training_config,
)


def ensure_stores(cfg: PipelineConfig, tcfg: TrainConfig, show: bool) -> list[dict[str, Any]]:
    """Build the stores the training config lists (the library's), with a progress bar."""
    refs = {r.store for r in (*tcfg.stores.train, *tcfg.stores.val)}
    if not show:
        return list(build_training_stores(cfg, tcfg))
    from tqdm import tqdm

    with tqdm(total=len(refs), desc="prepare data", unit="store", file=sys.stderr) as bar:
        return list(build_training_stores(cfg, tcfg, on_store=lambda _: bar.update(1)))


def run_training(tcfg: TrainConfig, out: Path | str, *, resume: bool, device: str | None,
                 show: bool, upload: Any = None) -> dict[str, Any]:
    """The library trainer with a progress bar; a JSON-ready summary. An ``out`` on object
    storage: trained into a local mirror of it, uploaded with each saved state."""
    if remote.is_url(out):
        with locations.local_mirror(str(out), cache=locations.cache_root()) as local:
            return run_training(tcfg, local, resume=resume, device=device, show=show,
                                upload=lambda _: locations.sync_up(local, str(out)))
    from segflow.train.loop import train

    bar = None
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if show and rank0:
        from tqdm import tqdm

        bar = tqdm(total=tcfg.total_steps, desc="train", unit="step", file=sys.stderr)

    def progress(step: int, total: int, info: Any) -> None:
        if bar is None:
            return
        bar.n = step
        post = {"loss": f"{info['loss']:.4f}"}
        if "pixel_error" in info:
            post["val_pixel_error"] = f"{info['pixel_error']:.4f}"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    res = train(tcfg, out_dir=out, resume=resume, device=device, progress=progress,
                on_state_saved=upload)
    if bar is not None:
        bar.close()
    return res.summary()


def make_flow() -> Any:
    from prefect import flow, task
    from prefect.artifacts import create_markdown_artifact
    from prefect.cache_policies import NO_CACHE

    @task(name="prepare-data", cache_policy=NO_CACHE)
    def prepare_task(pipeline: dict[str, Any], train: dict[str, Any], show: bool
                     ) -> list[dict[str, Any]]:
        return ensure_stores(PipelineConfig.model_validate(pipeline),
                             make_train_config(train), show)

    @task(name="train", cache_policy=NO_CACHE)
    def train_task(train: dict[str, Any], out: str, resume: bool, device: str | None,
                   show: bool) -> dict[str, Any]:
        return run_training(make_train_config(train), out, resume=resume, device=device,
                            show=show)

    @flow(name="train", log_prints=False)
    def train_flow(pipeline: dict[str, Any], train: dict[str, Any], out: str, resume: bool,
                   device: str | None, prepare_only: bool, show: bool) -> dict[str, Any]:
        """Build the stores a pipeline lists, then train on them (configs validated already)."""
        prepared = prepare_task(pipeline, train, show)
        if prepare_only:
            return {"prepared": prepared}
        result = train_task(train, out, resume, device, show)
        create_markdown_artifact(
            key="train-summary",
            markdown=training_markdown(result, make_train_config(train).select_metric),
            description=f"training of pipeline {pipeline['name']}",
        )
        return result

    return train_flow


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python flows/train.py",
                                description="Build the training stores of a pipeline and train.")
    p.add_argument("--config", required=True, help="pipeline YAML with a 'train' section")
    p.add_argument("--out", help="output directory or URL (default: the config's work_dir/train)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--time-limit", type=float, help="stop after this many seconds of training")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    p.add_argument("--prepare-only", action="store_true", help="only ingest/prepare the stores")
    p.add_argument("--no-prefect", action="store_true",
                   help="run without Prefect (implied under torchrun, where WORLD_SIZE is set)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))  # > 1 under torchrun
    no_prefect = args.no_prefect or ranks > 1
    if not no_prefect and __name__ == "__main__":  # the API comes up while the config is checked
        warm_prefect_api()
    cfg = load_config(args.config)
    # fail in a second, before Prefect starts
    tcfg = training_config(cfg, steps=args.steps, time_limit_s=args.time_limit, source=args.config)
    out = args.out or locations.join(cfg.work_path, "train")  # a path, or a URL
    check_training_request(tcfg, out, device=args.device, prepare_only=args.prepare_only)
    show = not args.no_progress and sys.stderr.isatty()
    if no_prefect:
        if ranks <= 1:
            ensure_stores(cfg, tcfg, show)
        if args.prepare_only:
            return
        result = run_training(tcfg, out, resume=args.resume, device=args.device, show=show)
    else:
        with prefect_api():
            result = make_flow()(cfg.model_dump(mode="json"), tcfg.model_dump(mode="json"),
                                 str(out), args.resume, args.device, args.prepare_only, show)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    run_cli(main)
