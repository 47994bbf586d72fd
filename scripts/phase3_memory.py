"""Activation memory of one phase3 block: saved-for-backward bytes, planar bf16 and float32
against the same block on complex64 tensors (muse.models.phase3.block_memory).

    python scripts/phase3_memory.py [--d-model 512] [--seq 1024] [--batch 1]
"""

import argparse

import torch

from muse.models.phase3 import block_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    shape = dict(d_model=args.d_model, seq=args.seq, batch=args.batch)
    bf16 = block_memory(**shape, planar_dtype=torch.bfloat16)
    fp32 = block_memory(**shape, planar_dtype=torch.float32)
    c64 = bf16["complex64_bytes"]
    print(f"one phase3 block, d_model {args.d_model} ({args.d_model // 2} complex channels), "
          f"d_state {2 * args.d_model}, d_ff {4 * args.d_model}, batch {args.batch}, "
          f"seq {args.seq}: saved-for-backward bytes")
    for label, value in (("planar bf16", bf16["planar_bytes"]),
                         ("planar float32", fp32["planar_bytes"]), ("complex64", c64)):
        print(f"  {label:<15} {value / 2**20:9.1f} MiB  {value / c64:6.3f} × complex64")


if __name__ == "__main__":
    main()
