"""Results → tables (Jinja2 templates in muse/report/templates/: md, csv, tex per table),
REPORT.md and a self-contained report.html with the plots of muse.report.plots embedded."""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import jinja2
import pandas as pd

from muse.errors import MuseError
from muse.fileio import atomic_write_bytes
from muse.harness.results import Record, read_document, read_json
from muse.harness.summary import VERDICTS, format_value

# package data, read through importlib.resources so an installed wheel finds them
TEMPLATES = resources.files("muse.report") / "templates"
NOT_MEASURED = "not measured"
ALL_SEQS = -1  # the seq of a record that spans every seq (a scaling fit); a real seq is ≥ 1
HISTORY_KEYS = ("loss", "val_loss", "ppl", "val_ppl")  # what the training plot draws
RESULTS = Path("reports/results")  # where `muse report` looks when no results file is given


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    criterion: str
    metrics: tuple[str, ...] | None  # None: every metric the results hold for the criterion
    optional: tuple[str, ...] = ()  # after metrics, each only where the results hold it


TABLES = (
    Spec("memory", "Peak memory", "memory",
         ("peak_vram_forward_bytes", "peak_vram_train_step_bytes")),
    Spec("throughput", "Throughput", "throughput",
         ("forward_tokens_per_s", "train_step_tokens_per_s",
          "forward_speedup_vs_transformer", "train_step_speedup_vs_transformer",
          "fixed_step_tokens_per_s", "fixed_step_speedup_vs_transformer",
          "fixed_step_peak_bytes", "graphed_step_tokens_per_s",
          "graphed_step_speedup_vs_transformer", "cuda_graph_gain"),
         # the step at --batch sequences; with --cuda-graphs: graphed; with --compile: compiled
         ("fixed_batch_step_tokens_per_s", "fixed_batch_step_speedup_vs_transformer",
          "fixed_batch_step_peak_bytes",
          "graphed_batch_step_tokens_per_s", "graphed_batch_step_speedup_vs_transformer",
          "batch_cuda_graph_gain", "compiled_step_tokens_per_s",
          "compiled_step_speedup_vs_transformer", "compiled_step_peak_bytes", "compile_gain",
          "compiled_batch_step_tokens_per_s", "compiled_batch_step_speedup_vs_transformer",
          "compiled_batch_step_peak_bytes", "batch_compile_gain")),
    Spec("scaling", "Scaling with sequence length", "scaling",
         ("forward_time_s", "train_step_time_s", "forward_linear_r2", "forward_loglog_slope_top",
          "train_step_linear_r2", "train_step_loglog_slope_top"),
         # --cuda-graphs only: a run without it keeps the table it always had
         ("graphed_forward_time_s", "graphed_train_step_time_s", "graphed_forward_linear_r2",
          "graphed_forward_loglog_slope_top", "graphed_train_step_linear_r2",
          "graphed_train_step_loglog_slope_top")),
    Spec("gradient_flow", "Gradient flow", "gradient_flow",
         ("first_layer_grad_norm", "long_range_grad_norm", "embedding_grad_norm",
          "nonfinite_grad_tensors")),
    Spec("stability", "Numerical stability", "stability",
         ("nonfinite_logits", "nonfinite_grad_tensors", "min_layer_grad_norm",
          "max_layer_grad_norm")),
    Spec("decode", "Decoding after a long prompt", "decode",
         ("decode_state_bytes", "decode_tokens_per_s", "decode_peak_bytes",
          "decode_state_growth", "kv_cache_growth")),
    Spec("perplexity", "Perplexity", "perplexity", None),
    Spec("config_sweep", "Configuration sweep", "config_sweep", None),
)

LABELS = {
    "peak_vram_forward_bytes": "forward peak",
    "peak_vram_train_step_bytes": "train-step peak",
    "forward_tokens_per_s": "forward",
    "train_step_tokens_per_s": "train step",
    "forward_speedup_vs_transformer": "forward ×transformer",
    "train_step_speedup_vs_transformer": "train step ×transformer",
    # the tokens-per-step protocol (bench/test_throughput.py)
    "fixed_step_tokens_per_s": "train step, fixed tokens/step",
    "fixed_step_speedup_vs_transformer": "×transformer, fixed tokens/step",
    "fixed_step_peak_bytes": "train-step peak, fixed tokens/step",
    # the same step captured in a CUDA graph (--cuda-graphs)
    "graphed_step_tokens_per_s": "train step, CUDA graph",
    "graphed_step_speedup_vs_transformer": "×transformer, CUDA graph",
    "cuda_graph_gain": "CUDA graph ÷ eager",
    # and at --batch sequences a step (--cuda-graphs)
    "graphed_batch_step_tokens_per_s": "train step at --batch, CUDA graph",
    "graphed_batch_step_speedup_vs_transformer": "×transformer at --batch, CUDA graph",
    "batch_cuda_graph_gain": "CUDA graph ÷ eager at --batch",
    # the fixed-tokens step under torch.compile (--compile)
    "compiled_step_tokens_per_s": "train step, compiled",
    "compiled_step_speedup_vs_transformer": "×transformer, compiled",
    "compiled_step_peak_bytes": "train-step peak, compiled",
    "compile_gain": "compiled ÷ eager",
    # the step at --batch sequences (the batch-1 protocol), eager and compiled
    "fixed_batch_step_tokens_per_s": "train step at --batch",
    "fixed_batch_step_speedup_vs_transformer": "×transformer at --batch",
    "fixed_batch_step_peak_bytes": "train-step peak at --batch",
    "compiled_batch_step_tokens_per_s": "train step at --batch, compiled",
    "compiled_batch_step_speedup_vs_transformer": "×transformer at --batch, compiled",
    "compiled_batch_step_peak_bytes": "train-step peak at --batch, compiled",
    "batch_compile_gain": "compiled ÷ eager at --batch",
    "forward_time_s": "forward time",
    "train_step_time_s": "train-step time",
    "forward_linear_r2": "forward R²",
    "forward_loglog_slope_top": "forward slope (top)",
    "train_step_linear_r2": "train-step R²",
    "train_step_loglog_slope_top": "train-step slope (top)",
    # the same replayed from a CUDA graph (--cuda-graphs)
    "graphed_forward_time_s": "forward time, CUDA graph",
    "graphed_train_step_time_s": "train-step time, CUDA graph",
    "graphed_forward_linear_r2": "forward R², CUDA graph",
    "graphed_forward_loglog_slope_top": "forward slope (top), CUDA graph",
    "graphed_train_step_linear_r2": "train-step R², CUDA graph",
    "graphed_train_step_loglog_slope_top": "train-step slope (top), CUDA graph",
    "first_layer_grad_norm": "first layer ‖∇‖",
    "long_range_grad_norm": "long-range ‖∂L/∂h₀‖",
    "embedding_grad_norm": "embedding ‖∇‖",
    "nonfinite_grad_tensors": "non-finite grads",
    "nonfinite_logits": "non-finite logits",
    "min_layer_grad_norm": "min layer ‖∇‖",
    "max_layer_grad_norm": "max layer ‖∇‖",
    "decode_state_bytes": "state after the prompt",
    "decode_tokens_per_s": "decode tokens/s",
    "decode_peak_bytes": "decode peak",
    "decode_state_growth": "state growth",
    "kv_cache_growth": "KV cache growth",
    "ppl": "PPL",
    "baseline_ppl": "baseline PPL",
    "ppl_degradation": "PPL degradation",
    "bits_per_byte": "bits/byte",
    "baseline_bits_per_byte": "baseline bits/byte",
    "ppl_recall": "PPL recall",
    "baseline_ppl_recall": "baseline PPL recall",
    "ppl_degradation_recall": "degradation recall",
    "ppl_other": "PPL other",
    "baseline_ppl_other": "baseline PPL other",
    "ppl_degradation_other": "degradation other",
    "recall_fraction": "recall tokens",
    "lr": "lr",
    "baseline_lr": "baseline lr",
    "train_budget_tokens": "training tokens/seed",
    "baseline_train_budget_tokens": "baseline training tokens/seed",
    "control_ppl": "untrained PPL",
    "control_degradation": "untrained degradation",
}


@dataclass
class Cell:
    record: Record | None
    applies: bool = True  # False: the metric has no value in this row (a fit has no seq)
    why_missing: str = NOT_MEASURED

    @property
    def text(self) -> str:
        r = self.record
        if not self.applies:
            return ""
        if r is None:
            return self.why_missing
        if r.status in ("OOM", "ERROR") and r.value is None:
            return r.status
        text = format_value(r.value, r.unit)
        if r.status in VERDICTS:
            text += f" {r.status}"
            if r.threshold is not None:
                text += f" ({r.comparison} {format_value(r.threshold, r.unit)})"
        return text

    @property
    def value_text(self) -> str:
        """The value alone, and below it verdict_text: a narrow cell for the HTML table."""
        r = self.record
        if r is None or r.status not in VERDICTS or r.value is None:
            return self.text
        return format_value(r.value, r.unit)

    @property
    def verdict_text(self) -> str:
        r = self.record
        if r is None or r.status not in VERDICTS or r.value is None:
            return ""
        return self.text.removeprefix(self.value_text).strip()

    @property
    def status(self) -> str:
        if not self.applies:
            return ""
        return self.why_missing if self.record is None else self.record.status


@dataclass
class Table:
    spec: Spec
    metrics: list[str]
    rows: list[tuple[str, str, list[Cell]]]  # (model, seq text, cells)
    notes: list[str] = field(default_factory=list)

    @property
    def headers(self) -> list[str]:
        return ["model", "seq", *(LABELS.get(m, m) for m in self.metrics)]

    @property
    def counts(self) -> dict[str, int]:
        statuses = [c.record.status for _, _, cells in self.rows for c in cells if c.record]
        return {s: statuses.count(s) for s in VERDICTS if s in statuses}


def load(paths) -> tuple[list[Record], list[dict]]:
    """Records of every file in order, a later file's record replacing an earlier one with the
    same key (criterion, `row_label`, seq, metric), so that the verdicts, the tables and the plots
    all show the current measurement; and each file's facts without its records."""
    records, docs = {}, []
    for path in paths:
        doc = read_document(path)
        mine = doc.pop("records")
        for r in mine:
            key = (r.criterion, row_label(r), r.seq, r.metric)
            records.pop(key, None)  # the replacement takes the later file's place in the order
            records[key] = r
        folders = {r.extra["history"] for r in mine if isinstance(r.extra.get("history"), str)}
        docs.append({**doc, "path": str(path), "history_folders": sorted(folders)})
    return list(records.values()), docs


def latest_results(root: Path = RESULTS) -> list[Path]:
    """Every latest.json under root (the current run of each kind: the bench, the perplexity
    gate) in the order the runs started, then in path order: a later run's record replaces an
    earlier's, whatever folder either sits in (folder names and depths need not follow dates)."""
    root = Path(root)
    if not root.is_dir():
        raise MuseError(f"no results file given and {str(root)!r} is not a folder; pass "
                        "RESULTS.json files")
    found = sorted(root.rglob("latest.json"),
                   key=lambda p: (_started_at(p), p.parts))
    if not found:
        raise MuseError(f"no results file given and no latest.json under {str(root)!r}; pass "
                        "RESULTS.json files")
    return found


def _started_at(path: Path) -> str:
    """The run's start (ISO 8601, UTC, so it sorts as text); "" where the file has none."""
    try:
        started = json.loads(path.read_text(encoding="utf-8")).get("started_at")
    except (OSError, ValueError, AttributeError):
        return ""  # load() names what is wrong with the file
    return started if isinstance(started, str) else ""


def named_history(docs: list[dict]) -> dict[str, list[dict]] | None:
    """The training histories the results name (the perplexity gate writes them beside its
    results file, in <run>-perplexity/history.json, or .json.gz), merged; None when none is
    there."""
    merged = {}
    for doc in docs:
        for folder in doc["history_folders"]:
            here = Path(doc["path"]).parent / Path(folder).name
            # reports/ keeps its histories gzipped: the checkout travels to the GPU whole
            for candidate in (here / "history.json", here / "history.json.gz"):
                if candidate.is_file():
                    merged.update(read_history(candidate))
                    break
    return merged or None


def row_label(record: Record) -> str:
    """model:preset, and the corpus where the record names one: runs of one model on two corpora
    are two rows, never one replacing the other."""
    corpus = record.extra.get("corpus") if isinstance(record.extra, dict) else None
    name = f"{record.model}:{record.preset}"
    return f"{name} ({corpus})" if isinstance(corpus, str) else name


def record_frame(records: list[Record]) -> pd.DataFrame:
    """One row a record; one record a key, as `load` gives them."""
    return pd.DataFrame(
        {
            "criterion": [r.criterion for r in records],
            "model": [row_label(r) for r in records],
            "seq": [ALL_SEQS if r.seq is None else r.seq for r in records],
            "metric": [r.metric for r in records],
            "record": records,
        }
    )


def build_table(spec: Spec, df: pd.DataFrame) -> Table:
    mine = df[df.criterion == spec.criterion]
    failures = mine[mine.metric == "run"]  # an OOM or error of the whole case
    measured = mine[mine.metric != "run"]
    metrics = list(spec.metrics or dict.fromkeys(measured.metric))
    metrics += [m for m in spec.optional if (measured.metric == m).any()]
    notes = []
    if measured.empty:
        notes.append(f"{NOT_MEASURED}: these results hold no {spec.criterion} records.")
        metrics = metrics or ["result"]
    # a metric with no record at all reads "not measured" in every row, never blank
    per_seq = {m: bool((measured[measured.metric == m].seq != ALL_SEQS).any())
               or not (measured.metric == m).any() for m in metrics}
    grid = measured.pivot(index=["model", "seq"], columns="metric", values="record")
    keys = set(grid.index) | set(zip(failures.model, failures.seq, strict=True))
    rows = []
    # "transformer" before "transformer-eager", and the row of a fit over all seqs last.
    for model, seq in sorted(keys, key=lambda k: (k[0].split(":"), k[1] == ALL_SEQS, k[1])):
        failed = failures[(failures.model == model) & (failures.seq == seq)]
        why = f"{NOT_MEASURED} ({failed.record.iloc[0].status})" if len(failed) else NOT_MEASURED
        cells = []
        for m in metrics:
            rec = grid.at[(model, seq), m] if (model, seq) in grid.index and m in grid else None
            rec = rec if isinstance(rec, Record) else None  # pivot fills holes with NaN
            applies = rec is not None or per_seq.get(m, True) == (seq != ALL_SEQS)
            cells.append(Cell(rec, applies, why))
        rows.append((model, "all" if seq == ALL_SEQS else str(seq), cells))
    # a model with none of this criterion's records gets one row saying so (by model:preset: a
    # corpus in the label only tells runs of this criterion apart)
    base = {m: m.split(" (")[0] for m in set(df.model)}
    for model in sorted(set(base.values()) - {base.get(k[0], k[0]) for k in keys},
                        key=lambda m: m.split(":")):
        rows.append((model, "", [Cell(None) for _ in metrics]))
    return Table(spec, metrics, rows, notes)


def verdict_counts(records: list[Record]) -> list[dict]:
    """Per criterion, how many verdicts of each kind."""
    out = {}
    for r in records:
        if r.status in VERDICTS:
            out.setdefault(r.criterion, dict.fromkeys(VERDICTS, 0))[r.status] += 1
    return [{"criterion": c, **counts} for c, counts in out.items()]


def verdict_rows(records: list[Record]) -> list[dict]:
    return [
        {
            "criterion": r.criterion,
            "model": f"{r.model}:{r.preset}",
            "seq": "all" if r.seq is None else str(r.seq),
            "metric": r.metric,
            "value": format_value(r.value, r.unit),
            "threshold": "" if r.threshold is None
            else f"{r.comparison} {format_value(r.threshold, r.unit)}",
            "status": r.status,
        }
        for r in records
        if r.status in VERDICTS
    ]


def _csv_cell(value) -> str:
    text = "" if value is None else repr(value) if isinstance(value, float) else str(value)
    if any(c in text for c in ',"\n'):
        text = '"' + text.replace('"', '""') + '"'
    return text


def _tex(text) -> str:
    text = str(text).replace("\\", "\x00")
    for a in "&%$#_{}":
        text = text.replace(a, "\\" + a)
    text = text.replace("\x00", r"\textbackslash{}")
    for a, b in (("<=", "$\\le$"), (">=", "$\\ge$"), ("<", "$<$"), (">", "$>$"),
                 ("×", "$\\times$"), ("²", "$^2$"), ("‖", "$\\|$"), ("∇", "$\\nabla$"),
                 ("∂", "$\\partial$"), ("₀", "$_0$"), ("—", "---"), ("–", "--")):
        text = text.replace(a, b)
    return text


def _md(text) -> str:
    return str(text).replace("|", "\\|")


def _packaged(name: str) -> str | None:
    item = TEMPLATES / name
    return item.read_text(encoding="utf-8") if item.is_file() else None


def environment(templates: Path | None = None) -> jinja2.Environment:
    """Templates from a folder, or muse's own when none is given."""
    loader = (jinja2.FunctionLoader(_packaged) if templates is None
              else jinja2.FileSystemLoader(str(templates)))
    env = jinja2.Environment(
        loader=loader,
        autoescape=lambda name: bool(name) and name.endswith(".html.j2"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(csv=_csv_cell, tex=_tex, md=_md, isnan=lambda x: x != x)
    return env


def facts_of(docs: list[dict]) -> list[dict]:
    out = []
    for d in docs:
        env, git = d.get("environment") or {}, d.get("git") or {}
        gpus = env.get("gpu_names") or []
        sha = git.get("sha")
        out.append({
            "path": d["path"],
            "run": d.get("run"),
            "command": d.get("command"),
            "started_at": d.get("started_at"),
            "finished_at": d.get("finished_at"),
            "git": "unknown (not recorded)" if not sha
            else sha + (" (dirty)" if git.get("dirty") else ""),
            "gpu": ", ".join(gpus) if gpus else "none (CPU)",
            "software": ", ".join(
                f"{k} {env[k]}" for k in ("python", "torch", "torch_cuda", "triton", "driver")
                if env.get(k)
            ),
            "platform": env.get("platform") or "unknown",
            "summary": d.get("summary") or {},
        })
    return out


def read_history(path) -> dict[str, list[dict]]:
    """A training history.json ({label: [{"step": int, "loss": number or null, …}, …]}, as the
    trainer and the perplexity gate write it) for the training plot; null reads as NaN."""
    where = f"--history {str(path)!r}"
    history = read_json(path, where)
    shape = "a training history.json: {model: [{step, loss, ...}, ...]}"
    if not isinstance(history, dict) or not all(isinstance(v, list) for v in history.values()):
        raise MuseError(f"{where} is not {shape}")
    out = {}
    for label, rows in history.items():
        for i, row in enumerate(rows):
            step = row.get("step") if isinstance(row, dict) else None
            if not isinstance(step, int) or isinstance(step, bool):
                raise MuseError(f"{where}: row {i} of {label!r} has no integer step; "
                                f"expected {shape}")
            for key in HISTORY_KEYS:
                value = row.get(key)
                if value is not None and (isinstance(value, bool)
                                          or not isinstance(value, (int, float))):
                    raise MuseError(f"{where}: row {i} of {label!r}: {key} must be a number "
                                    f"or null, got {value!r}")
        out[label] = [{**r, **{k: math.nan for k in HISTORY_KEYS if k in r and r[k] is None}}
                      for r in rows]
    return out


def _templates(templates: Path | None) -> jinja2.Environment:
    folder = Path(templates) if templates is not None else TEMPLATES
    if not folder.is_dir():
        raise MuseError(f"--templates {str(folder)!r} is not a folder; it holds the Jinja2 "
                        f"templates (see {TEMPLATES})")
    needed = [f"{t.name}.{fmt}.j2" for t in TABLES for fmt in ("md", "csv", "tex")]
    missing = [n for n in [*needed, "REPORT.md.j2", "report.html.j2"] if not (folder / n).is_file()]
    if missing:
        shown = ", ".join(missing[:4]) + (", …" if len(missing) > 4 else "")
        raise MuseError(f"--templates {str(folder)!r} lacks {len(missing)} template(s): {shown}")
    return environment(None if templates is None else folder)


def _render(env: jinja2.Environment, name: str, **context) -> str:
    try:
        return env.get_template(name).render(**context)
    except jinja2.TemplateError as e:  # a user's own template: a syntax error, an unknown name
        raise MuseError(f"template {name!r}: {type(e).__name__}: {e}") from None


def render(paths, out, *, history=None, templates: Path | None = None) -> dict[str, Path]:
    """Writes tables/*.{md,csv,tex}, plots/*.png, REPORT.md and report.html under out; history (a
    history.json path or its contents) defaults to the histories the results name. Every input
    is read and every file rendered before the first one is written, so a bad input leaves
    nothing behind."""
    from muse.report import plots

    out = Path(out)
    records, docs = load(paths)
    env = _templates(templates)
    if history is None:
        history = named_history(docs)
    elif isinstance(history, (str, Path)):
        history = read_history(history)
    if out.exists() and not out.is_dir():
        raise MuseError(f"--out {str(out)!r} is a file; pass a folder")
    tables = [build_table(spec, record_frame(records)) for spec in TABLES]
    files: dict[str, tuple[Path, bytes]] = {}
    rendered_md, abouts = {}, {}
    for t in tables:
        for fmt in ("md", "csv", "tex"):
            text = _render(env, f"{t.spec.name}.{fmt}.j2", table=t)
            files[f"{t.spec.name}.{fmt}"] = (Path("tables") / f"{t.spec.name}.{fmt}",
                                             text.encode("utf-8"))
        rendered_md[t.spec.name] = files[f"{t.spec.name}.md"][1].decode("utf-8")
        template = env.get_template(f"{t.spec.name}.md.j2")
        if "about" in template.blocks:  # the same prose heads the table in the HTML
            about = template.blocks["about"](template.new_context({"table": t}))
            abouts[t.spec.name] = "".join(about).strip().replace("`", "")
    figures = plots.all_figures(records, history)
    ratio_seqs, ratio_rows = plots.ratio_rows(records)
    peer_seqs, peer_rows = plots.peer_rows(records)
    for name, png in figures.items():
        files[f"{name}.png"] = (Path("plots") / f"{name}.png", png)
    context = {
        "facts": facts_of(docs),
        "tables": tables,
        "table_md": rendered_md,
        "about": abouts,
        "verdicts": verdict_rows(records),
        "verdict_counts": verdict_counts(records),
        "statuses": VERDICTS,
        "plots": [(name, plots.CAPTIONS[name]) for name in figures],
        "missing_plots": [c for n, c in plots.CAPTIONS.items() if n not in figures],
        "images": {n: base64.b64encode(png).decode("ascii") for n, png in figures.items()},
        "failed": sum(r.passed is False for r in records),
        "ratio_seqs": ratio_seqs,
        "ratio_rows": ratio_rows,
        "peer_seqs": peer_seqs,
        "peer_rows": peer_rows,
    }
    for name in ("REPORT.md", "report.html"):
        files[name] = (Path(name), _render(env, f"{name}.j2", **context).encode("utf-8"))
    written = {}
    try:
        for sub in ("tables", "plots"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        for key, (relative, data) in files.items():
            atomic_write_bytes(out / relative, lambda f, data=data: f.write(data))
            written[key] = out / relative
    except OSError as e:
        raise MuseError(f"--out {str(out)!r} cannot be written: {e.strerror or e}") from None
    return written
