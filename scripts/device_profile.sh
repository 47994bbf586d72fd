#!/usr/bin/env bash
# Device run: the Hebbian's CUDA paths against float64, then `muse profile` of the issue-4 models at 4k and 16k.
# Usage (on the GPU machine, wheels for flash-linear-attention in .whl/): bash scripts/device_profile.sh OUTDIR
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
python3 -m pytest -q -p no:cacheprovider tests/layers/test_hebbian_cuda.py tests/layers/test_hebbian.py tests/ops/test_decayed_scan_triton.py > "$out/fla-tests.txt" 2>&1
tail -3 "$out/fla-tests.txt"
for seq in 4096 16384; do
  for m in phase2:small transformer:small phase1:10gb transformer:phase1-10gb; do
    f="$out/profile-${m/:/-}-$seq.txt"
    python3 -W ignore -m muse.cli profile "$m" --seq "$seq" --rows 25 > "$f" 2>&1
    head -1 "$f"
  done
done
