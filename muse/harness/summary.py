"""The terminal summary: one row per verdict, criterion × model × seq → status and number."""

from __future__ import annotations

import math

from muse.harness.results import Record

VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE", "OOM", "ERROR")


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if unit == "bytes":  # SI gigabytes, the unit of --vram-limit-gb; a small state in megabytes
        return f"{value / 1e6:.4g} MB" if abs(value) < 1e7 else f"{value / 1e9:.3f} GB"
    if unit == "s":
        return f"{value * 1e3:.3f} ms"
    if unit == "tokens/s":
        return f"{value:,.0f} tok/s"
    if unit in ("1", ""):
        return f"{value:.4g}"
    return f"{value:.4g} {unit}"


def describe(record: Record) -> str:
    text = f"{record.metric} = {format_value(record.value, record.unit)}"
    if record.threshold is not None:
        text += f" (needs {record.comparison} {format_value(record.threshold, record.unit)})"
    return f"{text}: {record.status}"


def summary_rows(records: list[Record]) -> list[tuple[str, ...]]:
    rows = []
    for r in records:
        if r.status not in VERDICTS and not r.extra.get("summary"):
            continue
        limit = "" if r.threshold is None else f"{r.comparison} {format_value(r.threshold, r.unit)}"
        rows.append(
            (
                r.criterion,
                f"{r.model}:{r.preset}",
                "all" if r.seq is None else str(r.seq),
                r.metric,
                format_value(r.value, r.unit),
                limit,
                r.status,
            )
        )
    return rows


def summary_table(records: list[Record]) -> list[str]:
    header = ("criterion", "model", "seq", "metric", "value", "threshold", "result")
    rows = summary_rows(records)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines
