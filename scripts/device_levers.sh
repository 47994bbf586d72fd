#!/usr/bin/env bash
# One device call (≤ 10 minutes) for the compile-era levers of issue 13, when a machine is
# scarce: the CUDA tests of the changed layers ($OUT/cuda-tests.txt), the bench's eager and
# compiled fixed-tokens steps of phase8:small, phase2:small and the transformer at 4096 and
# 65536 (results under $OUT/results, log in $OUT/bench.log), then
# `muse train` with compile_mode=reduce-overhead against eager (under $OUT/train). wiki-mini
# must be carried in .data/stage/wiki-mini.
#   MUSE_GIT_SHA=$(git rev-parse --short HEAD) bash scripts/device_levers.sh
set -uo pipefail
here=$(dirname "$0")
# the changed paths against float64 on CUDA: trust a timing only where these passed
timeout 90 python3 -m pytest -m gpu -q -p no:cacheprovider tests/layers/test_hebbian_cuda.py \
  tests/layers/test_linear_attention_cuda.py > "$OUT/cuda-tests.txt" 2>&1
tail -1 "$OUT/cuda-tests.txt"
MUSE_BENCH_LIMIT=${MUSE_BENCH_LIMIT:-300} bash "$here/device_bench.sh" -k "compiled or fixed_tokens" \
  --compile --model phase8:small phase2:small transformer:small --seq 4096 65536 \
  --loss-chunk 4096 --ignore bench/test_perplexity.py --ignore bench/test_bk_core.py \
  > /dev/null 2>&1
bench=$?
grep -E "speedup|compile_gain|peak" "$OUT/bench.txt" | cut -c1-110
mkdir -p "$OUT/train"
OUT="$OUT/train" MODES="eager reduce-overhead" timeout "${MUSE_TRAIN_LIMIT:-220}" \
  bash "$here/device_train_compile.sh" phase2:small 4096 1 30 .data/stage/wiki-mini | tail -4
train=$?
echo "bench exit $bench, train exit $train" | tee -a "$OUT/machine.txt"
[ "$bench" -eq 0 ] && [ "$train" -eq 0 ]
