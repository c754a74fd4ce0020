#!/usr/bin/env bash
# One device-machine call (2 GPUs): GPU tests, then the benchmarks the backend issues ask for,
# each under its own time limit, figures collected into $OUT/results.tgz and $OUT/suite.log.
# Usage (on the device, repo root): bash bench/gpu_suite.sh [PART]   PART: all | tests | bench
set -u
PART=${1:-all}
OUT=${OUT:-/tmp/out}
RES=/tmp/kvxfer-results
mkdir -p "$OUT" "$RES"
LOG="$OUT/suite.log"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
COMMIT=$(cat .carry/COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
export KVXFER_COMMIT="$COMMIT"
if ls .carry/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/wheels/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T), limit ${secs}s)" | tee -a "$LOG"
  timeout -k 5 "$secs" "$@" >>"$LOG" 2>&1
  echo "=== $name exit $?" | tee -a "$LOG"
}
nvidia-smi --query-gpu=name,memory.total --format=csv >>"$LOG" 2>&1
if [ "$PART" = all ] || [ "$PART" = tests ]; then
  step gpu-tests "${T_TESTS:-240}" python3 -m pytest -q -rs -m gpu -p no:cacheprovider --timeout 120 ${GPU_TESTS:-tests/test_ops_pairs.py tests/test_ops_cuda.py tests/test_tcp_gpu.py tests/test_ucx_gpu.py tests/test_cuda_ipc.py tests/test_cuda_ipc_bounds.py tests/test_vllm_layouts_gpu.py tests/test_cancel.py}
  # the installed wheel compiles its own kernel sources (build it here first: pip wheel . --no-deps -w .carry/kvxfer-wheel)
  if ls .carry/kvxfer-wheel/kvxfer-*.whl >/dev/null 2>&1; then
    step wheel-gpu 90 env KVXFER_TEST_WHEEL="$(ls .carry/kvxfer-wheel/kvxfer-*.whl)" python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_wheel_install.py
  fi
  [ -n "${E2E_CMD:-}" ] && step e2e-cuda 90 $E2E_CMD
fi
if [ "$PART" = all ] || [ "$PART" = bench ]; then
  step bench-ipc "${T_IPC:-80}" python3 bench/bench_ipc.py --workloads "${IPC_WL:-llama8b,llama8b-tp8,small}" --out "$RES/ipc_bench.json" --commit "$COMMIT"
  step bench-pack "${T_PACK:-90}" python3 bench/bench_pack.py "$RES/pack.json" --commit "$COMMIT"
  step bench-vllm-layouts "${T_VL:-90}" python3 bench/bench_vllm_layouts.py --out "$RES/vllm_layouts.json" --commit "$COMMIT"
  step bench-tcp "${T_TCP:-80}" python3 bench/bench_tcp.py --memory both --local-device cuda:0 --peer-device cuda:1 --iters 4 --json "$RES/tcp_gpu_vs_host.json"
  step kvxfer-bench "${T_KB:-110}" python3 -m kvxfer.tools.bench --backend all --memory cuda --devices 0,1 --workload llama8b --op both --iters 5 --no-progress --json "$RES/kvxfer_bench_llama8b.json"
  step ucx-gpu-llama8b "${T_UCX:-60}" env UCX_TLS=tcp,sm,cuda_copy,cuda_ipc python3 bench/bench_ucx.py gpu --workload llama8b --depth 1 4
  [ -f "$OUT/bench_ucx_gpu.json" ] && mv "$OUT/bench_ucx_gpu.json" "$RES/ucx_gpu_llama8b.json"
  [ -n "${UCX_TP8:-}" ] && step ucx-gpu-tp8 50 env UCX_TLS=tcp,sm,cuda_copy,cuda_ipc python3 bench/bench_ucx.py gpu --workload llama8b-tp8 --depth 1 2
  # many rounds of 4 packed reads in flight, 256 MiB pieces, every byte of every destination checked at the end
  [ -n "${UCX_STRESS:-}" ] && step ucx-gpu-stress 120 env UCX_TLS=tcp,sm,cuda_copy,cuda_ipc python3 bench/bench_ucx.py gpu --workload llama8b --depth 4 --iters 40
  cp "$OUT"/*.json "$RES"/ 2>/dev/null
fi
tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
tail -c 4000 "$LOG"
