#!/usr/bin/env bash
# One device run for the quality work: unpack the carried corpus and token cache, run the CUDA
# tests of the layers, then the screening trainings given as arguments (scripts/quality_ablation.py
# arguments). Output under $OUT. Carry: .data/carry.tgz (and .whl for fla).
set -uo pipefail
mkdir -p .data/unpacked ~/.cache/muse/tokenizers
tar xzf .data/carry.tgz -C .data/unpacked
cp .data/unpacked/cache/* ~/.cache/muse/tokenizers/
export MUSE_GIT_SHA=${MUSE_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null)} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"
python -m pytest tests/layers/test_local_attention_cuda.py tests/layers/test_hebbian_cuda.py -q -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/cuda-tests.txt"
python scripts/quality_ablation.py --corpus .data/unpacked/en-prose "$@" 2>&1 | tee "$OUT/screen.txt"
