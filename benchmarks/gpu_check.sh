#!/usr/bin/env bash
# The one-shot GPU check (issue 8): on a lent H100 or H200, in at most 7 minutes (about 5 on an H100,
# most of it compiling the test tier's kernel variants under triton 3.6),
#   1. the GPU test tier (tests/test_gpu.py: compiled kernels across the GPU presets' tile, split and
#      chunk boundaries, every dtype and label form, C·D > 2^31, same bits twice), then
#   2. the benchmark's cases A, B, C (python -m benchmarks.run --gpu-check: naive, torch.compile, fused,
#      floor; forward, backward, both; peak memory; out-of-memory recorded, not fatal),
#   3. the fused step's time per kernel on the same cases (python -m benchmarks.kernel_times),
# writing into OUT_DIR: device.txt, tests.txt, benchmark.txt, kernels.txt and the benchmark's JSON and PNG
# (the PNG only where matplotlib is installed; `python -m benchmarks.plot OUT_DIR/*.json` draws it later).
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# The GPU machine has its own torch and triton and no network, so nothing is installed: the package is
# staged in a temporary folder in its installed layout (circleloss_ext/ with kernels/ inside, no C++
# extension, which only CPU tensors use) and run from there.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -r "$repo/circleloss_ext" "$stage/circleloss_ext"
cp -r "$repo/kernels" "$stage/circleloss_ext/kernels"
cd "$stage"  # first on sys.path: the staged package; the repository (benchmarks/, tests/) after it
export PYTHONPATH="$repo"

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} | tee "$out/device.txt"

status=0
echo "== GPU test tier" | tee "$out/tests.txt"
timeout 270 python3 -m pytest -q -rP -p no:cacheprovider "$repo/tests/test_gpu.py" 2>&1 | tee -a "$out/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark: cases A, B, C" | tee "$out/benchmark.txt"
timeout 100 python3 -m benchmarks.run --gpu-check --out "$out" 2>&1 | tee -a "$out/benchmark.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== time per kernel" | tee "$out/kernels.txt"
timeout 50 python3 -m benchmarks.kernel_times 2>&1 | tee -a "$out/kernels.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
