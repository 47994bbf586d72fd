"""Short equal-recipe trainings of model variants on one corpus: which change closes a gap.

    python scripts/quality_ablation.py --corpus .data/wiki-mini --tokens 2097152 \
        'transformer:small' 'phase2:small' 'phase2:small {"hebbian_gamma_init": [-9, 0]}'

Each argument is a spec, optionally followed by a JSON object of model overrides. Every run uses
the same tokenizer, seed, token budget and schedule (the perplexity gate's recipe), and the
table printed last is the validation loss at the end (nats/token) and tokens/s. A scouting
tool: the gate (bench/test_perplexity.py) is what decides.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from muse.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+")
    p.add_argument("--corpus", required=True)
    p.add_argument("--tokenizer", default="bpe:8192")
    p.add_argument("--tokens", type=int, default=2 * 1024 * 1024)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    steps = args.tokens // (args.seq * args.batch)
    rows = []
    for variant in args.variants:
        spec, _, extra = variant.partition(" ")
        overrides = json.loads(extra) if extra.strip() else {}
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(model=spec, model_overrides=overrides, corpus=args.corpus,
                              tokenizer=args.tokenizer, seq_len=args.seq, batch_size=args.batch,
                              steps=steps, lr=args.lr, min_lr=args.lr / 10,
                              warmup_steps=max(1, steps // 20), dtype=args.dtype,
                              eval_every=steps, eval_tokens=65536, log_every=steps,
                              out_dir=out, device=args.device, progress=False)
            t0 = time.perf_counter()
            result = train(cfg)
            seconds = time.perf_counter() - t0
        val = [r["val_loss"] for r in result.history if "val_loss" in r][-1]
        rows.append((variant, val, args.tokens / seconds))
        print(f"{variant}: val {val:.4f} ({seconds:.0f} s)", flush=True)
    print(f"\n{'val loss':>9} {'tok/s':>9}  variant ({steps} steps of {args.batch}×{args.seq})")
    for variant, val, tps in rows:
        print(f"{val:9.4f} {tps:9.0f}  {variant}")


if __name__ == "__main__":
    main()
