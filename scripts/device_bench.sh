#!/usr/bin/env bash
# One device run of the acceptance criteria (issues 11, 13, 14): the machine's facts, then
# `pytest bench -m gpu …` with the arguments given, its results file under $OUT/results and the
# whole log in $OUT/bench.log (its last lines also in $OUT/bench.txt), its wall time last in
# $OUT/machine.txt. No corpus travels: pass --ignore bench/test_perplexity.py
# (device_quality.sh runs the gate with en-prose; device_design_card.sh carries wiki-mini).
#   MUSE_GIT_SHA=$(git rev-parse --short HEAD) bash scripts/device_bench.sh \
#     --model phase2:small transformer:small --seq 4096 8192 16384 32768 65536 \
#     --ignore bench/test_perplexity.py
set -uo pipefail
source "$(dirname "$0")/device_facts.sh"
device_facts "pytest bench -m gpu $*"
start=$(date +%s)
# SIGINT before the call's limit: pytest then still writes the results file, marked incomplete
timeout -s INT "${MUSE_BENCH_LIMIT:-520}" python3 -m pytest bench -m gpu --results "$OUT/results" \
  -p no:cacheprovider "$@" > "$OUT/bench.log" 2>&1
status=$?
echo "wall $(($(date +%s) - start)) s, exit status $status" | tee -a "$OUT/machine.txt"
tail -60 "$OUT/bench.log" | tee "$OUT/bench.txt"
exit "$status"
