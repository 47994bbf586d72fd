"""Smoke run of the fla peers on CUDA: does each one build, train one step and stay causal here?

    python scripts/fla_smoke.py [--preset small] [--vocab 8192] [--batch 2] [--seq 1024]

Each peer is built with seeded weights, runs forward and backward under bf16 autocast on random
ids, and prints one line: OK with the loss (ln V at init), the gradient norm, the largest change
of the logits at positions ≤ t when every token after t changes (no-grad forward) beside the
change when the same ids run again, and the step time; or FAILED with the error that stopped
it. Exit status 1 when any peer failed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from muse import models
from muse.measure.phases import lm_loss, random_ids

PEERS = ("fla-retnet", "fla-gla", "fla-deltanet", "fla-gated-deltanet")


def smoke(name: str, args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    model = models.build(name, args.preset, vocab_size=args.vocab).cuda().train()
    ids = random_ids(args.vocab, args.batch, args.seq, "cuda", seed=1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(ids)
    loss = lm_loss(logits, ids)
    loss.backward()
    torch.cuda.synchronize()
    step_s = time.perf_counter() - start
    grads = [p.grad for p in model.parameters()]
    if any(g is None for g in grads):
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        raise RuntimeError(f"parameters without a gradient: {missing}")
    norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item()
    if not (math.isfinite(loss.item()) and math.isfinite(norm)):
        raise RuntimeError(f"non-finite loss {loss.item()} or gradient norm {norm}")

    t = args.seq // 2 + 3  # inside a 64-token chunk, not on its edge
    perturbed = ids.clone()
    perturbed[:, t + 1:] = (ids[:, t + 1:] + 1) % args.vocab
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        before, again, after = model(ids), model(ids), model(perturbed)
    leak = (before[:, : t + 1] - after[:, : t + 1]).abs().max().item()
    rerun = (before - again).abs().max().item()
    verdict = "causal" if leak <= rerun else "LEAKS"
    return (f"OK      loss {loss.item():.4f} (ln V {math.log(args.vocab):.4f})  grad norm "
            f"{norm:.3e}  {verdict}: future-token change {leak:.3g} (rerun {rerun:.3g})  "
            f"params {model.num_params():,}  first step {step_s:.2f} s (with compiling)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("peers", nargs="*", default=PEERS)
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs CUDA: fla's kernels are Triton GPU kernels")
    import triton

    try:
        import fla

        fla_version = fla.__version__
    except ImportError as exc:
        fla_version = f"not importable ({exc})"
    print(f"{torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), "
          f"torch {torch.__version__}, triton {triton.__version__}, fla {fla_version}; "
          f"{args.preset}, vocab {args.vocab}, batch {args.batch} × seq {args.seq}, bf16 autocast")
    failed = 0
    for name in args.peers:
        try:
            line = smoke(name, args)
        except Exception as exc:  # the point is to say why each peer did not run, and go on
            failed += 1
            line = f"FAILED  {type(exc).__name__}: {exc}"
        print(f"{name:<20} {line}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
