"""The short causal conv (+ SiLU) alone, forward and forward+backward, on phase2:base's shape
(16 × 4096 tokens, 1536 channels = q, k, v of 8 heads of 64, K = 4, bf16 as under autocast):
the PyTorch form eager and under torch.compile, and the Triton kernels at several tiles
(rows × channels a program), warps and backward forms (one launch or two).

    python scripts/short_conv_timing.py [--shape B N C K]

Prints one line a variant: median ms of 20 (forward, forward+backward) and the largest
difference of y, ∂x and ∂w from the eager PyTorch form's, relative to each one's largest entry.
"""

from __future__ import annotations

import argparse
import sys

import torch

from muse.layers.short_conv import ShortConv
from muse.measure.timing import time_with_peak

# (rows, channels, forward warps, backward warps, backward form); the first is the default
TILES = [(32, 128, 4, 4, "fused"), (32, 128, 4, 4, "split"), (64, 64, 4, 4, "split"),
         (32, 64, 4, 4, "fused"), (16, 128, 4, 4, "split"), (64, 128, 4, 8, "split")]


def _run(layer, x, up):
    leaf = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(leaf)
    (y.float() * up).sum().backward()
    return y.detach().float(), leaf.grad.float(), layer.conv.weight.grad.float()


def _err(got, ref):
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref, strict=True))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=(16, 4096, 1536, 4),
                        metavar=("B", "N", "C", "K"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("short_conv_timing: needs CUDA", file=sys.stderr)
        return 2
    from muse.ops.short_conv import triton as kernels

    bsz, n, c, k = args.shape
    torch.manual_seed(0)
    layer = ShortConv(c, k, backend="torch").cuda()
    x = torch.randn(bsz, n, c, device="cuda").bfloat16()
    up = torch.randn(bsz, n, c, device="cuda")
    ref = _run(layer, x, up)
    compiled = torch.compile(layer)

    def forward(module):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            module(x)

    variants = [("torch eager", layer, None), ("torch compiled", compiled, None)]
    variants += [(f"triton {bt}x{bc} warps {fw}/{bw} {form}", layer, (bt, bc, fw, bw, form))
                 for bt, bc, fw, bw, form in TILES]
    print(f"short conv B={bsz} N={n} C={c} K={k} bf16: ms forward, forward+backward (median "
          f"of 20), max rel. diff from torch eager")
    for name, module, tiles in variants:
        layer.backend = "torch" if tiles is None else "triton"
        if tiles is not None:
            (kernels.BLOCK_T, kernels.BLOCK_C, kernels.FORWARD_WARPS, kernels.BACKWARD_WARPS,
             kernels.BACKWARD) = tiles
        err = _err(_run(module, x, up), ref)
        fwd, _ = time_with_peak(lambda m=module: forward(m), "cuda", warmup=3, rounds=20)
        both, _ = time_with_peak(lambda m=module: _run(m, x, up), "cuda", warmup=3, rounds=20)
        print(f"{name:32s} {fwd.median_s * 1e3:8.3f} {both.median_s * 1e3:8.3f}   {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
