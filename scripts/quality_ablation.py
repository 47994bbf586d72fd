"""Equal-recipe trainings of model variants on one corpus, scored on test splits: which change
closes the gap to the transformer.

    python scripts/quality_ablation.py --corpus .data/en-prose --tokens 4194304 \
        --also ../shared/data/wiki-mini --out reports/quality/screen \
        'transformer:small' 'phase2:small' 'phase2:small {"hebbian_conv": 4}'

Each argument is a spec, optionally followed by a JSON object of model overrides. Every run uses
the same tokenizer (trained on --corpus), seeds, token budget and schedule (the perplexity gate's
recipe). Each final checkpoint is scored with the gate's sliding window on the test split of
--corpus and of every --also corpus (with the same tokenizer): PPL, bits per byte, and PPL on
recall tokens and the rest (muse.measure.perplexity). Written to <out>.json (every run, the
environment, the command) and <out>.md (the table, ΔPPL against the first variant). A scouting
tool beside the gate (bench/test_perplexity.py), which is what decides.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from muse import models
from muse.fileio import atomic_write_text
from muse.harness.results import environment_facts, git_facts
from muse.training.data import encoded_split, get_tokenizer, load_corpus
from muse.training.evaluate import load_model
from muse.training.quality import EvalSplit, QualitySettings, score, scored_bytes
from muse.training.train import TrainConfig, resolve_device, train


def eval_split(corpus_spec: str, tokenizer, name: str) -> EvalSplit:
    corpus = load_corpus(corpus_spec)
    ids = encoded_split(tokenizer, corpus, "test")
    return EvalSplit(ids, scored_bytes(tokenizer, ids), tokenizer.name, tokenizer.sha256,
                     tokenizer.vocab_size, name, corpus.sha256)


def run(variant: str, seed: int, args, steps: int, splits: dict, settings) -> dict:
    spec, _, extra = variant.partition(" ")
    overrides = json.loads(extra) if extra.strip() else {}
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=spec, model_overrides=overrides, corpus=args.corpus,
                          tokenizer=args.tokenizer, seq_len=args.seq, batch_size=args.batch,
                          steps=steps, lr=args.lr, min_lr=args.lr / 10,
                          warmup_steps=max(1, steps // 20), dtype=args.dtype, seed=seed,
                          eval_every=steps, eval_tokens=args.eval_tokens, log_every=steps,
                          out_dir=out, device=args.device, tf32=args.tf32, progress=False)
        t0 = time.perf_counter()
        result = train(cfg)
        seconds = time.perf_counter() - t0
        model, _ = load_model(Path(out) / "final.pt", resolve_device(args.device))
        scores = {}
        for name, split in splits.items():
            r = score(model, split, settings)
            scores[name] = dict(ppl=r.ppl, bits_per_byte=r.bits_per_byte,
                                ppl_recall=r.recall_ppl, ppl_other=r.other_ppl,
                                recall_fraction=r.recall_fraction)
    val = [r["val_loss"] for r in result.history if "val_loss" in r][-1]
    return dict(seed=seed, val_loss=val, train_seconds=seconds,
                tokens_per_s=args.tokens / seconds, test=scores)


def table(rows: list[dict], splits: list[str], head: str) -> str:
    first = {s: statistics.mean(r["test"][s]["ppl"] for r in rows[0]["runs"]) for s in splits}
    lines = [head, "", "| variant | params | " + " | ".join(
        f"{s} PPL (seeds) | {s} bpb | {s} ΔPPL | {s} recall / other ΔPPL" for s in splits)
        + " | tokens/s |", "|---|---:|" + "---:|---:|---:|---:|" * len(splits) + "---:|"]
    for r in rows:
        cells = [f"`{r['variant']}`", f"{r['params'] / 1e6:.2f}M"]
        for s in splits:
            t = [run["test"][s] for run in r["runs"]]
            ppl = statistics.mean(x["ppl"] for x in t)
            ref = rows[0]["runs"]
            rec = statistics.mean(x["ppl_recall"] / y["test"][s]["ppl_recall"] - 1
                                  for x, y in zip(t, ref, strict=True))
            oth = statistics.mean(x["ppl_other"] / y["test"][s]["ppl_other"] - 1
                                  for x, y in zip(t, ref, strict=True))
            per_seed = " / ".join(f"{x['ppl']:.1f}" for x in t)
            cells += [f"{ppl:.1f} ({per_seed})",
                      f"{statistics.mean(x['bits_per_byte'] for x in t):.3f}",
                      f"{ppl / first[s] - 1:+.1%}", f"{rec:+.1%} / {oth:+.1%}"]
        cells.append(f"{statistics.median(x['tokens_per_s'] for x in r['runs']):,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def finite(value):
    """NaN and ±inf as null: valid JSON (a PPL over no recall tokens is NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+")
    p.add_argument("--corpus", required=True)
    p.add_argument("--also", nargs="*", default=[], help="more corpora whose test split to score")
    p.add_argument("--tokenizer", default="bpe:8192")
    p.add_argument("--tokens", type=int, default=2 * 1024 * 1024)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-tokens", type=int, default=131072)
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA float32 matmuls may use TF32 in training and scoring (TrainConfig; "
                        "--no-tf32: exact float32)")
    p.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args()
    steps = args.tokens // (args.seq * args.batch)
    corpus = load_corpus(args.corpus)
    tokenizer = get_tokenizer(args.tokenizer, corpus)
    splits = {Path(c).name: eval_split(c, tokenizer, Path(c).name)
              for c in [args.corpus, *args.also]}
    device = str(resolve_device(args.device))
    settings = QualitySettings(corpus=args.corpus, tokenizer=args.tokenizer, seq_len=args.seq,
                               batch_size=args.batch, dtype=args.dtype, tf32=args.tf32,
                               device=device)
    env, git = environment_facts(), git_facts()
    sha = (git["sha"] or "unknown")[:7] + (" (dirty)" if git["dirty"] else "")
    head = (f"{steps} steps of {args.batch}×{args.seq} ({steps * args.batch * args.seq:,} "
            f"tokens) per run, lr {args.lr}, {args.dtype}, seeds {args.seeds}, tokenizer "
            f"{args.tokenizer} on {Path(args.corpus).name}, "
            f"{'TF32 on' if args.tf32 else 'exact float32'}; "
            f"{device} "
            f"({(env.get('gpu_names') or ['CPU'])[0]}), torch {env['torch']}, triton "
            f"{env['triton']}, commit {sha}. ΔPPL against "
            f"the first row (per seed, then the mean).\n\n`{' '.join(sys.argv)}`")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in args.variants:
        spec, _, extra = variant.partition(" ")
        overrides = json.loads(extra) if extra.strip() else {}
        with torch.device("meta"):
            params = models.build(spec, vocab_size=tokenizer.vocab_size, **overrides).num_params()
        runs = [run(variant, seed, args, steps, splits, settings) for seed in args.seeds]
        rows.append(dict(variant=variant, params=params, runs=runs))
        print(f"{variant}: " + ", ".join(
            f"{s} PPL {statistics.mean(r['test'][s]['ppl'] for r in runs):.2f}" for s in splits),
            flush=True)
        # rewritten after every variant: a run stopped at its time limit keeps what it finished
        text = table(rows, list(splits), head)
        doc = dict(command=" ".join(sys.argv), git_sha=git["sha"], git_dirty=git["dirty"],
                   environment=env, steps=steps, settings=vars(args), rows=rows,
                   complete=len(rows) == len(args.variants))
        atomic_write_text(out.with_suffix(".json"),
                          json.dumps(finite(doc), indent=1, allow_nan=False))
        atomic_write_text(out.with_suffix(".md"), text)
    print("\n" + text)


if __name__ == "__main__":
    main()
