"""The fixed-tokens training step (bench/test_throughput.py's protocol: bf16 autocast, fused
AdamW, a fixed number of tokens a step) of model variants with config overrides, which the
bench's --model cannot take: tokens/s and the step's peak memory a variant, to keep a memory or
speed lever only if its numbers say so (`--compile BACKEND`: every variant under torch.compile).
CUDA only (the peak is the allocator's).

    python scripts/step_variants.py --seq 4096 65536 --loss-chunk 4096 --out $OUT/variants \
        transformer:small phase8:small 'phase8:small {"recompute_chunks": true}'

Each argument is a spec, optionally followed by a JSON object of overrides. Prints one line a
(variant, seq) and a table last; writes <out>.json (the rows, the environment, the command).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from muse.harness.results import environment_facts
from muse.measure.memory import free_device_memory
from muse.measure.phases import fixed_tokens_step
from muse.measure.timing import time_with_peak
from muse.models import registry


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="model:preset, optionally '{json}'")
    parser.add_argument("--seq", type=int, nargs="+", required=True)
    parser.add_argument("--tokens-per-step", type=int, default=65536)
    parser.add_argument("--loss-chunk", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--compile", choices=("inductor", "aot_eager", "eager"), default=None,
                        help="each variant's step under torch.compile with this backend")
    parser.add_argument("--tf32", action="store_true",
                        help="float32 matmuls (cuBLAS and muse's Triton walk) may use TF32")
    parser.add_argument("--out", required=True, help="path stem of the .json written")
    args = parser.parse_args(argv)
    try:
        variants = registry.parse_variants(args.variants)
        if any(s < 1 or args.tokens_per_step % s for s in args.seq):
            raise ValueError(f"every --seq must be a positive divisor of --tokens-per-step "
                             f"{args.tokens_per_step}, got {args.seq}")
        if not torch.cuda.is_available():
            raise ValueError("step_variants measures the CUDA allocator's peak: no CUDA here")
    except (ValueError, KeyError, TypeError) as exc:
        print(f"step_variants: {exc}", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    rows = []
    for spec, over in variants:
        name, preset = registry.resolve(spec)
        for seq in args.seq:
            torch.manual_seed(0)
            model = registry.build(name, preset, **over).to(device)
            step = fixed_tokens_step(model, args.tokens_per_step, seq, device, args.loss_chunk,
                                     compiled=args.compile)
            stats, peak = time_with_peak(step, device, 3, args.rounds)
            loss = step.last_loss.item()
            rows.append(dict(spec=spec, overrides=over, seq=seq, batch=step.ids.shape[0],
                             median_s=stats.median_s, iqr_s=stats.iqr_s,
                             tokens_per_s=args.tokens_per_step / stats.median_s,
                             peak_bytes=peak, loss=loss))
            print(f"{spec} {json.dumps(over)} seq {seq}: {rows[-1]['tokens_per_s']:,.0f} "
                  f"tokens/s, peak {peak / 1e9:.2f} GB, loss {loss:.3f}", flush=True)
            del step, model
            free_device_memory()
    with open(f"{args.out}.json", "w") as f:
        json.dump(dict(command=" ".join(sys.argv), environment=environment_facts(),
                       tokens_per_step=args.tokens_per_step, loss_chunk=args.loss_chunk,
                       compile=args.compile, tf32=args.tf32, rows=rows), f, indent=1)
    print(f"\n{'variant':58s} {'seq':>6s} {'tokens/s':>11s} {'peak GB':>8s}")
    for r in rows:
        label = f"{r['spec']} {json.dumps(r['overrides'])}" if r["overrides"] else r["spec"]
        print(f"{label[:58]:58s} {r['seq']:6d} {r['tokens_per_s']:11,.0f} "
              f"{r['peak_bytes'] / 1e9:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
