"""What a training forward keeps for backward, by sublayer, in bytes a token (muse.measure.saved),
on any device: which sublayer to shrink for a model to train in less memory.

    python scripts/saved_activations.py transformer:small phase3:small --seq 2048 --dtype bf16
    python scripts/saved_activations.py 'phase8:small {"recompute_chunks": true}' --compile inductor

A spec may carry a JSON object of config overrides, as in step_variants.py.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from muse.measure.phases import random_ids, torch_dtype
from muse.measure.saved import saved_bytes_by_sublayer, saved_bytes_compiled
from muse.models import registry


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="model:preset")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--loss-chunk", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", choices=("inductor", "aot_eager"), default=None,
                        help="the model under torch.compile: what its partitioner keeps, a total")
    args = parser.parse_args(argv)
    try:
        if args.seq < 2 or args.loss_chunk < 0:
            raise ValueError(f"need --seq ≥ 2 and --loss-chunk ≥ 0, got {args.seq}, "
                             f"{args.loss_chunk}")
        dtype = torch_dtype(args.dtype)
        variants = registry.parse_variants(args.specs)
    except (ValueError, KeyError, TypeError) as exc:
        print(f"saved_activations: {exc}", file=sys.stderr)
        return 2
    for spec, over in variants:
        name, preset = registry.resolve(spec)
        torch.manual_seed(0)
        model = registry.build(name, preset, **over).to(args.device)
        ids = random_ids(model.config.vocab_size, 1, args.seq, args.device)
        saved = (saved_bytes_compiled(model, ids, dtype, args.loss_chunk, args.compile)
                 if args.compile else saved_bytes_by_sublayer(model, ids, dtype, args.loss_chunk))
        label = f"{spec} {json.dumps(over)}" if over else spec
        print(f"{label} (seq {args.seq}, {args.dtype}, vocabulary {model.config.vocab_size}, loss "
              f"{f'chunked {args.loss_chunk}' if args.loss_chunk else 'full'}"
              f"{f', torch.compile ({args.compile})' if args.compile else ''}): "
              f"{sum(saved.values()) / args.seq:,.0f} bytes a token")
        for where, nbytes in saved.items():
            print(f"  {where:30s} {nbytes / args.seq:>10,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
