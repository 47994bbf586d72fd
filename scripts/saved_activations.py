"""What a training forward keeps for backward, by sublayer, in bytes a token (muse.measure.saved),
on any device: which sublayer to shrink for a model to train in less memory.

    python scripts/saved_activations.py transformer:small phase3:small --seq 2048 --dtype bf16
"""

from __future__ import annotations

import argparse
import sys

import torch

from muse.measure.phases import random_ids, torch_dtype
from muse.measure.saved import saved_bytes_by_sublayer
from muse.models import registry


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="model:preset")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--loss-chunk", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        if args.seq < 2 or args.loss_chunk < 0:
            raise ValueError(f"need --seq ≥ 2 and --loss-chunk ≥ 0, got {args.seq}, "
                             f"{args.loss_chunk}")
        dtype = torch_dtype(args.dtype)
        resolved = [registry.resolve(spec) for spec in args.specs]
    except (ValueError, KeyError) as exc:
        print(f"saved_activations: {exc}", file=sys.stderr)
        return 2
    for spec, (name, preset) in zip(args.specs, resolved, strict=True):
        torch.manual_seed(0)
        model = registry.build(name, preset).to(args.device)
        ids = random_ids(model.config.vocab_size, 1, args.seq, args.device)
        saved = saved_bytes_by_sublayer(model, ids, dtype, args.loss_chunk)
        print(f"{spec} (seq {args.seq}, {args.dtype}, vocabulary {model.config.vocab_size}, loss "
              f"{f'chunked {args.loss_chunk}' if args.loss_chunk else 'full'}): "
              f"{sum(saved.values()) / args.seq:,.0f} bytes a token")
        for where, nbytes in saved.items():
            print(f"  {where:30s} {nbytes / args.seq:>10,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
