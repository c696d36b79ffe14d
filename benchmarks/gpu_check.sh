#!/usr/bin/env bash
# One short GPU check (H100/H200 with PyTorch and Triton, no network), under five minutes:
#   1. install the package from this working tree (offline, editable, no dependencies);
#   2. run the GPU tests (pytest -m gpu over tests/) and the Triton tests natively;
#   3. time the sampler (benchmarks/bench_gpu.py) and print one markdown table; the full table goes
#      to $OUT/gpu_bench.md when OUT is set, else benchmarks/gpu_bench_latest.md.
# Usage: bash benchmarks/gpu_check.sh            (PYTHON=... to choose the interpreter)
# Every step runs even if an earlier one fails; the exit code is non-zero if any failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
T0=$(date +%s)
status=0
step() { echo; echo "=== $* ($(( $(date +%s) - T0 )) s)"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi unavailable"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available())" || status=1

step "install (offline, editable)"
if ! timeout 120 "$PY" -m pip install --no-build-isolation --no-deps --no-index -q -e . 2>&1 | tail -5; then
  echo "pip install failed: using the working tree through PYTHONPATH instead"
fi
# The working tree first in any case, so the tests and the benchmark use exactly this code.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import l2m_fast.ops as o, l2m_fast.ops.triton_kernel as k; print('l2m_fast.ops from', o.__file__, '| triton ok:', k.HAS_TRITON)" || status=1

step "GPU tests (pytest -m gpu) and the Triton tests natively"
timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider -m gpu tests || status=1
timeout 100 "$PY" -m pytest -q -p no:cacheprovider -m "not gpu" tests/test_triton.py || status=1

step "benchmark"
left=$(( 280 - ($(date +%s) - T0) ))
budget=$(( left > 200 ? 170 : (left > 60 ? left - 40 : 20) ))
timeout $(( budget + 90 )) "$PY" benchmarks/bench_gpu.py --budget-s "$budget" || status=1

step "done, status $status"
exit $status
