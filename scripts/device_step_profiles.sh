#!/usr/bin/env bash
# Where issue 13's 65,536-token step spends its time, and what the batch-1 step gains from a
# CUDA graph, in one device call (≤ 10 minutes):
#   - `muse profile` of phase2:base's fixed-tokens step at 16×4096 ($OUT/profile-*.txt), once as
#     it runs and once with cuBLAS allowed TF32 (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1): the upside
#     of running the delta rule's float32 chunk products on tensor cores
#   - the bench's batch-1 step captured in a CUDA graph against the same step launched op by op,
#     for the issue-13 pairs (results under $OUT/results)
#   MUSE_GIT_SHA=$(git rev-parse --short HEAD) bash scripts/device_step_profiles.sh
set -uo pipefail
here=$(dirname "$0")
source "$here/device_facts.sh"
device_facts "bash scripts/device_step_profiles.sh (MODELS=${MODELS:-}, SEQS=${SEQS:-})"
common=(--seq 4096 --tokens-per-step 65536 --loss-chunk 4096 --rows 40)
python3 -W ignore -m muse.cli profile phase2:base "${common[@]}" > "$OUT/profile-eager.txt" 2>&1
head -1 "$OUT/profile-eager.txt"
TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 python3 -W ignore -m muse.cli profile phase2:base \
  "${common[@]}" > "$OUT/profile-eager-tf32.txt" 2>&1
head -1 "$OUT/profile-eager-tf32.txt"
read -ra models <<< "${MODELS:-phase2:base phase1:10gb transformer:base transformer:phase1-10gb}"
MUSE_BENCH_LIMIT=${MUSE_BENCH_LIMIT:-360} bash "$here/device_bench.sh" -k "cuda_graph and batch" \
  --cuda-graphs --model "${models[@]}" --seq ${SEQS:-4096 16384} --loss-chunk 4096 \
  --ignore bench/test_perplexity.py --ignore bench/test_bk_core.py > /dev/null 2>&1
status=$?
grep -E "speedup|gain|peak|passed|failed" "$OUT/bench.txt" | cut -c1-120
exit "$status"
