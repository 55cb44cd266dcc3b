"""Start Dask workers as Slurm jobs with dask-jobqueue and print the scheduler address.

    pip install dask-jobqueue
    python deploy/dask/slurm-jobqueue.py --jobs 8 &
    export SEGFLOW_DASK_ADDRESS=$(cat dask-scheduler-address.txt)
    python flows/pipeline.py pipelines/NAME.yaml

GPU inference (segment_region): ``--gpu`` makes each job one worker on one GPU
(``--gres=gpu:1``), declaring the ``GPU=1`` resource that segment_region's tasks ask for:

    python deploy/dask/slurm-jobqueue.py --gpu --jobs 16 --cores 8 --memory 64GB &
    python flows/segment_region.py --dask-address $(cat dask-scheduler-address.txt) \
        --device cuda --image /shared/mosaic.vrt --model /shared/model/best --out /shared/mask.tif
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import dask
from dask_jobqueue import SLURMCluster

from segflow.runtime import malloc_environment


def _prologue() -> list[str]:
    """The job script's prologue from Dask's config (a ``module load``, a ``source``), then
    segflow's malloc settings: large freed blocks kept for reuse in the workers' task threads
    (``segflow.runtime.malloc_environment``)."""
    configured = list(dask.config.get("jobqueue.slurm.job-script-prologue", None) or [])
    return configured + [f"export {k}={v}" for k, v in malloc_environment().items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--cores", type=int, default=8)
    ap.add_argument("--memory", default="32GB")
    ap.add_argument("--queue", default=None)
    ap.add_argument("--walltime", default="04:00:00")
    ap.add_argument("--gpu", action="store_true", help="one GPU per job (segment_region)")
    args = ap.parse_args()
    # a GPU job shares its node: one GPU, its cores; a CPU job takes the whole node
    extra = ["--gres=gpu:1"] if args.gpu else ["--exclusive"]
    cluster = SLURMCluster(
        cores=args.cores, processes=1, memory=args.memory, queue=args.queue,
        walltime=args.walltime, local_directory="$TMPDIR",
        job_extra_directives=extra,
        worker_extra_args=["--resources", "GPU=1"] if args.gpu else [],
        job_script_prologue=_prologue(),
    )
    cluster.scale(jobs=args.jobs)
    Path("dask-scheduler-address.txt").write_text(cluster.scheduler_address)
    print(cluster.scheduler_address, flush=True)
    while True:  # keep the scheduler alive; Ctrl-C cancels the jobs
        time.sleep(60)


if __name__ == "__main__":
    main()
