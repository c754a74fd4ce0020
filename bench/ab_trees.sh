#!/usr/bin/env bash
# A/B of two trees on one GPU, alternated in one device call: kvxfer-bench (cuda_ipc and UCX,
# --memory cuda --devices 0,0) and bench/bench_pack.py, ROUNDS times each, old then new.
# Usage (on the device, repo root): OLD=.carry/base bash bench/ab_trees.sh
#   OLD      the other tree (e.g. `git archive <rev> kvxfer bench csrc | tar -x -C .carry/base`;
#            trees before the kernels moved into kvxfer/csrc/ need their top-level csrc/ too)
#   ROUNDS   alternations (default 2); KB_BACKENDS (cuda_ipc,ucx), KB_WL (llama8b), NO_PACK=1
# UCX wheels in .carry/wheels are installed to /tmp/site first. Results: $OUT/ab.tgz.
set -u
export PYTHONUNBUFFERED=1 UCX_WARN_UNUSED_ENV_VARS=n NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}
ls .carry/wheels/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --target /tmp/site .carry/wheels/*.whl
NEW=$PWD; OLD=$(cd "${OLD:?set OLD to the other tree}" && pwd); R=/tmp/ab; mkdir -p "$R" "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/card.txt"; date -u | tee -a "$R/card.txt"
for round in $(seq "${ROUNDS:-2}"); do
  for t in old new; do
    P=$NEW; [ "$t" = old ] && P=$OLD
    (cd "$P" && PYTHONPATH="$P:/tmp/site" timeout "${KB_T:-150}" python3 -m kvxfer.tools.bench \
      --backend "${KB_BACKENDS:-cuda_ipc,ucx}" --memory cuda --devices 0,0 --workload "${KB_WL:-llama8b}" \
      --op both --iters 10 --no-progress --json "$R/kb_${t}_$round.json" > "$R/kb_${t}_$round.log" 2>&1
     echo "kvxfer-bench $t round $round rc=$?"; grep -E "^(cuda_ipc|ucx) " "$R/kb_${t}_$round.log")
    [ -n "${NO_PACK:-}" ] || (cd "$P" && PYTHONPATH="$P" timeout 100 python3 bench/bench_pack.py "$R/pack_${t}_$round.json" \
      > "$R/pack_${t}_$round.log" 2>&1; echo "bench_pack $t round $round rc=$?"; grep -iE "llama8b|ceiling" "$R/pack_${t}_$round.log" | head -8)
  done
done
tar czf "$OUT/ab.tgz" -C "$R" .
