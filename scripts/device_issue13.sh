#!/usr/bin/env bash
# Issue 13's acceptance run in two device calls (each ≤ 10 minutes): the matched pairs
# phase2:base / transformer:base and phase1:10gb / transformer:phase1-10gb at 4096, 16384 and
# 65536, both protocols (--batch 1 and 65,536 tokens a step), the loss --loss-chunk 4096 for
# every model alike.
#   eager:    the CUDA tests of the compiled step and the custom ops ($OUT/cuda-tests.txt), the
#             eager steps and the decode criterion
#   compiled: the CUDA test of the compiled step's gradients, then the same steps under
#             torch.compile (inductor); SEQS narrows the seqs (phase2:base's compiles take
#             minutes: one seq a call)
#   MUSE_GIT_SHA=$(git rev-parse --short HEAD) bash scripts/device_issue13.sh eager|compiled
set -uo pipefail
here=$(dirname "$0")
# MODELS narrows the pairs (each model's matched transformer is measured for its ratio anyway)
read -ra models <<< "${MODELS:-phase2:base phase1:10gb transformer:base transformer:phase1-10gb}"
common=(--model "${models[@]}" --seq ${SEQS:-4096 16384 65536} --loss-chunk 4096
        --ignore bench/test_perplexity.py --ignore bench/test_bk_core.py)
case "${1:?eager or compiled}" in
  eager)
    # trust a timing only where the compiled step's gradients and the custom ops passed on CUDA
    # EAGER_TESTS narrows them (the compiled part runs test_compiled.py's own cases)
    read -ra tests <<< "${EAGER_TESTS:-tests/models/test_compiled.py tests/models/test_families_cuda.py tests/ops tests/layers}"
    timeout -s INT "${TESTS_LIMIT:-240}" python3 -m pytest -m gpu -q -p no:cacheprovider \
      "${tests[@]}" -k "cuda or triton" > "$OUT/cuda-tests.txt" 2>&1
    tail -1 "$OUT/cuda-tests.txt"
    MUSE_BENCH_LIMIT=${MUSE_BENCH_LIMIT:-300} bash "$here/device_bench.sh" \
      -k "fixed_tokens_per_step or decode" "${common[@]}" > /dev/null 2>&1 ;;
  compiled)
    # the compiled step's gradients against float64 on CUDA for the families timed here
    timeout -s INT 90 python3 -m pytest -m gpu -q -p no:cacheprovider tests/models/test_compiled.py \
      -k "cuda and (phase1 or phase2 or transformer)" > "$OUT/cuda-tests.txt" 2>&1
    tail -1 "$OUT/cuda-tests.txt"
    MUSE_BENCH_LIMIT=${MUSE_BENCH_LIMIT:-480} bash "$here/device_bench.sh" -k compiled \
      --compile "${common[@]}" > /dev/null 2>&1 ;;
  *) echo "device_issue13.sh: unknown part '$1' (eager or compiled)" >&2; exit 2 ;;
esac
status=$?
grep -E "speedup|gain|peak|graphs|decode|passed|failed" "$OUT/bench.txt" | cut -c1-120
exit "$status"
