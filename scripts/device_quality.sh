#!/usr/bin/env bash
# One device run of the quality work (issue 10). Carry .data/carry.txz (en-prose, wiki-mini and
# the bpe:8192 token cache; made by scripts/pack_quality_data.sh) and .whl (the fla wheels).
#   scripts/device_quality.sh screen 'transformer:small' 'phase2:small {"hebbian_conv": 4}' …
#   scripts/device_quality.sh gate --model phase2:small fla-retnet --seeds 0 1 …
#   scripts/device_quality.sh mqar 'transformer:tiny' 'phase2:tiny {"hebbian_delta": true}' …
#   scripts/device_quality.sh screens FILE: one screen a line of FILE (quality_ablation's
#     arguments, shell-quoted), all at once on the one GPU (tokens/s then shares it)
# Everything lands under $OUT: machine.txt, cuda-tests.txt, then screen.{json,md,txt},
# results/ (the gate's results file) or mqar.{json,md}.
set -uo pipefail
mode=$1
shift
mkdir -p .data/unpacked ~/.cache/muse/tokenizers
tar xJf .data/carry.txz -C .data/unpacked && cp .data/unpacked/cache/* ~/.cache/muse/tokenizers/
source "$(dirname "$0")/device_facts.sh"
device_facts "$0 $mode $*"
# before the fla wheels go in: fla's tests autotune for minutes (the fla mode runs them);
# CUDA_TESTS=0 leaves them out where a run needs the whole call for its screens
[[ ${CUDA_TESTS:-1} == 0 ]] || python3 -m pytest -m gpu tests/layers/test_local_attention_cuda.py \
  tests/layers/test_hebbian_cuda.py tests/layers/test_linear_attention_cuda.py \
  tests/ops/test_delta_rule_cuda.py tests/models/test_families_cuda.py \
  -q -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/cuda-tests.txt"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
data=.data/unpacked
case $mode in
  screen) python3 scripts/quality_ablation.py --corpus $data/en-prose --also $data/wiki-mini \
            --out "$OUT/screen" "$@" 2>&1 | tee "$OUT/screen.txt" ;;
  screens) [[ -f ${1:-} ]] || { echo "screens needs a file of screens, got '${1:-}'" >&2; exit 2; }
    n=0; pids=()
    while IFS= read -r line; do
      [[ -z $line || $line == \#* ]] && continue
      n=$((n + 1)); eval "screen_args=($line)"
      python3 scripts/quality_ablation.py --corpus $data/en-prose --also $data/wiki-mini \
        --out "$OUT/screen-$n" "${screen_args[@]}" >"$OUT/screen-$n.txt" 2>&1 &
      pids+=($!)
    done <"$1"
    rc=0; for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    tail -n 3 "$OUT"/screen-*.txt
    # the device returns at most 8 files: the screens come back as one archive
    (cd "$OUT" && tar czf screens.tgz screen-* && rm -f screen-*); exit $rc ;;
  gate) python3 -m pytest -m gpu bench/test_perplexity.py --device cuda --dtype bf16 \
          --corpus $data/en-prose --also-corpus $data/wiki-mini --tokenizer bpe:8192 \
          --results "$OUT/results" \
          -p no:cacheprovider "$@" 2>&1 | tail -40 | tee "$OUT/gate.txt" ;;
  mqar) python3 scripts/mqar.py --device cuda --out "$OUT/mqar" "$@" 2>&1 | tee "$OUT/mqar.txt" ;;
  fla) python3 -m pytest -m gpu tests/layers/test_hebbian_cuda.py \
         tests/layers/test_linear_attention_cuda.py tests/models/test_fla_peers.py \
         -q -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/fla-tests.txt"
       python3 scripts/fla_smoke.py 2>&1 | tee "$OUT/fla.txt" ;;
  *) echo "mode must be screen, screens, gate, mqar or fla, got '$mode'" >&2; exit 2 ;;
esac
