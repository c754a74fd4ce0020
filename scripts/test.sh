#!/usr/bin/env bash
# The README's test command: make a virtual environment, install kvxfer with its test extras
# (CPU torch from the local wheel store), make sure redis-server exists, run the test suite.
# GPU tests skip with a visible reason on machines without a CUDA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVXFER_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# torch 2.13.0 installs the CPU build from local disk here; a bare 'torch' would pull CUDA wheels
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[test]"
if [ -f scripts/extra-requirements.txt ]; then
  "$VENV/bin/python" -m pip install -q -r scripts/extra-requirements.txt || echo "note: optional extras did not install; their tests will skip"
fi
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
      || echo "note: redis-server could not be installed; Redis tests will skip"
  else
    echo "note: redis-server not found; Redis tests will skip"
  fi
fi
# the multi-host tests build network namespaces with iproute2
command -v ip >/dev/null 2>&1 || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; } \
  || echo "note: iproute2 missing; multi-host tests will skip"
set +e
"$VENV/bin/python" -m pytest -q -rs "$@"
rc=$?
set -e
[ "$rc" = 5 ] && { echo "no tests collected"; exit 1; }
# the vLLM plugin's tests run in vLLM's own environment (about 9 GB, reused between runs)
if [ "$rc" = 0 ] && [ "${KVXFER_SKIP_VLLM:-0}" != 1 ] && [ $# = 0 ]; then
  bash scripts/test_vllm.sh || rc=$?
fi
exit "$rc"
