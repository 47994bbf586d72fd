"""`muse` command line: `muse info`, `muse report`, `muse compare`, `muse train`, `muse eval`,
`muse generate`, `muse export`, `muse profile`, `muse memory`.

Exit status: 0 done; 1 a failed check (`compare` found a regression) or a bug in muse (with
its traceback); 2 a user's mistake (one line on stderr naming the bad value); 3 a training
that diverged; 130 and 143 interrupted by SIGINT and SIGTERM."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from muse.errors import MuseError, one_line
from muse.harness.cases import positive_int
from muse.harness.compare import parse_gate
from muse.training.quality import nonnegative_int

USAGE, DIVERGED = 2, 3

def info(args: argparse.Namespace) -> int:
    import torch

    from muse import models
    from muse.harness.results import environment_facts
    from muse.models.fla_peers import FlaUnavailable

    rows = []
    for name in models.names():
        fam = models.family(name)
        for preset in fam.presets:
            # an optional backend that is not installed: the row says what to install
            params, missing = None, None
            try:
                with torch.device("meta"):
                    params = models.build(name, preset).num_params()
            except FlaUnavailable as exc:
                missing = str(exc)
            rows.append({"model": name, "preset": preset, "default": preset == fam.default_preset,
                         "params": params, "baseline": ":".join(models.baseline_for(name, preset)),
                         **({"not_built": missing} if missing else {})})
    if args.json:
        print(json.dumps({"models": rows, "environment": environment_facts()}, indent=2))
        return 0
    width = max(len(f"{r['model']}:{r['preset']}") for r in rows)
    for r in rows:
        spec = f"{r['model']}:{r['preset']}"
        mark = " (default)" if r["default"] else ""
        params = f"{'?':>13}" if r["params"] is None else f"{r['params']:>13,}"
        note = "  [not built, see below]" if "not_built" in r else ""
        print(f"{spec:<{width}}  {params} params  baseline {r['baseline']}{mark}{note}")
    for reason in dict.fromkeys(r["not_built"] for r in rows if "not_built" in r):
        print(f"not built: {reason}")
    return 0


def report(args: argparse.Namespace) -> int:
    from muse.extras import needs

    with needs("the report"):
        from muse.report.render import latest_results, render

    written = render(args.results or latest_results(), args.out, history=args.history,
                     templates=args.templates)
    print(f"wrote {len(written)} files under {args.out}: REPORT.md, report.html, tables/, plots/")
    return 0


def compare(args: argparse.Namespace) -> int:
    from muse.errors import MuseError
    from muse.harness.compare import check, table
    from muse.harness.compare import compare as deltas_of
    from muse.harness.results import read_document

    docs = [read_document(path) for path in (args.old, args.new)]
    try:  # runs with nothing in common, or gates with nothing to gate: a user's mistake
        warnings = check(*docs, args.fail)
    except MuseError as exc:
        print(f"muse compare: {exc}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    deltas = deltas_of(docs[0]["records"], docs[1]["records"], args.fail)
    for line in table(deltas):
        print(line)
    regressions = [d for d in deltas if d.regressed]
    if not deltas:
        print("no vram, tokens/s or ppl records to compare")
    elif regressions:
        print(f"{len(regressions)} regression(s) beyond tolerance")
    elif args.fail:
        print(f"no regression beyond {', '.join(map(str, args.fail))}")
    return 1 if regressions else 0


def train(args: argparse.Namespace) -> int:
    from muse.training.train import Terminated, load_config
    from muse.training.train import train as run_training

    if not args.config.is_file():
        raise MuseError(f"config file {str(args.config)!r} does not exist")
    cfg = load_config(args.config, args.set)
    if args.resume is not None and args.overwrite:
        raise MuseError("--resume and --overwrite exclude each other: --resume continues the "
                        "run in out_dir, --overwrite replaces it")
    if args.nproc is not None:
        from muse.training.distributed import check_nproc

        check_nproc(args.nproc, cfg.device)
        if args.nproc > 1:
            return _launch(args, cfg)
    try:
        result = run_training(cfg, resume=args.resume, overwrite=args.overwrite)
    except (KeyboardInterrupt, Terminated) as exc:
        sig, code = ("SIGTERM", 143) if isinstance(exc, Terminated) else ("SIGINT", 130)
        if getattr(exc, "rank", 0) != 0:  # rank 0 says what was saved
            return code
        print(f"muse train: interrupted ({sig}): {_emergency_note(exc)}", file=sys.stderr)
        return code
    except Exception as exc:  # a bug: its traceback follows this line
        if getattr(exc, "emergency_checkpoint", None) is not None:
            print(f"muse train: failed: {_emergency_note(exc)}", file=sys.stderr)
        raise
    if result.rank != 0:  # rank 0 says how it went
        return DIVERGED if result.diverged else 0
    last = result.history[-1] if result.history else {}
    if result.diverged:
        print(f"muse train: diverged: {result.diverged}; stopped, nothing saved as best.pt; "
              f"history.json and run.json in {result.out_dir} record it", file=sys.stderr)
        return DIVERGED
    summary = f"step {result.step}"
    if "loss" in last:
        summary += f", loss {last['loss']:.4f}"
    if result.best_val_loss is not None:
        summary += f", best val loss {result.best_val_loss:.4f}"
    print(f"{summary}; checkpoints and history.json in {result.out_dir}")
    return 0


def _launch(args: argparse.Namespace, cfg) -> int:
    """`--nproc N`: every check here first (a mistake is one line, before any rank starts),
    then this command again, without --nproc, on N ranks through torchrun."""
    from muse.devices import resolve_device
    from muse.training.distributed import launch
    from muse.training.train import check

    check(cfg, args.resume, args.overwrite, world=args.nproc)
    argv = ["train", str(args.config), *(f"--set={s}" for s in args.set)]
    if args.resume is not None:
        argv += ["--resume", str(args.resume)]
    if args.overwrite:
        argv.append("--overwrite")
    return launch(args.nproc, argv, cuda=resolve_device(cfg.device).type == "cuda")


def _emergency_note(exc: BaseException) -> str:
    """Names the emergency checkpoint only when it was written."""
    saved = getattr(exc, "emergency_checkpoint", None)
    if saved is not None and Path(saved).is_file():
        return f"state saved to {saved} (resume with --resume {saved})"
    why = getattr(exc, "emergency_error", None)
    return "no state saved" + (f" ({why})" if why else " (training had not started)")


def export(args: argparse.Namespace) -> int:
    from muse.hf import export as export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, corpus=args.corpus)
    print(f"wrote {out}: config.json, the weights and the tokenizer; after `import muse.hf`, "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}) loads the model and "
          f"AutoTokenizer.from_pretrained({str(out)!r}) the tokenizer")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from muse.training.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.split, args.context, args.stride,
                                 args.corpus, args.device, args.batch_size)
    print(json.dumps(result, indent=2))
    return 0


def generate(args: argparse.Namespace) -> int:
    import torch

    from muse.devices import resolve_device
    from muse.generate import Sampling
    from muse.generate import generate as sample
    from muse.training.evaluate import checkpoint_tokenizer, load_model

    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as exc:
        raise MuseError(f"--{str(exc).replace('_', '-')}") from None
    device = resolve_device(args.device, option="--device")
    model, ckpt = load_model(args.checkpoint, device)
    tokenizer = checkpoint_tokenizer(ckpt)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise MuseError("--prompt encodes to no tokens: give it some text")
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    print(args.prompt, end="", flush=True)
    made, shown = [], ""
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    for token in sample(model.eval(), prompt, args.max_new_tokens, sampling, generator):
        made.append(int(token[0]))
        # a byte-level token may end inside a character: hold it back until it is whole
        text = tokenizer.decode(made).rstrip("\ufffd")
        print(text[len(shown):], end="", flush=True)
        shown = max(shown, text, key=len)
    print(tokenizer.decode(made)[len(shown):])
    return 0


def profile(args: argparse.Namespace) -> int:

    from muse import models
    from muse.devices import float32_matmuls, resolve_device
    from muse.measure.phases import dynamo_graphs, torch_dtype
    from muse.measure.profile import format_rows, profile_step

    fixed = args.tokens_per_step is not None
    if fixed:
        given = [f"{o} {v}" for o, v in (("--batch", args.batch), ("--dtype", args.dtype),
                                         ("--phase", args.phase)) if v is not None]
        if given:
            raise MuseError(f"--tokens-per-step profiles the bench's fixed-tokens train step "
                            f"(bf16, batch = tokens // seq); drop {', '.join(given)}")
        if args.seq > args.tokens_per_step:
            raise MuseError(f"--seq {args.seq} is longer than --tokens-per-step "
                            f"{args.tokens_per_step}: no whole sequence fits a step")
    phase, batch, dtype_name = args.phase or "train", args.batch or 1, args.dtype or "fp16"
    device = resolve_device(args.device, option="--device")
    try:
        model = models.build(args.model)
        dtype = torch_dtype(dtype_name)
    except (KeyError, ValueError) as exc:
        raise MuseError(str(exc)) from None
    graphs_before = dynamo_graphs()
    try:
        with float32_matmuls(args.tf32):
            step_s, sublayers, kernels = profile_step(
                model, args.seq, phase=phase, dtype=dtype, batch=batch, device=device,
                tokens_per_step=args.tokens_per_step, loss_chunk=args.loss_chunk,
                compiled=args.compile,
            )
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not _out_of_memory(exc):
            raise
        shape = (f"--tokens-per-step {args.tokens_per_step}" if fixed
                 else f"--batch {batch} ({dtype_name}, {phase})")
        raise MuseError(f"{args.model} at --seq {args.seq} {shape} does not fit in {device} "
                        f"memory: {_fit_note(exc)}; try a shorter --seq or fewer tokens a step"
                        ) from None
    if fixed:
        what = (f"fixed-tokens train step seq {args.seq} batch {args.tokens_per_step // args.seq}"
                f" bf16 fused AdamW")
    else:
        what = f"{phase} seq {args.seq} batch {batch} {dtype_name}"
    how = "".join((f", loss chunk {args.loss_chunk}" if args.loss_chunk else "",
                   f", torch.compile ({args.compile})" if args.compile else "",
                   "" if device.type != "cuda" else ", TF32" if args.tf32 else ", exact float32"))
    print(f"{args.model} {what}{how} on {device}: {step_s * 1e3:.3f} ms per step (median of "
          "timed rounds)")
    if args.compile:
        graphs = dynamo_graphs() - graphs_before
        print(f"torch.compile made {graphs} graph{'s' if graphs != 1 else ''} of the model"
              f"{'' if graphs == 1 else ': graph breaks, eager code runs between them'}")
        print("sublayers: not labelled under torch.compile (its fused kernels cross them)")
    else:
        for line in format_rows("sublayers (forward, summed over blocks)", sublayers, args.rows):
            print(line)
    for line in format_rows("self time (forward and backward)", kernels, args.rows):
        print(line)
    return 0


def memory(args: argparse.Namespace) -> int:
    from muse import models
    from muse.devices import resolve_device
    from muse.harness.results import environment_facts, git_facts
    from muse.measure.phases import torch_dtype
    from muse.measure.train_memory import GIB, check_recipe, measure_train_memory

    device = resolve_device(args.device, option="--device")
    if device.type != "cuda":
        raise MuseError(f"--device {args.device}: the peak is read from the CUDA allocator; "
                        "muse memory needs --device cuda")
    overrides = {"checkpointing": True} if args.checkpointing else {}
    try:
        dtype = torch_dtype(args.dtype)
        check_recipe(args.weights, dtype)
        models.config(args.model, **overrides)  # a bad spec or key fails here, before CUDA
    except (KeyError, ValueError, TypeError) as exc:
        raise MuseError(one_line(exc)) from None
    rows = []
    print(f"{args.model} train step, batch {args.batch}, {args.weights} weights, {args.dtype} "
          f"compute, {args.optimizer}, checkpointing {'on' if args.checkpointing else 'off'}, "
          f"loss {'chunked ' + str(args.loss_chunk) if args.loss_chunk else 'full'}, on {device}")
    print(f"{'seq':>6} {'params':>8} {'weights':>8} {'grads':>8} {'optim':>8} {'peak':>8} "
          f"{'≤ 8 GiB':>8} {'≤ 10 GiB':>8}")
    for seq in args.seq:
        with device:
            model = models.build(args.model, **overrides)
        try:
            m = measure_train_memory(model, seq, batch=args.batch, dtype=dtype,
                                     weights=args.weights, optimizer=args.optimizer,
                                     loss_chunk=args.loss_chunk, device=device)
        except RuntimeError as exc:
            if not _out_of_memory(exc):
                raise
            raise MuseError(f"{args.model} at --seq {seq} does not fit in {device} memory: "
                            f"{_fit_note(exc)}") from None
        finally:
            del model
        rows.append(m.to_dict())
        gb = [f"{b / GIB:.2f}" for b in (m.weight_bytes, m.grad_bytes, m.optimizer_bytes,
                                         m.peak_allocated_bytes)]
        print(f"{seq:>6} {m.params / 1e9:>7.3f}B {gb[0]:>8} {gb[1]:>8} {gb[2]:>8} {gb[3]:>8} "
              f"{'yes' if m.fits(8) else 'no':>8} {'yes' if m.fits(10) else 'no':>8}")
    print("(GiB; peak = the CUDA allocator's peak over one step after the optimizer's first)")
    if args.json:
        argv = sys.argv[1:] if args.argv is None else args.argv
        doc = {"command": shlex.join(["muse", *argv]),
               "settings": {k: getattr(args, k) for k in ("model", "batch", "dtype", "weights",
                                                          "optimizer", "checkpointing",
                                                          "loss_chunk")},
               "git": git_facts(), "environment": environment_facts(), "rows": rows}
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(args.json)
    return 0


def _out_of_memory(exc: RuntimeError) -> bool:
    import torch

    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text \
        or "out of memory" in text.lower()


def _fit_note(exc: BaseException) -> str:
    # torch's message says how much one allocation asked for (CUDA's adds the device's size)
    asked = re.search(r"tried to allocate ([\d.]+ ?[A-Za-z]+)", str(exc), re.IGNORECASE)
    total = re.search(r"total capacity of ([\d.]+ ?[A-Za-z]+)", str(exc))
    note = f"one allocation asked for {asked.group(1)}" if asked else one_line(exc)[:200]
    return note + (f" of {total.group(1)} in all" if total else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="muse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="registered models, presets, parameter counts")
    p.add_argument("--json", action="store_true", help="machine-readable, with environment facts")
    p.set_defaults(func=info)
    p = sub.add_parser("report", help="results → tables, plots, REPORT.md and report.html")
    p.add_argument("results", nargs="*", type=Path, metavar="RESULTS.json",
                   help="results files; a later file's record replaces an earlier one with the same"
                   " key (default: every latest.json under reports/results/, in the order the runs"
                   " started)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="default reports/")
    p.add_argument("--history", type=Path,
                   help="training history.json for the loss/PPL plot (default: the histories the"
                   " results name, where they are beside them)")
    p.add_argument("--templates", type=Path,
                   help="folder of Jinja2 templates (default: muse's own, muse/report/templates/)")
    p.set_defaults(func=report)
    p = sub.add_parser(
        "compare", help="the regression gate: deltas of memory, tokens/s and ppl between two runs"
    )
    p.add_argument("old", type=Path, metavar="OLD.json")
    p.add_argument("new", type=Path, metavar="NEW.json")
    p.add_argument("--fail", action="append", type=parse_gate, default=[], metavar="KIND:PCT%",
                   help="exit 1 when KIND gets worse by more than PCT: vram:5%% (any bytes metric"
                   " rising), tokens_per_s:-5%% (falling), ppl:2%% (rising); repeatable")
    p.set_defaults(func=compare)
    p = sub.add_parser("train",
                       help="train a model from a TOML config (see muse/training/train.py)")
    p.add_argument("config", type=Path, metavar="CONFIG.toml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (a TOML value; model_overrides.KEY=VALUE sets one"
                   " model config key); unknown keys are errors; repeatable")
    p.add_argument("--resume", type=Path, metavar="CKPT.pt",
                   help="continue from a checkpoint (step-*.pt, best.pt, final.pt, emergency.pt)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in out_dir (its checkpoints and history)")
    p.add_argument("--nproc", type=positive_int, metavar="N",
                   help="train on N processes of this host (one per GPU on CUDA), re-launched"
                   " through torchrun; batch_size stays the global batch")
    p.set_defaults(func=train)
    p = sub.add_parser("eval", help="perplexity and bits per byte of a checkpoint on a split")
    p.add_argument("checkpoint", metavar="CKPT.pt")
    p.add_argument("--split", default="test", help="train, valid or test (default test)")
    p.add_argument("--context", type=positive_int,
                   help="window length (default: the training seq_len)")
    p.add_argument("--stride", type=positive_int, help="window stride (default: context // 2)")
    p.add_argument("--corpus", help="score another corpus (default: the training corpus)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.set_defaults(func=evaluate)
    p = sub.add_parser("generate", help="continue a prompt with a checkpoint, streaming the text"
                       " (MUSE families decode from their fixed-size state, the transformer from a"
                       " KV cache)")
    p.add_argument("checkpoint", metavar="CKPT.pt")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: off)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set holding this probability (1: off)")
    p.add_argument("--seed", type=int, help="the sampling generator's seed (default: unseeded)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.set_defaults(func=generate)
    p = sub.add_parser("export", help="a checkpoint as a Hugging Face save_pretrained folder")
    p.add_argument("checkpoint", metavar="CKPT.pt")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="a new or empty folder")
    p.add_argument("--corpus", metavar="PATH",
                   help="the training corpus, where it moved: a bpe tokenizer not in the cache is"
                   " retrained on it (default: the corpus the run's config names)")
    p.set_defaults(func=export)
    p = sub.add_parser("profile", help="where a train step's device time goes, by sublayer"
                       " and kernel")
    p.add_argument("model", help="registry spec, name[:preset]")
    p.add_argument("--seq", type=positive_int, required=True)
    p.add_argument("--batch", type=positive_int, default=None, help="default 1")
    p.add_argument("--phase", choices=("train", "forward"), default=None, help="default train")
    p.add_argument("--dtype", default=None, choices=("fp16", "bf16", "fp32"),
                   help="default fp16")
    p.add_argument("--tokens-per-step", type=positive_int, default=None,
                   help="the bench's fixed-tokens train step: bf16, fused AdamW, batch = N // seq")
    p.add_argument("--loss-chunk", type=nonnegative_int, default=0,
                   help="the loss's logits N positions at a time (0: whole)")
    p.add_argument("--compile", choices=("inductor", "aot_eager", "eager"), default=None,
                   help="the model under torch.compile with this backend (compiling untimed)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA float32 matmuls may use TF32, as training does by default "
                   "(--no-tf32: exact float32)")
    p.add_argument("--rows", type=positive_int, default=20)
    p.set_defaults(func=profile)
    p = sub.add_parser("memory", help="peak device memory of a training step, split into "
                       "weights, gradients and optimizer state")
    p.add_argument("model", help="registry spec, name[:preset]")
    p.add_argument("--seq", type=positive_int, nargs="+", required=True)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="compute dtype")
    p.add_argument("--weights", default="fp32", choices=("fp32", "bf16"),
                   help="fp32 master weights under autocast, or the weights themselves in bf16")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor"))
    p.add_argument("--checkpointing", action="store_true",
                   help="recompute each block in backward (the family's `checkpointing` key)")
    p.add_argument("--loss-chunk", type=nonnegative_int, default=0, metavar="N",
                   help="> 0: the next-token loss N positions at a time (no full logits)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="also write the rows, the "
                   "machine and the command here")
    p.set_defaults(func=memory)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except MuseError as exc:  # a user's mistake: one line, no traceback
        print(f"muse {args.command}: {one_line(exc)}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        print(f"muse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
