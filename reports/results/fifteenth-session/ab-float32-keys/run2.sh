# A/B on one H200: d68f66b; v2 = d68f66b with solve.INVERSE = (0, 2); v3 = dac5773 with q, k
# cast to float32 before the kernels (the walk forms K̃ from float32 keys): the delta rule alone
# with the layer's bf16 inputs, then phase2:base's eager 16×4096 step (step_variants --tf32)
source scripts/device_facts.sh
device_facts "bash .data/ab/run2.sh (d68f66b, v2, v3; trees from git archive, edits as above)"
ab=$PWD/.data/ab
for c in d68f66b v2 v3; do
  (cd $ab/$c && PYTHONPATH=$PWD timeout 60 python3 $ab/delta_bf16.py $c)
done 2>&1 | tee $OUT/delta-bf16.txt
for c in v3 v2 d68f66b; do
  (cd $ab/$c && PYTHONPATH=$PWD timeout 60 python3 -W ignore scripts/step_variants.py phase2:base \
    --seq 4096 --loss-chunk 4096 --tf32 --out $OUT/eager-$c 2>&1 | tail -1 | sed "s/^/$c eager /")
done
