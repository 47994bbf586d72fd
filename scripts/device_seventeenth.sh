#!/usr/bin/env bash
# The seventeenth session's device calls (each ≤ 10 minutes):
#   probe:  the short conv alone in both backward forms (scripts/short_conv_timing.py),
#           phase2:base's eager 16×4096 step with each form (the module setting BACKWARD), then
#           phase2:base against transformer:base compiled at 4×16384 with its whole log kept
#           ($OUT/compiled-16384.log: the sixteenth session's pair ended on a ptxas message)
#   eager:  the delta rule alone at the walk's value-column blocks (delta_states_timing.py at
#           16×4096, 4×16384, 1×65536), issue 13's eager acceptance run (device_issue13.sh
#           eager: the kernels' CUDA tests, both protocols, decode) and BK-Core's bandwidth
#           criterion (bench/test_bk_core.py), all results files in $OUT/results
#   compiled: the CUDA tests of the delta kernels and the compiled step's gradients, then
#           phase2:base against transformer:base compiled at 1×65536 and 4×16384
#   MUSE_GIT_SHA=<sha> bash scripts/device_seventeenth.sh probe|eager|compiled
set -uo pipefail
here=$(dirname "$0")
source "$here/device_facts.sh"
log="$OUT/log.txt"
case "${1:?probe, eager or compiled}" in
  probe)
    device_facts "bash scripts/device_seventeenth.sh probe"
    timeout -s INT 90 python3 -W ignore scripts/short_conv_timing.py 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    for form in fused split; do
      echo "short conv backward: $form" | tee -a "$log"
      timeout -s INT 90 python3 -W ignore -c "
import runpy, sys
import muse.ops.short_conv.triton as conv
conv.BACKWARD = '$form'
sys.argv = ['step_variants.py', 'phase2:base', '--seq', '4096', '--loss-chunk', '4096',
            '--tf32', '--out', '$OUT/variants-conv-$form']
runpy.run_path('$here/step_variants.py', run_name='__main__')
" 2>&1 | tail -2 | tee -a "$log"
    done
    timeout -s INT 330 python3 -W ignore scripts/step_variants.py phase2:base transformer:base \
      --seq 16384 --loss-chunk 4096 --tf32 --compile inductor \
      --out "$OUT/variants-16384-compiled" > "$OUT/compiled-16384.log" 2>&1
    echo "compiled 16384: exit $?" | tee -a "$log"
    tail -4 "$OUT/compiled-16384.log" | tee -a "$log" ;;
  eager)
    timeout -s INT 100 python3 -W ignore scripts/delta_states_timing.py \
      --shape 16 8 4096 64 4 8 16384 64 1 8 65536 64 2>&1 | tee "$OUT/delta-timing.txt"
    status=${PIPESTATUS[0]}
    EAGER_TESTS="tests/models/test_families_cuda.py tests/ops tests/layers" TESTS_LIMIT=80 \
      MUSE_BENCH_LIMIT=290 bash "$here/device_issue13.sh" eager || status=$?
    timeout -s INT 100 python3 -m pytest bench/test_bk_core.py -m gpu -q -p no:cacheprovider \
      --results "$OUT/results" > "$OUT/bk-core.txt" 2>&1 || status=$?
    tail -3 "$OUT/bk-core.txt"
    echo "bk-core: pytest bench/test_bk_core.py -m gpu" >> "$OUT/machine.txt"
    rm -f "$OUT/results/latest.json" ;;  # a copy of the last run's file: at most 8 come back
  compiled)
    device_facts "bash scripts/device_seventeenth.sh compiled"
    # trust a compiled timing only where the compiled step's gradients pass on CUDA
    timeout -s INT 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_delta_rule_cuda.py \
      tests/models/test_compiled.py -k "triton or phase2 or transformer" \
      > "$OUT/cuda-tests.txt" 2>&1
    status=$?
    tail -1 "$OUT/cuda-tests.txt" | tee "$log"
    # one seq a process: each pair's compiles take about three minutes
    for seq in 65536 16384; do
      timeout -s INT 200 python3 -W ignore scripts/step_variants.py phase2:base transformer:base \
        --seq "$seq" --loss-chunk 4096 --tf32 --compile inductor \
        --out "$OUT/variants-$seq-compiled" 2>&1 | tail -3 | tee -a "$log"
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
    done ;;
  *) echo "device_seventeenth.sh: unknown part '$1' (probe, eager or compiled)" >&2; exit 2 ;;
esac
exit "$status"
