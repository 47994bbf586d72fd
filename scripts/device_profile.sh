#!/usr/bin/env bash
# One device run behind issue 4's closing numbers: the CUDA paths against float64, `muse profile`
# of the issue-4 models and their matched transformers at 4k and 16k, and the quality ablation.
# Usage, on the GPU machine, wiki-mini copied to .data/: bash scripts/device_profile.sh OUTDIR
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
python3 -m pytest -q -p no:cacheprovider -m "" tests/layers/test_hebbian_cuda.py \
  tests/ops/test_decayed_scan_triton.py > "$out/cuda-tests.txt" 2>&1
tail -3 "$out/cuda-tests.txt"
for seq in 4096 16384; do
  for m in phase2:small transformer:small phase1:10gb transformer:phase1-10gb; do
    f="$out/profile-${m/:/-}-$seq.txt"
    python3 -W ignore -m muse.cli profile "$m" --seq "$seq" --rows 25 > "$f" 2>&1
    head -1 "$f"
  done
done
python3 -W ignore scripts/quality_ablation.py --corpus .data/wiki-mini --tokens 2097152 \
  'transformer:small' 'phase2:small' 'phase2:small {"hebbian_gamma_init": [-9, 0]}' \
  'phase2:small {"bk_channels": 64}' 'transformer:phase1-dense-v8k' 'phase1:dense' \
  'phase1:dense {"ar_ssm_decay_init": [0.5, 0.999]}' 'phase1:10gb' \
  'phase1:10gb {"htt_rank": 64}' > "$out/ablation.txt" 2>&1
tail -12 "$out/ablation.txt"
