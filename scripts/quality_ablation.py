"""Short equal-recipe trainings of model variants on one corpus: which change closes a gap.

    python scripts/quality_ablation.py --corpus .data/en-prose --tokens 4194304 \
        --json out.json 'transformer:small' 'phase2:small' 'phase2:small {"hebbian_conv": 4}'

Each argument is a spec, optionally followed by a JSON object of model overrides. Every run uses
the same tokenizer, seeds, token budget and schedule (the perplexity gate's recipe); the table
printed last is the validation loss at the end (nats/token, mean over seeds), its PPL against
the first variant's, parameters and tokens/s. A scouting tool: the gate
(bench/test_perplexity.py) is what decides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

from muse import models
from muse.results import environment_facts
from muse.train import TrainConfig, train


def run(variant: str, seed: int, args, steps: int) -> tuple[float, float]:
    spec, _, extra = variant.partition(" ")
    overrides = json.loads(extra) if extra.strip() else {}
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=spec, model_overrides=overrides, corpus=args.corpus,
                          tokenizer=args.tokenizer, seq_len=args.seq, batch_size=args.batch,
                          steps=steps, lr=args.lr, min_lr=args.lr / 10,
                          warmup_steps=max(1, steps // 20), dtype=args.dtype, seed=seed,
                          eval_every=steps, eval_tokens=args.eval_tokens, log_every=steps,
                          out_dir=out, device=args.device, progress=False)
        t0 = time.perf_counter()
        result = train(cfg)
        seconds = time.perf_counter() - t0
    val = [r["val_loss"] for r in result.history if "val_loss" in r][-1]
    return val, args.tokens / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+")
    p.add_argument("--corpus", required=True)
    p.add_argument("--tokenizer", default="bpe:8192")
    p.add_argument("--tokens", type=int, default=2 * 1024 * 1024)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-tokens", type=int, default=131072)
    p.add_argument("--vocab", type=int, default=8192, help="for the parameter count")
    p.add_argument("--json", help="write every run and the environment here")
    args = p.parse_args()
    steps = args.tokens // (args.seq * args.batch)
    rows = []
    for variant in args.variants:
        spec, _, extra = variant.partition(" ")
        overrides = json.loads(extra) if extra.strip() else {}
        params = models.build(spec, vocab_size=args.vocab, **overrides).num_params()
        runs = [run(variant, seed, args, steps) for seed in args.seeds]
        rows.append(dict(variant=variant, params=params, val_loss=[v for v, _ in runs],
                         tokens_per_s=statistics.median(t for _, t in runs)))
        print(f"{variant}: val {[round(v, 4) for v, _ in runs]} ({params / 1e6:.2f}M)",
              flush=True)
    ref = statistics.mean(rows[0]["val_loss"])
    print(f"\n{'val loss':>9} {'ΔPPL':>7} {'params':>7} {'tok/s':>8}  variant "
          f"({steps} steps of {args.batch}×{args.seq}, seeds {args.seeds}, lr {args.lr})")
    for r in rows:
        loss = statistics.mean(r["val_loss"])
        r["ppl_vs_first"] = math.exp(loss - ref) - 1
        print(f"{loss:9.4f} {r['ppl_vs_first']:+7.1%} {r['params'] / 1e6:6.2f}M "
              f"{r['tokens_per_s']:8.0f}  {r['variant']}")
    if args.json:
        doc = dict(command=" ".join(sys.argv), git_sha=os.environ.get("MUSE_GIT_SHA"),
                   environment=environment_facts(), steps=steps, settings=vars(args), rows=rows)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
