"""The chunked delta rule's solve alone, forward and backward: `unit_lower_solve` (inverse and
product) against `torch.linalg.solve_triangular` (substitution, and its own backward) at the
shape of phase2:base's 65,536-token step (16 × 8 heads × 64 chunks of T = 64, 128 right-hand
sides), float32, random systems like the layer's (|A| ≤ 1 strictly below the diagonal).

    python scripts/solve_timing.py [--device cuda] [--batch 8192] [--chunk 64] [--width 128]

Prints one line a form and the ratio last; the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import sys

import torch

from muse.measure.timing import time_with_peak
from muse.ops.unit_lower_solve import unit_lower_solve


def substitution(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.linalg.solve_triangular(eye + torch.tril(a, -1), rhs, upper=False,
                                         unitriangular=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args(argv)
    if min(args.batch, args.chunk, args.width) < 1:
        print(f"solve_timing: --batch, --chunk and --width must be positive, got {args.batch}, "
              f"{args.chunk}, {args.width}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("solve_timing: --device cuda, but no CUDA here (use --device cpu)", file=sys.stderr)
        return 2
    g = torch.Generator(args.device).manual_seed(0)
    shape = (args.batch, args.chunk)
    dev = args.device
    k = torch.nn.functional.normalize(torch.randn(*shape, 64, generator=g, device=dev), dim=-1)
    beta = torch.rand(*shape, 1, generator=g, device=dev)
    a = torch.tril(beta * (k @ k.transpose(-1, -2)), -1)  # A_tj = β_t k_t·k_j, unit keys
    rhs = torch.randn(*shape, args.width, generator=g, device=dev)
    grad = torch.randn_like(rhs)
    results, seconds = {}, {}
    for name, solve in (("substitution", substitution), ("inverse", unit_lower_solve)):
        a_, rhs_ = a.clone().requires_grad_(), rhs.clone().requires_grad_()

        def step(solve=solve, a_=a_, rhs_=rhs_):
            a_.grad = rhs_.grad = None
            x = solve(a_, rhs_)
            x.backward(grad)
            return x

        results[name] = (step().detach(), a_.grad.clone(), rhs_.grad.clone())
        stats, _ = time_with_peak(step, args.device, 3, 20)
        seconds[name] = stats.median_s
        print(f"{name:13s} forward+backward {stats.median_s * 1e3:8.3f} ms (median of 20)")
    worst = max(float((x - y).abs().max() / y.abs().max())
                for x, y in zip(results["inverse"], results["substitution"], strict=True))
    print(f"substitution / inverse time: {seconds['substitution'] / seconds['inverse']:.2f}; "
          f"largest difference of x, ∂a, ∂rhs relative to its largest entry: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
