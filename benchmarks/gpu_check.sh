#!/usr/bin/env bash
# The whole GPU check in one short run, for the few minutes a lent GPU machine gives:
# the gpu tests (tests/test_gpu.py), then benchmarks/bench_gpu.py; what they print goes to
# $OUT (or ./gpu-check). Exit status: non-zero when either failed.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   SIZE=4096 STEPS=30 bash benchmarks/gpu_check.sh   # shorter
set -u
out="${OUT:-gpu-check}"
mkdir -p "$out"
py="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
{ nvidia-smi; "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"; } > "$out/device.txt" 2>&1
"$py" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py > "$out/gpu-tests.txt" 2>&1
tests=$?
timeout "${BENCH_TIMEOUT:-420}" "$py" benchmarks/bench_gpu.py --device "${DEVICE:-cuda}" \
    --size "${SIZE:-8192}" --steps "${STEPS:-60}" --workdir "$out/data" \
    > "$out/bench_gpu.json" 2> "$out/bench_gpu.err"
bench=$?
rm -rf "$out/data"
tail -n 3 "$out/gpu-tests.txt"
cat "$out/bench_gpu.json"
echo "gpu tests exit $tests, bench_gpu exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
