#!/usr/bin/env bash
# Dask workers on one GPU node: one worker per GPU, each seeing only its own device and
# declaring the resource segment_region's tasks ask for (GPU=1).
#
#   deploy/dask/gpu-node.sh tcp://scheduler:8786 [THREADS_PER_WORKER]
#   python flows/segment_region.py --dask-address tcp://scheduler:8786 --device cuda \
#       --image /data/scene.tif --model /data/model/best --out /data/mask.tif
#
# With dask-cuda installed (`pip install dask-cuda`) its worker does the same per GPU:
#   dask cuda worker tcp://scheduler:8786 --resources GPU=1
# Threads feed the GPU (reading, normalizing, stitching, encoding): 4 per GPU keep a mid-range
# card busy with segflow's U-Nets; raise them for faster cards.
set -euo pipefail
# glibc keeps large freed blocks for reuse in the workers' task threads (a Dask nanny would set
# MALLOC_TRIM_THRESHOLD_=65536): segflow.runtime.malloc_environment
export MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=268435456 MALLOC_ARENA_MAX=1
SCHEDULER=${1:?usage: gpu-node.sh SCHEDULER_ADDRESS [THREADS_PER_WORKER]}
THREADS=${2:-4}
GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
pids=()
for ((i = 0; i < GPUS; i++)); do
  CUDA_VISIBLE_DEVICES=$i dask worker "$SCHEDULER" --name "$(hostname)-gpu$i" \
    --nthreads "$THREADS" --resources GPU=1 --memory-limit 0 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
wait
