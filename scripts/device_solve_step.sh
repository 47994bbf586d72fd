#!/usr/bin/env bash
# One device call (≤ 10 minutes) after the delta rule's solve became an inverse and a product:
#   - the CUDA tests of the delta rule, the Hebbian layer and phase2's compiled step against
#     float64, and the solve alone in both forms (scripts/solve_timing.py), into $OUT/log.txt
#   - the 65,536-token and batch-1 eager steps of phase2:base, phase2:base with
#     hebbian_recompute, and transformer:base (step_variants, $OUT/variants.json)
#   - the decode criterion for issue 13's pairs (bench, $OUT/results, $OUT/bench.log)
#   - phase2:base's compiled 65,536-token step profiled ($OUT/profile-compiled.txt)
# At most 8 files come back: bench.txt and latest.json are left out (bench.log and the run's
# own json hold the same).
#   MUSE_GIT_SHA=$(git rev-parse --short HEAD) bash scripts/device_solve_step.sh
set -uo pipefail
here=$(dirname "$0")
source "$here/device_facts.sh"
device_facts "bash scripts/device_solve_step.sh"
log="$OUT/log.txt"
timeout -s INT 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_delta_rule_cuda.py \
  tests/layers/test_hebbian_cuda.py tests/models/test_compiled.py -k "cuda and not phase3 and not \
  phase7 and not phase8 and not phase1" > "$log" 2>&1
tail -1 "$log"
python3 scripts/solve_timing.py 2>&1 | tee -a "$log"
timeout -s INT 150 python3 -W ignore scripts/step_variants.py phase2:base \
  'phase2:base {"hebbian_recompute": true}' transformer:base --seq 4096 65536 --loss-chunk 4096 \
  --out "$OUT/variants" 2>&1 | tail -8 | tee -a "$log"
MUSE_BENCH_LIMIT=${MUSE_BENCH_LIMIT:-150} bash "$here/device_bench.sh" -k decode \
  --model phase2:base phase1:10gb transformer:base --seq 4096 16384 65536 \
  --ignore bench/test_perplexity.py --ignore bench/test_bk_core.py > /dev/null 2>&1
status=$?
grep -E "decode|passed|failed" "$OUT/bench.txt" | cut -c1-120
rm -f "$OUT/bench.txt" "$OUT/results/latest.json"
timeout -s INT "${PROFILE_LIMIT:-170}" python3 -W ignore -m muse.cli profile phase2:base \
  --seq 4096 --tokens-per-step 65536 --loss-chunk 4096 --rows 40 --compile inductor \
  > "$OUT/profile-compiled.txt" 2>&1
head -1 "$OUT/profile-compiled.txt"
exit "$status"
