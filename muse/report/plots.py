"""The report's figures as PNG bytes (matplotlib, Agg): a figure whose data the results lack is
left out, never drawn empty."""

from __future__ import annotations

import io
import math
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI runners and GPU nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullLocator,
)

from muse.harness.results import Record, read_json  # noqa: E402
from muse.measure.scaling import fit_scaling  # noqa: E402

PHASES = ("forward", "train_step")
CONTROL = "transformer-eager"  # the O(N²) negative control of the scaling criterion
BUCKET = re.compile(r"h0_grad_norm_t(\d+)_(\d+)$")
# the throughput protocols (bench/test_throughput.py): line style and marker in the ratio plot
PROTOCOL_STYLE = {"forward": (":", "^"), "train_step": ("-", "o"), "fixed_step": ("--", "s"),
                  "fixed_batch_step": ("--", "D"), "compiled_step": ("-.", "s"),
                  "compiled_batch_step": ("-.", "D")}
# the train steps whose ratio records carry their own and their baseline's peak
STEP_PROTOCOLS = ("fixed_step", "fixed_batch_step", "compiled_step", "compiled_batch_step")
SPEEDUP = re.compile(rf"({'|'.join(PROTOCOL_STYLE)})_speedup_vs_")
MEMORY_METRIC = {"forward": "peak_vram_forward_bytes", "train_step": "peak_vram_train_step_bytes"}
CAPTIONS = {
    "memory": "Peak memory against sequence length",
    "throughput": "Tokens/s against sequence length, crossover with the transformer marked",
    "ratios": "Tokens/s and peak memory of each model ÷ its matched transformer, per protocol",
    "scaling": "Time against sequence length (log-log) with linear fits and the O(N²) control",
    "gradient": "Long-range gradient ‖∂L_last/∂h₀[t]‖ against position",
    "training": "Loss and perplexity during training",
}


def _series(records, metric, criterion=None) -> dict[str, list[tuple[int, float]]]:
    """label → sorted (seq, value) of the finite values of one metric (of one criterion: the
    kernel benchmarks record `forward_time_s` too)."""
    out = defaultdict(dict)
    for r in records:
        if r.metric == metric and r.seq is not None and r.value is not None \
                and math.isfinite(r.value) and criterion in (None, r.criterion):
            out[f"{r.model}:{r.preset}"][r.seq] = r.value
    return {k: sorted(v.items()) for k, v in sorted(out.items())}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes)]:
        if legend is not None:
            legend.set_in_layout(True)  # counted by bbox_inches="tight" below
    # tight: legends and notes placed outside the axes are kept, not cut off
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _is_transformer(spec: str) -> bool:
    return spec.split(":")[0].startswith("transformer")


def matched(records, criterion: str = "throughput") -> dict[str, str]:
    """model spec → the spec of its matched transformer, as one criterion's records name it (the
    `baseline` of a ratio or perplexity record: the perplexity gate matches at its tokenizer's
    vocabulary, the bench at the preset's); a transformer that is its own baseline is left out."""
    out = {}
    for r in records:
        spec, base = f"{r.model}:{r.preset}", r.extra.get("baseline")
        if r.criterion == criterion and isinstance(base, str) and base != spec:
            out.setdefault(spec, base)
    return out


def pair_styles(labels, pairs: dict[str, str]) -> dict[str, dict]:
    """Line colour and style per model spec: a model and its matched transformer share a colour,
    the model solid and every transformer dashed; a transformer matched to several models (or a
    control, or one unmatched) gets a colour of its own."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = sorted(set(labels), key=lambda s: s.split(":"))
    models = [s for s in labels if s in pairs and not _is_transformer(s)]
    partners = defaultdict(list)
    for m in models:
        partners[pairs[m]].append(m)
    out, colours = {}, iter(cycle * (len(labels) // len(cycle) + 1))
    for m in models:
        out[m] = {"color": next(colours), "ls": "-"}
        if len(partners[pairs[m]]) == 1:
            out[pairs[m]] = {"color": out[m]["color"], "ls": "--"}
    for s in labels:
        if s not in out:
            out[s] = {"color": next(colours), "ls": "--" if _is_transformer(s) else "-"}
    return out


def _legend_below(ax, *args, **kw) -> None:
    """A legend under the x label, left out of tight_layout so the plot keeps its height (the
    saved image grows to hold it)."""
    ax.legend(*args, loc="upper left", bbox_to_anchor=(0.0, -0.15), frameon=False,
              **kw).set_in_layout(False)


def _legend_right(fig, axes, **kw) -> None:
    """One legend for the figure, right of the plots, so it covers no curve."""
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.tight_layout()
    fig.legend(handles.values(), handles.keys(), loc="upper left", bbox_to_anchor=(1.0, 0.97),
               fontsize=8, **kw)


def _seq_axis(ax, seqs) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(seqs), [f"{s:,}" for s in sorted(seqs)])
    ax.minorticks_off()
    ax.set_xlabel("sequence length (tokens)")
    ax.grid(True, which="major", alpha=0.3)


def memory(records: list[Record]) -> bytes | None:
    data = {p: _series(records, MEMORY_METRIC[p]) for p in PHASES}
    if not any(data.values()):
        return None
    styles = pair_styles({k for d in data.values() for k in d}, matched(records))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, phase in zip(axes, PHASES, strict=True):
        for label, points in data[phase].items():
            ax.plot(*zip(*[(s, v / 1e9) for s, v in points], strict=True), marker="o",
                    label=label, **styles[label])
        limits = {r.threshold for r in records if r.metric == MEMORY_METRIC[phase]
                  and r.threshold}
        for limit in limits:
            ax.axhline(limit / 1e9, color="crimson", lw=1, ls=":",
                       label=f"limit {limit / 1e9:g} GB")
        _seq_axis(ax, {s for p in data[phase].values() for s, _ in p})
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.5, 1, 10: not 10⁰
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_title(phase.replace("_", " "))
    axes[0].set_ylabel("peak allocated memory (GB)")
    _legend_right(fig, axes, title="solid: model, dashed: transformer")
    return _png(fig)


def crossover(ratios: list[tuple[int, float]]) -> float | None:
    """The seq where a speed ratio to the transformer first crosses 1, interpolated in log-log."""
    for (s0, r0), (s1, r1) in zip(ratios, ratios[1:], strict=False):
        if (r0 - 1) * (r1 - 1) < 0:
            f = math.log(r0) / (math.log(r0) - math.log(r1))
            return math.exp(math.log(s0) + f * (math.log(s1) - math.log(s0)))
        if r1 == 1:
            return float(s1)
    return None


def _per_s(v, _) -> str:
    return f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k"


def throughput(records: list[Record]) -> bytes | None:
    data = {p: _series(records, f"{p}_tokens_per_s") for p in PHASES}
    if not any(data.values()):
        return None
    pairs = matched(records)
    styles = pair_styles({k for d in data.values() for k in d}, pairs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, phase in zip(axes, PHASES, strict=True):
        for label, points in data[phase].items():
            ax.plot(*zip(*points, strict=True), marker="o", label=label, **styles[label])
        # one line of notes per model below the plot, in its colour: never over a curve or
        # over another model's note
        notes = []
        for label, ratios in _series(records, f"{phase}_speedup_vs_transformer").items():
            colour = styles.get(label, {}).get("color", "k")
            seq = crossover(ratios)
            versus = pairs.get(label, "the transformer")
            if seq is None:
                faster = ratios[-1][1] > 1
                text = f"{label}: {'faster' if faster else 'slower'} than {versus} throughout"
            else:
                ax.axvline(seq, color=colour, ls=":", lw=1.2)
                text = f"{label}: crosses {versus} at seq ≈ {seq:,.0f} (dotted)"
            notes.append((Line2D([], [], color=colour, ls=":"), text))
        _seq_axis(ax, {s for p in data[phase].values() for s, _ in p})
        ax.set_title(phase.replace("_", " "))
        ax.set_yscale("log")
        # ticks at 1, 2 and 5 of each decade: a log axis with a label on every one
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(_per_s))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.grid(True, which="major", axis="y", alpha=0.3)
        ax.set_ylabel("tokens/s")
        if notes:
            _legend_below(ax, *zip(*notes, strict=True), fontsize=8, title_fontsize=8,
                          title="crossover with the matched transformer", alignment="left")
    _legend_right(fig, axes, title="solid: model, dashed: transformer")
    return _png(fig)


def _ratio_axis(ax) -> None:
    """Ratios on a log scale (0.5× as far below 1× as 2× above) with ticks at round ratios; a
    narrow range (all within 2.5× of each other) on a linear scale, ticked finely enough."""
    low, high = ax.get_ylim()
    if high / low < 2.5:
        ax.yaxis.set_major_locator(MaxNLocator(6))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}×"))
    else:
        ax.set_yscale("log")
        ticks = [t for t in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.25, 1.5, 2,
                             3, 4, 5, 7, 10, 20, 50) if low <= t <= high]
        ax.set_yticks(ticks, [f"{t:g}×" for t in ticks])
        ax.yaxis.set_minor_locator(NullLocator())
    ax.grid(True, which="major", axis="y", alpha=0.3)


def _protocol_label(protocol: str, records) -> str:
    """forward / train step at the run's batch (batch 1 by default), or the step as trained
    (bf16, AdamW: "AdamW step") at the fixed tokens/step or at the run's batch, compiled or
    not."""
    if protocol in ("fixed_step", "compiled_step"):
        tokens = sorted({r.extra["tokens_per_step"] for r in records
                         if r.extra.get("tokens_per_step")})
        label = "AdamW step, " + " or ".join(f"{t:,}" for t in tokens) + " tokens/step"
    else:
        batches = sorted({r.batch for r in records if r.batch is not None})
        name = "AdamW step" if protocol in STEP_PROTOCOLS else protocol.replace("_", " ")
        label = f"{name}, batch " + " or ".join(map(str, batches)) if batches else name
    return label + ", compiled" if protocol.startswith("compiled") else label


def _protocol_labels(records, protocols) -> dict[str, str]:
    """protocol → its legend label, from that protocol's ratio records."""
    return {p: _protocol_label(p, [r for r in records if r.metric.startswith(f"{p}_speedup_vs_")
                                   and isinstance(r.extra.get("baseline"), str)])
            for p in protocols}


def speed_ratios(records: list[Record]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """protocol → model → sorted (seq, tokens/s ÷ the matched transformer's), as recorded (each
    ratio is timed in the same run, model and transformer alike)."""
    out = defaultdict(lambda: defaultdict(dict))
    for r in records:
        m = SPEEDUP.match(r.metric)
        # a kernel's speedup over another kernel (bk_core) names no matched model: not here
        if m and isinstance(r.extra.get("baseline"), str) and r.seq is not None \
                and r.value is not None and math.isfinite(r.value) and r.value > 0 \
                and not _is_transformer(r.model):
            out[m[1]][f"{r.model}:{r.preset}"][r.seq] = r.value
    return {p: {k: sorted(v.items()) for k, v in sorted(d.items())} for p, d in out.items()}


def memory_ratios(records: list[Record]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """protocol → model → sorted (seq, peak memory ÷ the matched transformer's at that seq): the
    memory criterion's peaks at the run's batch, the fixed tokens/step ratio record's own."""
    pairs = matched(records)
    peaks = {p: {k: dict(v) for k, v in _series(records, MEMORY_METRIC[p]).items()}
             for p in PHASES}
    out = defaultdict(lambda: defaultdict(dict))
    for phase in PHASES:
        for model, base in pairs.items():
            if _is_transformer(model):
                continue
            mine, theirs = peaks[phase].get(model, {}), peaks[phase].get(base, {})
            for seq in sorted(set(mine) & set(theirs)):
                if theirs[seq] > 0:
                    out[phase][model][seq] = mine[seq] / theirs[seq]
    for r in records:
        own, base = r.extra.get("peak_bytes"), r.extra.get("baseline_peak_bytes")
        m = SPEEDUP.match(r.metric)
        if m and m[1] in STEP_PROTOCOLS and r.seq is not None \
                and not _is_transformer(r.model) and own and base:
            out[m[1]][f"{r.model}:{r.preset}"][r.seq] = own / base
    return {p: {k: sorted(v.items()) for k, v in sorted(d.items())} for p, d in out.items()}


def ratio_rows(records: list[Record]) -> tuple[list[int], list[tuple[str, str, list[str]]]]:
    """The ratio plot as a table: the seqs, and per model and protocol a cell a seq, "speed× /
    memory×" against the matched transformer ("–" where one of them was not measured)."""
    speed, mem = speed_ratios(records), memory_ratios(records)
    protocols = [p for p in PROTOCOL_STYLE if p in speed or p in mem]
    seqs = sorted({seq for d in (*speed.values(), *mem.values()) for pts in d.values()
                   for seq, _ in pts})
    rows = []
    for protocol, label in _protocol_labels(records, protocols).items():
        fast, small = speed.get(protocol, {}), mem.get(protocol, {})
        for model in sorted(set(fast) | set(small)):
            s, m = dict(fast.get(model, ())), dict(small.get(model, ()))
            cells = [f"{s[q]:.2f}× / {m[q]:.2f}×" if q in s and q in m
                     else f"{s[q]:.2f}× / –" if q in s else f"– / {m[q]:.2f}×" if q in m else ""
                     for q in seqs]
            rows.append((model, label, cells))
    return seqs, rows


FLA_PEER = "fla-"  # the registry's prefix of the flash-linear-attention peers


def peer_rows(records: list[Record]) -> tuple[list[int], list[tuple[str, str, list[str]]]]:
    """Each model's tokens/s ratio ÷ the best fla peer's of the same size (the peers matched to
    the same transformer, each ratio timed against it in its own run) per protocol and seq, the
    peer named: > 1, faster than the best peer measured there. Only where a peer was measured."""
    speed, pairs = speed_ratios(records), matched(records)
    protocols = [p for p in PROTOCOL_STYLE if p in speed]
    rows, seqs = [], set()
    for protocol, label in _protocol_labels(records, protocols).items():
        models = {k: dict(v) for k, v in speed[protocol].items()}
        for model in sorted(k for k in models if not k.startswith(FLA_PEER)):
            peers = {k: v for k, v in models.items()
                     if k.startswith(FLA_PEER) and pairs.get(k) == pairs.get(model)}
            cells = {}
            for seq, ratio in models[model].items():
                best = max(((v[seq], k) for k, v in peers.items() if seq in v), default=None)
                if best is not None:
                    cells[seq] = f"{ratio / best[0]:.2f}× ({best[1]})"
            if cells:
                rows.append((model, label, cells))
                seqs |= set(cells)
    order = sorted(seqs)
    return order, [(m, label, [c.get(q, "") for q in order]) for m, label, c in rows]


def ratios(records: list[Record]) -> bytes | None:
    speed, mem = speed_ratios(records), memory_ratios(records)
    if not speed and not mem:
        return None
    pairs = matched(records)
    labels = {k for d in (*speed.values(), *mem.values()) for k in d}
    styles = pair_styles(labels | {pairs[k] for k in labels}, pairs)
    protocols = [p for p in PROTOCOL_STYLE if p in speed or p in mem]
    labels_of = _protocol_labels(records, protocols)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = ((axes[0], speed, "tokens/s ÷ matched transformer (> 1: faster)"),
              (axes[1], mem, "peak memory ÷ matched transformer (< 1: less)"))
    for ax, data, title in panels:
        for protocol in protocols:
            ls, marker = PROTOCOL_STYLE[protocol]
            for label, points in data.get(protocol, {}).items():
                ax.plot(*zip(*points, strict=True), ls=ls, marker=marker,
                        color=styles[label]["color"])
        ax.axhline(1.0, color="k", lw=1)
        seqs = {s for d in data.values() for p in d.values() for s, _ in p}
        if seqs:
            _seq_axis(ax, seqs)
        else:
            ax.text(0.5, 0.5, "not measured in these results", transform=ax.transAxes,
                    ha="center")
        _ratio_axis(ax)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    models = [Line2D([], [], color=styles[k]["color"], lw=2) for k in sorted(labels)]
    fig.legend(models, [f"{k} ÷ {pairs[k]}" for k in sorted(labels)], loc="upper left",
               bbox_to_anchor=(1.0, 0.97), fontsize=8, title="model ÷ its transformer")
    kinds = [Line2D([], [], color="k", ls=PROTOCOL_STYLE[p][0], marker=PROTOCOL_STYLE[p][1])
             for p in protocols]
    fig.legend(kinds, [labels_of[p] for p in protocols], loc="lower left",
               bbox_to_anchor=(1.0, 0.1), fontsize=8, title="protocol")
    return _png(fig)


def scaling(records: list[Record]) -> bytes | None:
    data = {p: _series(records, f"{p}_time_s", "scaling") for p in PHASES}
    if not any(data.values()):
        return None
    styles = pair_styles({k for d in data.values() for k in d}, matched(records))
    colors = {k: v["color"] for k, v in styles.items()}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, phase in zip(axes, PHASES, strict=True):
        for label, points in data[phase].items():
            seqs, times = zip(*points, strict=True)
            control = label.split(":")[0] == CONTROL
            name = f"{label} (O(N²) control)" if control else label
            if len(points) >= 3:
                fit = fit_scaling(list(seqs), list(times))
                grid = np.geomspace(seqs[0], seqs[-1], 50)
                line = fit.linear_intercept_s + fit.linear_slope_s * grid
                # A superlinear control fits a negative intercept: only the positive part can
                # be drawn on a log axis.
                ax.plot(grid[line > 0], line[line > 0], ls=styles[label]["ls"],
                        color=colors[label], lw=1, alpha=0.8)
                name += f": R² {fit.linear_r2:.3f}, top slope {fit.loglog_slope_top:.2f}"
            # a pair shares a colour: the transformer's points are open squares
            marker = "^" if control else "s" if _is_transformer(label) else "o"
            ax.plot(seqs, times, marker, color=colors[label], label=name,
                    mfc="none" if marker == "s" else colors[label])
            if control:
                guide = times[0] * (np.asarray(seqs) / seqs[0]) ** 2
                ax.plot(seqs, guide, color="grey", ls=":", lw=1, label="∝ N² from the control")
        _seq_axis(ax, {s for p in data[phase].values() for s, _ in p})
        ax.set_yscale("log")
        low = min(t for p in data[phase].values() for _, t in p)
        ax.set_ylim(bottom=low / 2)  # the clipped fits would otherwise stretch the axis down
        ax.set_title(f"{phase.replace('_', ' ')} (lines: linear fit t = a + bN)")
        ax.set_ylabel("median time (s)")
        # below the plot: the legend covers no point and no fit
        _legend_below(ax, fontsize=7)
    return _png(fig)


def gradient(records: list[Record]) -> bytes | None:
    curves = defaultdict(list)
    for r in records:
        m = BUCKET.match(r.metric)
        if m and r.value is not None and r.value > 0 and math.isfinite(r.value):
            curves[f"{r.model}:{r.preset} (seq {r.seq})"].append(
                ((int(m[1]) + int(m[2])) / 2, r.value))
    if not curves:
        return None
    styles = pair_styles({label.split()[0] for label in curves}, matched(records))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, points in sorted(curves.items(), key=lambda kv: kv[0].split(":")):
        ax.plot(*zip(*sorted(points), strict=True), marker="o", label=label,
                **styles[label.split()[0]])
    for limit in {r.threshold for r in records if r.metric == "long_range_grad_norm"} - {None}:
        ax.axhline(limit, color="crimson", ls=":", lw=1, label=f"minimum {limit:g}")
    ax.set_yscale("log")
    ax.set_xlabel("position t (middle of the bucket)")
    ax.set_ylabel("mean ‖∂L_last/∂h₀[t]‖")
    ax.grid(True, alpha=0.3)
    _legend_right(fig, [ax], title="solid: model, dashed: transformer")
    return _png(fig)


def training(history, pairs: dict[str, str] | None = None) -> bytes | None:
    """history: {label: [{"step": int, "loss": float, "ppl"?: float, ...}, ...]} (the trainer's
    history.json; a label starts with the model spec, "phase2:small seed0 model"), a path to it,
    or None. pairs (model → matched transformer) colours a model and its transformer alike."""
    if history is None:
        return None
    if isinstance(history, (str, Path)):
        history = read_json(history, f"history {str(history)!r}")
    keys = [k for k in ("loss", "val_loss", "ppl", "val_ppl")
            if any(k in row for rows in history.values() for row in rows)]
    if not keys:
        return None
    spec = {label: label.split()[0] if label.strip() else label for label in history}
    styles = pair_styles(set(spec.values()), pairs or {})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, rows in sorted(history.items(), key=lambda kv: kv[0].split(":")):
            points = [(row["step"], row[key]) for row in rows if key in row]
            if points:
                # every seed of a model in one style, under one legend entry
                ax.plot(*zip(*points, strict=True), label=spec[label], lw=1, alpha=0.85,
                        **styles[spec[label]])
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        if "ppl" in key:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 3, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 200, not 2×10²
            ax.yaxis.set_minor_locator(NullLocator())
        ax.grid(True, alpha=0.3)
    _legend_right(fig, axes[0], title="solid: model, dashed: transformer\n(one line per seed)")
    return _png(fig)


def all_figures(records: list[Record], history=None) -> dict[str, bytes]:
    figures = {
        "memory": memory(records),
        "throughput": throughput(records),
        "ratios": ratios(records),
        "scaling": scaling(records),
        "gradient": gradient(records),
        "training": training(history, matched(records, "perplexity")),
    }
    return {name: png for name, png in figures.items() if png is not None}
