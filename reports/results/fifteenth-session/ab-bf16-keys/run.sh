# A/B of three commits on one H200: the delta rule alone with the layer's bf16 inputs, then
# phase2:base's eager and compiled 16×4096 steps (step_variants --tf32), each from its own tree
source scripts/device_facts.sh
device_facts "bash .data/ab/run.sh (commits d68f66b d8ec6fd 8fdddfd, each tree from git archive)"
ab=$PWD/.data/ab
for c in d68f66b d8ec6fd 8fdddfd; do
  (cd $ab/$c && PYTHONPATH=$PWD timeout 100 python3 $ab/delta_bf16.py $c)
done 2>&1 | tee $OUT/delta-bf16.txt
for c in d68f66b d8ec6fd 8fdddfd; do
  (cd $ab/$c && PYTHONPATH=$PWD timeout 100 python3 -W ignore scripts/step_variants.py phase2:base \
    --seq 4096 --loss-chunk 4096 --tf32 --out $OUT/eager-$c 2>&1 | tail -1 | sed "s/^/$c eager /")
done
for c in 8fdddfd d68f66b; do
  (cd $ab/$c && PYTHONPATH=$PWD timeout 160 python3 -W ignore scripts/step_variants.py phase2:base \
    --seq 4096 --loss-chunk 4096 --tf32 --compile inductor --out $OUT/compiled-$c 2>&1 | tail -1 \
    | sed "s/^/$c compiled /")
done
