#!/usr/bin/env bash
# One device call (≤ 10 minutes) for the delta rule's chunk pass in Triton (muse.ops.delta_states:
# each chunk's solve, the walk and the read-out):
#   - the CUDA tests of the delta rule (both passes), the Hebbian layer and phase2's compiled
#     step against float64 or eager, into $OUT/log.txt
#   - the delta rule alone, forward+backward, each pass and column block, TF32 off and on
#     (scripts/delta_states_timing.py)
#   - phase2:base's fixed-tokens eager step with each pass against transformer:base, at
#     16×4096 and 1×65536 (step_variants, $OUT/variants.json)
#   - with STEPS_ONLY=1, only the eager steps; TF32=1 lets float32 matmuls use TF32 there
#     (step_variants --tf32: cuBLAS's and the Triton walk's)
#   - with COMPILED=1 instead: phase2:base's compiled 16×4096 step profiled
#     ($OUT/profile-compiled.txt) and the compiled step_variants ($OUT/variants-compiled.json),
#     after the CUDA tests with TESTS=1
#   - TORCH_PASS=0 leaves out phase2:base with the PyTorch pass (its time is known; saves a compile)
#   MUSE_GIT_SHA=$(git rev-parse --short HEAD) bash scripts/device_delta_states.sh
set -uo pipefail
here=$(dirname "$0")
source "$here/device_facts.sh"
device_facts "bash scripts/device_delta_states.sh (COMPILED=${COMPILED:-0}, \
STEPS_ONLY=${STEPS_ONLY:-0}, TF32=${TF32:-0}, TESTS=${TESTS:-0}, TORCH_PASS=${TORCH_PASS:-1}, ROWS=${ROWS:-40})"
tf32=(); [ "${TF32:-0}" = 1 ] && tf32=(--tf32)
profile_tf32=(--no-tf32); [ "${TF32:-0}" = 1 ] && profile_tf32=()
log="$OUT/log.txt"
variants=(phase2:base 'phase2:base {"hebbian_states": "torch"}' transformer:base)
[ "${TORCH_PASS:-1}" = 0 ] && variants=(phase2:base transformer:base)
run_tests() {
  timeout -s INT 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_delta_rule_cuda.py \
    tests/layers/test_hebbian_cuda.py tests/models/test_compiled.py -k "cuda and not phase3 and not \
    phase7 and not phase8 and not phase1" > "$log" 2>&1
  local rc=$?
  tail -1 "$log"
  return $rc
}
if [ "${COMPILED:-0}" = 1 ]; then
  tests_rc=0
  [ "${TESTS:-0}" = 1 ] && { run_tests; tests_rc=$?; }
  if [ "${PROFILE_LIMIT:-200}" != 0 ]; then  # 0: no profile (timeout 0 would not limit it)
    timeout -s INT "${PROFILE_LIMIT:-200}" python3 -W ignore -m muse.cli profile phase2:base \
      --seq 4096 --tokens-per-step 65536 --loss-chunk 4096 --rows "${ROWS:-40}" --compile inductor \
      "${profile_tf32[@]}" \
      > "$OUT/profile-compiled.txt" 2>&1
    head -1 "$OUT/profile-compiled.txt"
  fi
  timeout -s INT "${VARIANTS_LIMIT:-330}" python3 -W ignore scripts/step_variants.py \
    "${variants[@]}" --seq 4096 --loss-chunk 4096 --compile inductor "${tf32[@]}" \
    --out "$OUT/variants-compiled" 2>&1 | tail -6
  variants_rc=${PIPESTATUS[0]}
  [ "$tests_rc" = 0 ] || exit "$tests_rc"
  exit "$variants_rc"
fi
status=0
if [ "${STEPS_ONLY:-0}" != 1 ]; then
run_tests
status=$?
timeout -s INT 120 python3 scripts/delta_states_timing.py 2>&1 | tee -a "$log"
fi
timeout -s INT 200 python3 -W ignore scripts/step_variants.py "${variants[@]}" \
  --seq 4096 65536 --loss-chunk 4096 "${tf32[@]}" --out "$OUT/variants" 2>&1 | tail -8 | tee -a "$log"
exit "$status"
