"""The streaming prefill of one model, segment by segment, with its state's health: whether the
logits are finite, the state's largest entry and any non-finite part, then a few decoded tokens.
Run it under CUDA_LAUNCH_BLOCKING=1 to see the kernel that fails first.

    python scripts/probe_decode.py phase1:small --dtype fp16 --prompt 16384 --device cuda
"""

from __future__ import annotations

import argparse
import sys

import torch

from muse import models
from muse.measure.phases import autocast, random_ids, synchronize

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def walk(value, path=""):
    """(path, shape, dtype, all finite, largest |entry|) of every tensor in a state."""
    if isinstance(value, torch.Tensor):
        mag = (value.abs() if value.is_complex() else value).float()
        top = float(mag.abs().max()) if mag.numel() else 0.0
        yield path, tuple(value.shape), str(value.dtype), bool(torch.isfinite(mag).all()), top
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from walk(v, f"{path}[{i}]")
    elif hasattr(value, "blocks"):
        yield from walk(value.blocks, f"{path}.blocks")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", help="family:preset, e.g. phase1:small")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--prompt", type=int, default=16384)
    p.add_argument("--segment", type=int, default=4096)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    name, _, preset = args.spec.partition(":")
    if name not in models.names():
        p.error(f"unknown model {name!r}; known: {', '.join(models.names())}")
    if args.prompt < 1 or args.segment < 1:
        p.error(f"--prompt and --segment must be ≥ 1, got {args.prompt} and {args.segment}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device(device):
        model = models.build(name, preset or models.family(name).default_preset).eval()
    ids = random_ids(model.config.vocab_size, 1, args.prompt, device)
    with torch.inference_mode(), autocast(device, DTYPES[args.dtype]):
        state = model.init_state(1, device=device)
        for start in range(0, args.prompt, args.segment):
            logits, state = model(ids[:, start:start + args.segment], state)
            synchronize(device)
            parts = list(walk(state))
            bad = [w[0] for w in parts if not w[3]]
            big = max(parts, key=lambda w: w[4])
            print(f"{args.spec} {args.dtype} tokens {start}+: logits finite "
                  f"{bool(torch.isfinite(logits).all())}, largest state {big[0]} {big[4]:.4g} "
                  f"({big[2]}); non-finite {bad[:4]}", flush=True)
        token = logits[:, -1:].argmax(-1)
        for _ in range(4):
            logits, state = model(token, state)
            token = logits[:, -1:].argmax(-1)
        synchronize(device)
    print(f"{args.spec} {args.dtype}: 4 tokens decoded, last {token.item()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
