"""`muse` command line: `muse info` now; `train`, `eval`, `report`, `compare` and `generate`
arrive with their issues and say so until then."""

from __future__ import annotations

import argparse
import json
import sys

PLANNED = {
    "train": "the trainer (issue: quality — corpora, tokenizers, trainer, PPL gate)",
    "eval": "perplexity evaluation (issue: quality — corpora, tokenizers, trainer, PPL gate)",
    "report": "report rendering (issue: reports and gates)",
    "compare": "the regression gate between two results files (issue: reports and gates)",
    "generate": "text generation",
}


def info(args: argparse.Namespace) -> int:
    import torch

    from muse import models
    from muse.results import environment_facts

    rows = []
    for name in models.names():
        fam = models.family(name)
        for preset in fam.presets:
            with torch.device("meta"):
                params = models.build(name, preset).num_params()
            rows.append({"model": name, "preset": preset, "default": preset == fam.default_preset,
                         "params": params, "baseline": ":".join(models.baseline_for(name, preset))})
    if args.json:
        print(json.dumps({"models": rows, "environment": environment_facts()}, indent=2))
        return 0
    width = max(len(f"{r['model']}:{r['preset']}") for r in rows)
    for r in rows:
        spec = f"{r['model']}:{r['preset']}"
        mark = " (default)" if r["default"] else ""
        print(f"{spec:<{width}}  {r['params']:>13,} params  baseline {r['baseline']}{mark}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="muse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="registered models, presets, parameter counts")
    p.add_argument("--json", action="store_true", help="machine-readable, with environment facts")
    p.set_defaults(func=info)
    for name, what in PLANNED.items():
        sub.add_parser(name, help=f"not yet available: {what}").set_defaults(planned=what)
    args = parser.parse_args(argv)
    if hasattr(args, "planned"):
        print(f"muse {args.command}: not yet available — {args.planned}", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
