#!/usr/bin/env bash
# The one-shot GPU check (H100/H200 with PyTorch and Triton, no network), sized for about 6 minutes
# and at most 450 s of step timeouts, so a single run under a 480 s limit loses nothing:
#   1. device and versions;
#   2. the benchmark (benchmarks/bench_gpu.py): flat P = 1e8 with S descending, the 146-tensor model,
#      P = 1e6, torch.compile rows last; every row goes to stdout and to $OUT/gpu_bench.md as soon as
#      it is measured, a failing row keeps its error as its note;
#   3. the GPU tests (pytest -m gpu, no -x), torch.compile excluded;
#   4. the Triton tests natively (every kernel path the CPU interpreter checks, compiled for the GPU);
#   5. the torch.compile test, on its own, last.
# The working tree is used through PYTHONPATH (no install, no C++ build: the CPU kernel is not needed
# here, L2M_FAST_FORCE_REFERENCE=1). Logs of every step go to $OUT (default /tmp/l2m_fast_gpu_check);
# the benchmark table is printed again at the end, where a truncated log still shows it.
# Usage: bash benchmarks/gpu_check.sh            (PYTHON=... to choose the interpreter)
# Every step runs even if an earlier one fails; the exit code is non-zero if any failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-${TMPDIR:-/tmp}/l2m_fast_gpu_check}
mkdir -p "$OUT"
export OUT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export L2M_FAST_FORCE_REFERENCE=1
T0=$(date +%s)
status=0
step() { echo; echo "=== $* ($(( $(date +%s) - T0 )) s)" | tee -a "$OUT/gpu_check.log"; }
run() {  # run LOGNAME TIMEOUT_S CMD...: output to the terminal and to $OUT/LOGNAME.log; a failure sets status
  local log="$OUT/$1.log" limit=$2
  shift 2
  timeout "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  echo "exit $rc: $*" | tee -a "$OUT/gpu_check.log"
  [ "$rc" -eq 0 ] || status=1
}

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$OUT/gpu_check.log"
run versions 20 "$PY" -c "import torch, triton, l2m_fast.ops.triton_kernel as k; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available(), 'l2m_fast from', k.__file__)"

step "benchmark (rows in $OUT/gpu_bench.md as measured)"
run bench 190 "$PY" benchmarks/bench_gpu.py --budget-s 140

step "GPU tests (pytest -m gpu, torch.compile excluded)"
run gpu_tests 80 "$PY" -m pytest -q -p no:cacheprovider -m gpu -k "not torch_compile" -rA \
  tests/test_triton.py tests/test_triton_segments.py

step "Triton tests natively (not gpu)"
run triton_native 100 "$PY" -m pytest -q -p no:cacheprovider -m "not gpu" -k "not dispatch_under_torch_compile" -rfE \
  tests/test_triton.py tests/test_triton_segments.py

step "torch.compile test"
run compile_test 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu -k torch_compile -rA tests/test_triton.py

step "benchmark table again ($OUT/gpu_bench.md)"
cat "$OUT/gpu_bench.md" 2>/dev/null || echo "no benchmark table"

step "done, status $status"
exit $status
