#!/usr/bin/env bash
# One device call: the short conv alone in both backward forms (scripts/short_conv_timing.py),
# phase2:base's eager 16×4096 step with each form (the module setting BACKWARD), then
# phase2:base against transformer:base compiled at 4×16384 with its whole log kept
# ($OUT/compiled-16384.log: the sixteenth session's pair ended on a ptxas message).
#   MUSE_GIT_SHA=<sha> bash scripts/device_seventeenth.sh
set -uo pipefail
here=$(dirname "$0")
source "$here/device_facts.sh"
device_facts "bash scripts/device_seventeenth.sh"
log="$OUT/log.txt"
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
  --seq 16384 --loss-chunk 4096 --tf32 --compile inductor --out "$OUT/variants-16384-compiled" \
  > "$OUT/compiled-16384.log" 2>&1
echo "compiled 16384: exit $?" | tee -a "$log"
tail -4 "$OUT/compiled-16384.log" | tee -a "$log"
exit "$status"
