"""The delta rule's chunk-solve kernels (muse.ops.delta_states.solve) alone: forward and
backward launches at each way of forming (I + A)⁻¹ (solve.py's INVERSE) and each warp count,
against the PyTorch reference's forward+backward; float32 with TF32 allowed, phase2:base's
shape (16 × 8 heads × 4096 tokens in chunks of 64, D 64), unit keys, β ∈ (0, 1), log-decays in
(−0.5, 0).

    python scripts/solve_kernel_timing.py [--shape S M T D]

Prints one line a variant: median ms of 20 for the forward and the backward launch, and the
largest difference of u0, p and the gradients from the first variant's, relative to each
one's largest entry.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from muse.measure.timing import time_with_peak
from muse.ops.delta_states import solve
from muse.ops.delta_states.reference import chunk_solve_reference

INVERSES = ("rows extracted", "rows from keys", "16-row blocks")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[128, 64, 64, 64])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("solve_kernel_timing: needs CUDA, none here", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    seqs, m, t, d = args.shape
    g = torch.Generator("cuda").manual_seed(0)
    kw = dict(generator=g, device="cuda")
    k = F.normalize(torch.randn(seqs, m, t, d, **kw), dim=-1)
    v = torch.randn(seqs, m, t, d, **kw).bfloat16()
    beta = torch.rand(seqs, m, t, **kw)
    b = torch.cumsum(-torch.rand(seqs, m, t, **kw) * 0.5, dim=-1)
    du0, dp = torch.randn(seqs, m, t, d, **kw), torch.randn(seqs, m, t, d, **kw)

    def reference():
        leaves = [x.clone().requires_grad_() for x in (k, v.float(), beta, b)]
        u0, p = chunk_solve_reference(*leaves)
        ((u0 * du0).sum() + (p * dp).sum()).backward()

    stats, _ = time_with_peak(reference, "cuda", 3, 20)
    print(f"reference (solve_triangular) fwd+bwd {stats.median_s * 1e3:8.3f} ms", flush=True)
    base = None
    scratch = k.new_empty(seqs * m, t, t)
    for inverse in (0, 1, 2):
        for warps in (4, 8):
            u0, p = torch.empty_like(k), torch.empty_like(k)
            grads = [torch.empty_like(x) for x in (k, v, beta, b)]
            opts = dict(T=t, DK=d, DV=d, PRECISION="tf32", WIDE=False, INVERSE=inverse,
                        num_warps=warps)

            def forward(u0=u0, p=p, opts=opts):
                solve._solve_forward[(seqs * m,)](k, v, beta, b, u0, p, scratch, **opts)

            def backward(grads=grads, opts=opts):
                solve._solve_backward[(seqs * m,)](k, v, beta, b, du0, dp, *grads, scratch,
                                                    **opts)

            fwd, _ = time_with_peak(forward, "cuda", 3, 20)
            bwd, _ = time_with_peak(backward, "cuda", 3, 20)
            got = [u0.clone(), p.clone(), *(x.float() for x in grads)]
            base = base or got
            worst = max(float((x - y).abs().max() / y.abs().max())
                        for x, y in zip(got, base, strict=True))
            name = f"{INVERSES[inverse]}, {warps} warps"
            print(f"{name:28s} fwd {fwd.median_s * 1e3:8.3f} ms  bwd {bwd.median_s * 1e3:8.3f} "
                  f"ms  diff {worst:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
