#!/usr/bin/env bash
# One-shot check for a lent CUDA machine (no internet): install dsx offline, print versions, run the tests natively
# (TRITON_INTERPRET=0, so the Triton kernels run on the GPU) and the GPU benchmarks, each step under its own timeout
# (about 8 minutes in all). Every step's output goes to $OUT (default: gpu_check_out/) and to the terminal; a failing
# step is reported and the next one still runs. On a machine without CUDA it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to run"
  exit 0
fi
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a timeout, tee its output to $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT/$name.txt"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

step install 90 python -m pip install --no-deps --no-build-isolation -q -e .
step versions 30 python -c "import torch, triton, transformers; p = torch.cuda.get_device_properties(0); \
print(f'device: {p.name} (sm{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB); torch {torch.__version__}; \
triton {triton.__version__}; transformers {transformers.__version__}; CUDA {torch.version.cuda}')"
# DSX_CUDA_TESTS_DEVICE=cuda: tests/cuda fails instead of skipping if it cannot reach the GPU
step tests 300 env DSX_CUDA_TESTS_DEVICE=cuda python -m pytest -q -x -p no:cacheprovider tests/kernels \
  tests/quant/test_linear.py tests/quant/test_int4.py tests/compress/test_sparsity.py tests/export/test_fp8.py \
  tests/graph/test_backend.py tests/cuda
step bench_kernels 60 python benchmarks/bench_kernels.py --iters 20
step bench_optimize 120 python benchmarks/bench_optimize.py --device cuda --models gpt,bert --iters 10 --no-progress

echo "gpu_check: outputs in $OUT/; failed steps: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
