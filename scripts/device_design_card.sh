#!/usr/bin/env bash
# The design-card run timed as a new user runs it on a fresh machine (issue 11): no tokenizer
# cache, every default family, the gate's default corpus (wiki-mini, carried
# in .data/wiki-mini.tgz because ../shared does not travel) and budget. Writes machine.txt, bench.log and results/.
set -uo pipefail
mkdir -p .data/unpacked && tar xzf .data/wiki-mini.tgz -C .data/unpacked
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH="$PWD"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/machine.txt"
echo "commit ${MUSE_GIT_SHA:-unknown}; command: pytest bench -m gpu --seq 1024 2048 4096 --corpus .data/unpacked/wiki-mini $*" | tee -a "$OUT/machine.txt"
start=$(date +%s)
timeout -s INT "${MUSE_BENCH_LIMIT:-540}" python3 -m pytest bench -m gpu --seq 1024 2048 4096 \
  --corpus .data/unpacked/wiki-mini --results "$OUT/results" -p no:cacheprovider "$@" \
  >"$OUT/bench.log" 2>&1
status=$?
echo "wall $(($(date +%s) - start)) s, exit status $status" | tee -a "$OUT/machine.txt"
grep -E "passed|failed" "$OUT/bench.log" | tail -2
exit "$status"
