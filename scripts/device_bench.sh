#!/usr/bin/env bash
# One device run of the acceptance criteria (issues 11, 13, 14): the machine's facts, then
# `pytest bench -m gpu …` with the arguments given, its results file under $OUT/results and the
# whole log in $OUT/bench.log (its
# last lines also in $OUT/bench.txt). No corpus travels: pass --ignore
# bench/test_perplexity.py (device_quality.sh runs the gate with en-prose).
#   MUSE_GIT_SHA=$(git rev-parse --short HEAD) bash scripts/device_bench.sh \
#     --model phase2:small transformer:small --seq 4096 8192 16384 32768 65536 \
#     --ignore bench/test_perplexity.py
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH="$PWD"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/machine.txt"
echo "commit ${MUSE_GIT_SHA:-unknown}; command: pytest bench -m gpu $*" | tee -a "$OUT/machine.txt"
# SIGINT before the call's limit: pytest then still writes the results file, marked incomplete
timeout -s INT "${MUSE_BENCH_LIMIT:-520}" python3 -m pytest bench -m gpu --results "$OUT/results" -p no:cacheprovider "$@" > "$OUT/bench.log" 2>&1
status=$?
tail -60 "$OUT/bench.log" | tee "$OUT/bench.txt"
exit "$status"
