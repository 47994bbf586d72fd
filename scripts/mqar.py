"""MQAR recall of model variants (muse.measure.mqar): can the mixer look up what followed a key?

    python scripts/mqar.py --pairs 16 --seq 128 --steps 1500 --lr 1e-3 3e-3 \
        --out reports/quality/mqar 'transformer:tiny' 'phase2:tiny {"hebbian_delta": true}'

Each argument is a spec, optionally followed by a JSON object of model overrides; every variant
trains on the same fresh batches at each learning rate, and the best held-out accuracy over the
rates is reported (Zoology sweeps the rate per model the same way). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from muse import models
from muse.harness.results import environment_facts
from muse.measure.mqar import MQAR, train_mqar


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args()
    task = MQAR(vocab_size=args.vocab, pairs=args.pairs, seq_len=args.seq)
    rows = []
    for variant in args.variants:
        spec, _, extra = variant.partition(" ")
        overrides = json.loads(extra) if extra.strip() else {}
        runs = []
        for lr in args.lr:
            torch.manual_seed(args.seed)
            model = models.build(spec, vocab_size=args.vocab, **overrides)
            t0 = time.perf_counter()
            result = train_mqar(model, task, steps=args.steps, batch=args.batch, lr=lr,
                                seed=args.seed, device=args.device)
            runs.append(dict(lr=lr, seconds=time.perf_counter() - t0, **result))
        best = max(runs, key=lambda r: r["accuracy"])
        rows.append(dict(variant=variant, params=model.num_params(), runs=runs, best=best))
        print(f"{variant}: accuracy {best['accuracy']:.3f} at lr {best['lr']:g} "
              f"({model.num_params():,} params)", flush=True)
    env = environment_facts()
    lines = [f"MQAR: {args.pairs} pairs in {args.seq} tokens, vocabulary {args.vocab}, "
             f"{args.steps} steps of {args.batch}, lr ∈ {args.lr} (best shown), seed "
             f"{args.seed}; {args.device}, torch {env['torch']}, commit "
             f"{os.environ.get('MUSE_GIT_SHA', '?')[:7]}.", "", f"`{' '.join(sys.argv)}`", "",
             "| variant | params | accuracy | loss | lr | accuracy at each lr |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        each = ", ".join(f"{x['lr']:g}: {x['accuracy']:.3f}" for x in r["runs"])
        b = r["best"]
        lines.append(f"| `{r['variant']}` | {r['params']:,} | {b['accuracy']:.3f} | "
                     f"{b['loss']:.3f} | {b['lr']:g} | {each} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        dict(command=" ".join(sys.argv), environment=env, settings=vars(args), rows=rows),
        indent=1))
    out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
