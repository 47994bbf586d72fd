"""The gradient-flow criterion's long-range number for model variants at init, on any device:
mean ‖∂ℓ/∂h₀[t]‖ over the first eighth of positions with the loss on the last token only
(muse.measure.gradient, as bench/test_gradient_flow.py measures it), one line a variant.

    python scripts/probe_long_range_gradient.py phase3:small --seq 16384 \
        '{}' '{"decay_range": [1e-4, 0.1]}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from muse.measure.gradient import gradient_flow
from muse.models import registry


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("overrides", nargs="+", help="a JSON object of config overrides each")
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        variants = [json.loads(o) for o in args.overrides]
        name, preset = registry.resolve(args.spec)
        for over in variants:
            registry.config(name, preset, vocab_size=args.vocab, **over)
    except (ValueError, KeyError, TypeError) as exc:
        print(f"probe_long_range_gradient: {exc}", file=sys.stderr)
        return 2
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(1))
    for over in variants:
        torch.manual_seed(0)
        model = registry.build(name, preset, vocab_size=args.vocab, **over).to(args.device)
        t0 = time.perf_counter()
        first = gradient_flow(model, ids.to(args.device)).buckets[0]
        print(f"{args.spec} {json.dumps(over)} seq {args.seq}: positions {first.start}–"
              f"{first.stop - 1} mean {first.mean_grad_norm:.3g} max {first.max_grad_norm:.3g} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
