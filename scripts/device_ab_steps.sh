#!/usr/bin/env bash
# One device call: an A/B of phase2:base's fixed-tokens train step (16×4096, bf16, fused AdamW,
# loss chunk 4096, TF32) between this tree and an earlier one, in one call so both see the same
# machine:
#   - the CUDA tests named in $TESTS (files or node ids, split on spaces; none when empty), with
#     $TESTS_K as pytest's -k expression where given, into $OUT/log.txt
#   - eager steps: this tree's phase2:base and transformer:base, then $BASE's phase2:base
#     ($BASE: a `git archive` of the earlier commit unpacked in an ignored folder, carried)
#   - this tree's compiled step profiled by kernel ($OUT/profile-compiled.txt) and timed
#     ($OUT/variants-compiled.json); COMPILED_BASE=1 also times $BASE's compiled step
#   MUSE_GIT_SHA=<sha> BASE=.data/ab/<sha> BASE_SHA=<sha> TESTS="tests/ops/test_x.py" \
#     bash scripts/device_ab_steps.sh
set -uo pipefail
here=$(dirname "$0")
source "$here/device_facts.sh"
device_facts "bash scripts/device_ab_steps.sh (BASE=${BASE:-} @ ${BASE_SHA:-?}, \
TESTS=${TESTS:-}, TESTS_K=${TESTS_K:-}, COMPILED_BASE=${COMPILED_BASE:-0})"
log="$OUT/log.txt"
steps=(--seq 4096 --loss-chunk 4096 --tf32)
status=0
if [ -n "${TESTS:-}" ]; then
  select=(); [ -n "${TESTS_K:-}" ] && select=(-k "$TESTS_K")
  # shellcheck disable=SC2086  # TESTS is a list of node ids
  timeout -s INT 150 python3 -m pytest -m gpu -q -p no:cacheprovider $TESTS "${select[@]}" \
    > "$log" 2>&1
  status=$?
  tail -1 "$log"
fi
timeout -s INT 100 python3 -W ignore scripts/step_variants.py phase2:base transformer:base \
  "${steps[@]}" --out "$OUT/variants" 2>&1 | tail -3 | tee -a "$log"
if [ -n "${BASE:-}" ]; then
  (cd "$BASE" && PYTHONPATH="$PWD" timeout -s INT 70 python3 -W ignore scripts/step_variants.py \
    phase2:base "${steps[@]}" --out "$OUT/variants-base") 2>&1 | tail -2 | tee -a "$log"
fi
timeout -s INT 150 python3 -W ignore -m muse.cli profile phase2:base --seq 4096 \
  --tokens-per-step 65536 --loss-chunk 4096 --rows "${ROWS:-40}" --compile inductor \
  > "$OUT/profile-compiled.txt" 2>&1
head -1 "$OUT/profile-compiled.txt" | tee -a "$log"
timeout -s INT 130 python3 -W ignore scripts/step_variants.py phase2:base "${steps[@]}" \
  --compile inductor --out "$OUT/variants-compiled" 2>&1 | tail -2 | tee -a "$log"
if [ "${COMPILED_BASE:-0}" = 1 ] && [ -n "${BASE:-}" ]; then
  (cd "$BASE" && PYTHONPATH="$PWD" timeout -s INT 130 python3 -W ignore scripts/step_variants.py \
    phase2:base "${steps[@]}" --compile inductor --out "$OUT/variants-compiled-base") 2>&1 \
    | tail -2 | tee -a "$log"
fi
exit "$status"
