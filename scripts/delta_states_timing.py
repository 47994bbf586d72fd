"""The chunked delta rule alone, forward and backward, with its chunk pass in PyTorch (the
two-level walk) and in Triton (muse.ops.delta_states: the solve, the walk and the read-out) at
the walk's value-column blocks, TF32 off and on, on inputs like phase2:base's heads (unit
keys, β ∈ (0, 1), log-decays in (−0.5, 0)): q, k, v as the Hebbian layer hands them over under
autocast (bf16 head slices of one (B, N, 3, H, D) projection, heads-first views), or with
`--inputs float32` dense float32 (B, H, N, D) tensors.

    python scripts/delta_states_timing.py [--shape B H N D ...] [--inputs layer|float32]

Prints one line a variant: median ms of 10, peak MB, and the largest difference of y, W and
the gradients from the PyTorch pass's, relative to each one's largest entry.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from muse.measure.timing import time_with_peak
from muse.ops.delta_rule import delta_rule_chunked

# the Triton pass with TF32 only (exact float32 took 13× as long, reports/README.md), at the
# walk's value-column blocks; the first row, exact PyTorch, is what the others are held to
VARIANTS = [("torch", None, False), ("torch", None, True), ("triton", 16, True),
            ("triton", 32, True), ("triton", 64, True)]


def one_shape(bsz, heads, n, d, device, inputs):
    g = torch.Generator(device).manual_seed(0)
    kw = dict(generator=g, device=device)
    if inputs == "layer":
        q, k, v = torch.randn(bsz, n, 3, heads, d, **kw).bfloat16().unbind(2)
        qkv = (q, F.normalize(k, dim=-1), v)
    else:
        qkv = (torch.randn(bsz, heads, n, d, **kw),
               F.normalize(torch.randn(bsz, heads, n, d, **kw), dim=-1),
               torch.randn(bsz, heads, n, d, **kw))
    args = (*qkv, -torch.rand(bsz, heads, n, **kw) * 0.5, torch.rand(bsz, heads, n, **kw))
    ups = (torch.randn(bsz, heads, n, d, **kw), torch.randn(bsz, heads, d, d, **kw))
    base = None
    for states, block_v, tf32 in VARIANTS:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        leaves = [x.clone().requires_grad_() for x in args]
        if states == "triton":
            from muse.ops.delta_states import triton as kernels

            real = kernels.delta_walk_triton
            kernels.delta_walk_triton = lambda *a, real=real, bv=block_v: real(*a, block_v=bv)

        def step(leaves=leaves, states=states):
            for x in leaves:
                x.grad = None
            q, k, v = (x.transpose(1, 2) if inputs == "layer" else x for x in leaves[:3])
            y, w = delta_rule_chunked(q, k, v, *leaves[3:], chunk=64, states=states)
            ((y * ups[0]).sum() + (w * ups[1]).sum()).backward()
            return y, w

        try:
            y, w = step()
            got = [y.detach(), w.detach(), *(x.grad.clone() for x in leaves)]
            stats, peak = time_with_peak(step, device, 3, 10)
        finally:
            if states == "triton":
                kernels.delta_walk_triton = real
            torch.backends.cuda.matmul.allow_tf32 = False
        base = base or got
        worst = max(float((a - b).abs().max() / b.abs().max())
                    for a, b in zip(got, base, strict=True))
        name = f"{states}/{block_v or '-'}/{'tf32' if tf32 else 'ieee'}"
        print(f"{bsz}x{heads}x{n}x{d} {inputs:7s} {name:16s} {stats.median_s * 1e3:9.3f} ms "
              f"{(peak or 0) / 2**20:9.0f} MB  diff {worst:.1e}", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[16, 8, 4096, 64, 1, 8, 65536, 64])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--inputs", choices=("layer", "float32"), default="layer")
    args = parser.parse_args(argv)
    if len(args.shape) % 4 or min(args.shape) < 1:
        print(f"delta_states_timing: --shape takes positive B H N D groups, got {args.shape}",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("delta_states_timing: --device cuda, but no CUDA here", file=sys.stderr)
        return 2
    for i in range(0, len(args.shape), 4):
        one_shape(*args.shape[i:i + 4], args.device, args.inputs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
