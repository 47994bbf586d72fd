#!/usr/bin/env bash
# Issue 15's GPU run, for a host of 2 GPUs (kind nvidia-h200-x2; each part ≤ 10 minutes).
# Carry .data/carry.txz (en-prose, wiki-mini and the bpe:8192 cache: scripts/pack_quality_data.sh).
#   train: phase2:base on en-prose (bpe:8192, seq 4096, global batch 16, bf16) for STEPS steps on
#          1 GPU, then on 2 (`muse train --nproc 2`, DDP) at the same global batch: the last lines
#          are a table of median tokens/s after step 10, the scaling (target ≥ 1.8×), and the
#          two loss curves at a few steps with their largest difference
#   bench: `pytest bench -m gpu -n 2` over phase2:base and transformer:base (memory, gradient
#          flow, stability, the fixed-tokens throughput) at 4096 and 16384: one results file
#          from both workers
#   MUSE_GIT_SHA=<sha> bash scripts/device_issue15.sh train|bench
set -uo pipefail
here=$(dirname "$0")
part=${1:-}
case $part in
  train|bench) ;;
  *) echo "device_issue15.sh: unknown part '$part' (train or bench)" >&2; exit 2 ;;
esac
source "$here/device_facts.sh"
device_facts "bash scripts/device_issue15.sh $part"
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee -a "$OUT/machine.txt"
status=0
case $part in
  train)
    mkdir -p .data/unpacked ~/.cache/muse/tokenizers
    tar xJf .data/carry.txz -C .data/unpacked && cp .data/unpacked/cache/* ~/.cache/muse/tokenizers/
    # MODEL, SEQ, BATCH, STEPS, DEVICE override the run (a CPU smoke: phase2:tiny, 64, 4, 12, cpu)
    printf 'model = "%s"\ncorpus = ".data/unpacked/en-prose"\ntokenizer = "bpe:8192"\n' \
      "${MODEL:-phase2:base}" > "$OUT/train.toml"
    printf 'seq_len = %s\nbatch_size = %s\nsteps = %s\ndtype = "bf16"\nwarmup_steps = 10\n' \
      "${SEQ:-4096}" "${BATCH:-16}" "${STEPS:-60}" >> "$OUT/train.toml"
    printf 'device = "%s"\n' "${DEVICE:-cuda}" >> "$OUT/train.toml"
    printf 'eval_every = 0\neval_tokens = 8192\nprogress = false\nseed = 0\n' >> "$OUT/train.toml"
    for ranks in 1 2; do
      # the run dir (checkpoints too) stays on the machine: only its history comes back
      rm -rf "/tmp/train-$ranks"
      args=(--set "out_dir=\"/tmp/train-$ranks\"")
      [ "$ranks" = 2 ] && args+=(--nproc 2)
      start=$(date +%s)
      timeout -s INT 270 python3 -W ignore -m muse.cli train "$OUT/train.toml" "${args[@]}" \
        > "$OUT/train-$ranks.log" 2>&1 || { status=1; tail -5 "$OUT/train-$ranks.log"; }
      echo "$ranks rank(s): wall $(($(date +%s) - start)) s" | tee -a "$OUT/machine.txt"
      cp "/tmp/train-$ranks/history.json" "$OUT/history-$ranks.json" 2>/dev/null
    done
    python3 - "$OUT" <<'PY' || status=1
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {}
for ranks in (1, 2):
    path = out / f"history-{ranks}.json"
    if not path.exists():
        print(f"{ranks} rank(s): no history"); continue
    rows = [r for r in next(iter(json.loads(path.read_text()).values())) if "tokens_per_s" in r]
    runs[ranks] = rows
    speed = statistics.median(r["tokens_per_s"] for r in rows[10:])
    print(f"{ranks} rank(s) (history says {rows[0]['ranks']}): {speed:12,.0f} tokens/s, "
          f"peak {max(r['peak_mem_bytes'] or 0 for r in rows) / 1e9:.2f} GB (rank 0)")
if len(runs) == 2:
    one, two = (statistics.median(r["tokens_per_s"] for r in runs[k][10:]) for k in (1, 2))
    print(f"scaling 2 ranks ÷ 1: {two / one:.3f} (target ≥ 1.8)")
    loss = {k: [r["loss"] for r in v] for k, v in runs.items()}
    n = min(map(len, loss.values()))
    for step in sorted({1, 10, n // 2, n}):
        print(f"step {step:4d}: loss {loss[1][step - 1]:.4f} (1 rank) {loss[2][step - 1]:.4f} (2)")
    print(f"largest |Δ loss| over {n} steps: "
          f"{max(abs(a - b) for a, b in zip(loss[1][:n], loss[2][:n])):.4f}")
PY
    ;;
  bench)
    # MODELS, SEQS, DEVICE override the matrix (a CPU smoke: "phase2:tiny transformer:tiny",
    # "64 128", cpu)
    read -ra models <<< "${MODELS:-phase2:base transformer:base}"
    read -ra seqs <<< "${SEQS:-4096 16384}"
    timeout -s INT 520 python3 -m pytest bench -m gpu -n 2 -p no:cacheprovider \
      ${DEVICE:+--device "$DEVICE"} --results "$OUT/results" --model "${models[@]}" \
      --seq "${seqs[@]}" \
      --loss-chunk 4096 --ignore bench/test_perplexity.py --ignore bench/test_bk_core.py \
      --ignore bench/test_scaling.py --ignore bench/test_decode.py \
      > "$OUT/bench.log" 2>&1 || status=$?
    tail -40 "$OUT/bench.log"
    rm -f "$OUT/results/latest.json" ;;  # a copy of the run's file
esac
exit "$status"
