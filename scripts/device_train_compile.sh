#!/usr/bin/env bash
# `muse train`'s compile modes side by side on one GPU: the same short run eager, under
# torch.compile, and under compile_mode=reduce-overhead (CUDA graphs), each a fresh run dir
# under $OUT/train-<mode>; the last lines are a table of median tokens/s (steps after the
# first 10, so compiling is not counted), peak memory and the losses at steps 1 and the last.
#   bash scripts/device_train_compile.sh MODEL SEQ BATCH STEPS CORPUS
# MODES (default "eager default reduce-overhead") picks the runs.
set -uo pipefail
source "$(dirname "$0")/device_facts.sh"
model=${1:?model} seq=${2:?seq} batch=${3:?batch} steps=${4:?steps} corpus=${5:?corpus}
device_facts "device_train_compile.sh $*"
printf 'model = "%s"\ncorpus = "%s"\nseq_len = %s\nbatch_size = %s\nsteps = %s\n' \
  "$model" "$corpus" "$seq" "$batch" "$steps" > "$OUT/train.toml"
printf 'dtype = "bf16"\nwarmup_steps = 10\neval_every = 0\neval_tokens = 8192\nprogress = false\n' \
  >> "$OUT/train.toml"
status=0
for mode in ${MODES:-eager default reduce-overhead}; do
  args=(--set "out_dir=\"$OUT/train-$mode\"")
  [ "$mode" != eager ] && args+=(--set compile=true --set "compile_mode=\"$mode\"")
  start=$(date +%s)
  python3 -W ignore -m muse.cli train "$OUT/train.toml" "${args[@]}" > "$OUT/train-$mode.log" 2>&1 \
    || { status=1; tail -5 "$OUT/train-$mode.log"; }
  echo "$mode: wall $(($(date +%s) - start)) s" | tee -a "$OUT/machine.txt"
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'mode':16} {'tokens/s':>12} {'peak GB':>8} {'loss@1':>8} {'loss@end':>9} {'graphs':>6}")
for mode in ("eager", "default", "reduce-overhead"):
    path = out / f"train-{mode}" / "history.json"
    if not path.exists():
        print(f"{mode:16} no history"); continue
    rows = next(iter(json.loads(path.read_text()).values()))
    rows = [r for r in rows if "tokens_per_s" in r]
    speed = statistics.median(r["tokens_per_s"] for r in rows[10:]) if len(rows) > 10 else float("nan")
    peak = max((r["peak_mem_bytes"] or 0) for r in rows) / 1e9
    graphs = rows[0].get("graphs_compiled", "-")  # torch.compile's graphs of the model
    print(f"{mode:16} {speed:12,.0f} {peak:8.2f} {rows[0]['loss']:8.4f} {rows[-1]['loss']:9.4f} "
          f"{graphs:>6}")
PY
exit "$status"
