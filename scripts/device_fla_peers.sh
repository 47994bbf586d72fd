#!/usr/bin/env bash
# Issue 13's peer target in one device call (≤ 10 minutes): phase2:base's compiled 65,536-token
# step profiled ($OUT/profile-compiled.txt), then the bench's eager steps at both budgets for
# phase2:base, the fla peers that run on this machine (gla, retnet, deltanet at the base shape;
# gated-deltanet's backward is refused on Hopper with this Triton) and transformer:base.
# PEERS narrows the peers (fla autotunes each new shape for minutes: one or two a call) and
# PROFILE_LIMIT=0 skips the profile.
# fla travels as wheels: carry .whl (flash-linear-attention, fla-core, einops) and start with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   MUSE_GIT_SHA=$(git rev-parse --short HEAD) bash scripts/device_fla_peers.sh
set -uo pipefail
here=$(dirname "$0")
source "$here/device_facts.sh"
device_facts "bash scripts/device_fla_peers.sh (PEERS=${PEERS:-}, SEQS=${SEQS:-})"
python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1 | tee -a "$OUT/machine.txt"
if [ "${PROFILE_LIMIT:-200}" != 0 ]; then
  timeout -s INT "${PROFILE_LIMIT:-200}" python3 -W ignore -m muse.cli profile phase2:base \
    --seq 4096 --tokens-per-step 65536 --loss-chunk 4096 --rows 40 --compile inductor \
    > "$OUT/profile-compiled.txt" 2>&1
  head -2 "$OUT/profile-compiled.txt"
fi
read -ra peers <<< "${PEERS:-fla-gla:base fla-retnet:base fla-deltanet:base}"
MUSE_BENCH_LIMIT=${MUSE_BENCH_LIMIT:-360} bash "$here/device_bench.sh" -k fixed_tokens_per_step \
  --model phase2:base "${peers[@]}" transformer:base \
  --seq ${SEQS:-4096 65536} --loss-chunk 4096 --ignore bench/test_perplexity.py \
  --ignore bench/test_bk_core.py > /dev/null 2>&1
status=$?
grep -E "speedup|peak|passed|failed|error" "$OUT/bench.txt" | cut -c1-120
exit "$status"
