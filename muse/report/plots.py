"""The report's figures as PNG bytes (matplotlib, Agg): a figure whose data the results lack is
left out, never drawn empty."""

from __future__ import annotations

import io
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI runners and GPU nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from muse.harness.results import Record  # noqa: E402
from muse.measure.scaling import fit_scaling  # noqa: E402

PHASES = ("forward", "train_step")
CONTROL = "transformer-eager"  # the O(N²) negative control of the scaling criterion
BUCKET = re.compile(r"h0_grad_norm_t(\d+)_(\d+)$")
CAPTIONS = {
    "memory": "Peak memory against sequence length",
    "throughput": "Tokens/s against sequence length, crossover with the transformer marked",
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
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _colors(labels) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {label: cycle[i % len(cycle)] for i, label in enumerate(sorted(labels))}


def _seq_axis(ax, seqs) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(seqs), [f"{s:,}" for s in sorted(seqs)])
    ax.minorticks_off()
    ax.set_xlabel("sequence length (tokens)")
    ax.grid(True, which="major", alpha=0.3)


def memory(records: list[Record]) -> bytes | None:
    fwd = _series(records, "peak_vram_forward_bytes")
    train = _series(records, "peak_vram_train_step_bytes")
    if not fwd and not train:
        return None
    colors = _colors(set(fwd) | set(train))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, points in fwd.items():
        ax.plot(*zip(*[(s, v / 1e9) for s, v in points], strict=True), "o-",
                color=colors[label], label=f"{label} forward")
    for label, points in train.items():
        ax.plot(*zip(*[(s, v / 1e9) for s, v in points], strict=True), "s--",
                color=colors[label], label=f"{label} train step")
    limits = {r.threshold for r in records if r.metric == "peak_vram_forward_bytes" and r.threshold}
    for limit in limits:
        ax.axhline(limit / 1e9, color="crimson", lw=1, ls=":", label=f"limit {limit / 1e9:g} GB")
    _seq_axis(ax, {s for p in [*fwd.values(), *train.values()] for s, _ in p})
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.5, 1, 10: not 10⁰
    ax.set_ylabel("peak allocated memory (GB)")
    ax.legend(fontsize=8)
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


def throughput(records: list[Record]) -> bytes | None:
    data = {p: _series(records, f"{p}_tokens_per_s") for p in PHASES}
    if not any(data.values()):
        return None
    colors = _colors({k for d in data.values() for k in d})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, phase in zip(axes, PHASES, strict=True):
        for label, points in data[phase].items():
            ax.plot(*zip(*points, strict=True), "o-", color=colors[label], label=label)
        ratios_of = _series(records, f"{phase}_speedup_vs_transformer")
        for label, ratios in ratios_of.items():
            seq = crossover(ratios)
            if seq is None:
                faster = ratios[-1][1] > 1
                ax.text(0.98, 0.03, f"{label}: no crossover in this range\n"
                        f"({'faster' if faster else 'slower'} than the transformer throughout)",
                        transform=ax.transAxes, ha="right", fontsize=7,
                        color=colors.get(label, "k"))
            else:
                ax.axvline(seq, color=colors.get(label, "k"), ls=":", lw=1.2)
                ax.annotate(f"{label} crosses\ntransformer ≈ {seq:,.0f}", (seq, 0.95),
                            xycoords=("data", "axes fraction"), fontsize=7, va="top")
        _seq_axis(ax, {s for p in data[phase].values() for s, _ in p})
        ax.set_title(phase.replace("_", " "))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e3:,.0f}k"))
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=8)
    return _png(fig)


def scaling(records: list[Record]) -> bytes | None:
    data = {p: _series(records, f"{p}_time_s", "scaling") for p in PHASES}
    if not any(data.values()):
        return None
    colors = _colors({k for d in data.values() for k in d})
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
                ax.plot(grid[line > 0], line[line > 0], "--", color=colors[label], lw=1,
                        alpha=0.8)
                name += f": R² {fit.linear_r2:.3f}, top slope {fit.loglog_slope_top:.2f}"
            ax.plot(seqs, times, "^" if control else "o", color=colors[label], label=name)
            if control:
                guide = times[0] * (np.asarray(seqs) / seqs[0]) ** 2
                ax.plot(seqs, guide, color="grey", ls=":", lw=1, label="∝ N² from the control")
        _seq_axis(ax, {s for p in data[phase].values() for s, _ in p})
        ax.set_yscale("log")
        low = min(t for p in data[phase].values() for _, t in p)
        ax.set_ylim(bottom=low / 2)  # the clipped fits would otherwise stretch the axis down
        ax.set_title(f"{phase.replace('_', ' ')} (dashed: linear fit t = a + bN)")
        ax.set_ylabel("median time (s)")
        ax.legend(fontsize=7)
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
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, points in sorted(curves.items()):
        ax.plot(*zip(*sorted(points), strict=True), "o-", label=label)
    for limit in {r.threshold for r in records if r.metric == "long_range_grad_norm"} - {None}:
        ax.axhline(limit, color="crimson", ls=":", lw=1, label=f"minimum {limit:g}")
    ax.set_yscale("log")
    ax.set_xlabel("position t (middle of the bucket)")
    ax.set_ylabel("mean ‖∂L_last/∂h₀[t]‖")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def training(history) -> bytes | None:
    """history: {label: [{"step": int, "loss": float, "ppl"?: float, ...}, ...]} (the trainer's
    history.json), a path to it, or None."""
    if history is None:
        return None
    if isinstance(history, (str, Path)):
        history = json.loads(Path(history).read_text(encoding="utf-8"))
    keys = [k for k in ("loss", "val_loss", "ppl", "val_ppl")
            if any(k in row for rows in history.values() for row in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, rows in sorted(history.items()):
            points = [(row["step"], row[key]) for row in rows if key in row]
            if points:
                ax.plot(*zip(*points, strict=True), label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_yscale("log" if "ppl" in key else "linear")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def all_figures(records: list[Record], history=None) -> dict[str, bytes]:
    figures = {
        "memory": memory(records),
        "throughput": throughput(records),
        "scaling": scaling(records),
        "gradient": gradient(records),
        "training": training(history),
    }
    return {name: png for name, png in figures.items() if png is not None}
