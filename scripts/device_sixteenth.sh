#!/usr/bin/env bash
# One device call: the short conv alone at several tiles (scripts/short_conv_timing.py, into
# $OUT/log.txt), then phase2:base against transformer:base at 65,536 tokens a step (bf16, fused
# AdamW, loss chunk 4096, TF32) at seq 16384 and 65536 eager, then at 16384 compiled
# ($OUT/variants-<seq>[-compiled].json), each in its own process under its own time limit.
#   MUSE_GIT_SHA=<sha> bash scripts/device_sixteenth.sh
set -uo pipefail
here=$(dirname "$0")
source "$here/device_facts.sh"
device_facts "bash scripts/device_sixteenth.sh"
log="$OUT/log.txt"
timeout -s INT 60 python3 -W ignore scripts/short_conv_timing.py 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
for seq in 16384 65536; do
  timeout -s INT 80 python3 -W ignore scripts/step_variants.py phase2:base transformer:base \
    --seq "$seq" --loss-chunk 4096 --tf32 --out "$OUT/variants-$seq" 2>&1 | tail -3 | tee -a "$log"
done
timeout -s INT 150 python3 -W ignore scripts/step_variants.py phase2:base transformer:base \
  --seq 16384 --loss-chunk 4096 --tf32 --compile inductor --out "$OUT/variants-16384-compiled" \
  2>&1 | tail -3 | tee -a "$log"
exit "$status"
