"""The regression gate between two results files, for what pytest-benchmark cannot compare (it
compares time only): memory, tokens/s, perplexity. Records are matched by (criterion, case_id,
metric, seq): seq too, because a scaling case records one time per seq under one case_id.

Perplexity is gated on the perplexity gate's own metric, ppl_degradation = PPL_model /
PPL_baseline − 1, through the ratio it stands for: `ppl:2%` fails when 1 + degradation rises by
more than 2 %. Files that share no case, or gates with nothing to gate, are a user's mistake;
runs on other GPUs, dtypes or batch sizes are compared with a warning."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from muse.errors import MuseError
from muse.harness.results import Record
from muse.harness.summary import format_value


def _relative(a: float, b: float) -> float:
    if a == 0:
        return 0.0 if b == 0 else math.copysign(math.inf, b)
    return b / a - 1


def _ratio_of_degradations(a: float, b: float) -> float:
    # A degradation sits near 0, where its own relative change means nothing; the PPL ratio
    # 1 + degradation does not.
    return _relative(1 + a, 1 + b)


@dataclass(frozen=True)
class Kind:
    worse: int  # +1: a rise is a regression; -1: a fall is
    selects: Callable[[Record], bool]
    what: str  # the records it gates, for messages
    change: Callable[[float, float], float] = _relative


KINDS = {
    "vram": Kind(+1, lambda r: r.unit == "bytes", "bytes"),
    "tokens_per_s": Kind(-1, lambda r: r.unit == "tokens/s", "tokens/s"),
    # Not the PPLs themselves: the untrained control's PPL is recorded too, and a model's PPL
    # moves with the recipe; the gate's metric is the one a regression is about.
    "ppl": Kind(+1, lambda r: r.metric == "ppl_degradation", "ppl_degradation",
                _ratio_of_degradations),
}
SPEC = re.compile(r"^(?P<kind>[a-z_]+):(?P<pct>[+-]?\d+(?:\.\d+)?)%$")


@dataclass(frozen=True)
class Gate:
    kind: str
    tolerance: float  # a fraction, ≥ 0: the change allowed in the bad direction

    def __str__(self) -> str:
        sign = "+" if KINDS[self.kind].worse > 0 else "-"
        return f"{self.kind} {sign}{self.tolerance * 100:g}%"


def parse_gate(text: str) -> Gate:
    """argparse type for --fail KIND:PCT%, e.g. vram:5% or tokens_per_s:-5%: a sign, when given,
    must point the way the kind gets worse (up for vram and ppl, down for tokens/s)."""
    m = SPEC.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KIND:PERCENT%, e.g. vram:5% (kinds: {', '.join(KINDS)})")
    kind, pct = m["kind"], float(m["pct"])
    if kind not in KINDS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown kind {kind!r}, expected one of {', '.join(KINDS)}")
    explicit = m["pct"][0] in "+-"
    if explicit and pct != 0 and math.copysign(1, pct) != KINDS[kind].worse:
        way = "rises" if KINDS[kind].worse > 0 else "falls"
        raise argparse.ArgumentTypeError(
            f"{text!r}: {kind} regresses when it {way}; "
            f"write {kind}:{'+' if KINDS[kind].worse > 0 else '-'}{abs(pct):g}%")
    return Gate(kind, abs(pct) / 100)


def key(r: Record) -> tuple:
    return (r.criterion, r.case_id or f"{r.model}:{r.preset}", r.metric, r.seq)


@dataclass
class Delta:
    key: tuple
    gate: Gate | None
    old: Record | None
    new: Record | None

    @property
    def change(self) -> float | None:
        """Relative change new/old − 1 (of 1 + degradation for ppl); None when either side has
        no finite value."""
        a = self.old.value if self.old else None
        b = self.new.value if self.new else None
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            return None
        kind = next((k for k in KINDS.values() if k.selects(self.old or self.new)), None)
        return (kind.change if kind else _relative)(a, b)

    @property
    def regressed(self) -> bool:
        if self.gate is None:
            return False
        if self.change is None:
            # A measurement that vanished or turned non-finite is the worst regression there is.
            return self.old is not None and self.old.value is not None \
                and math.isfinite(self.old.value)
        return KINDS[self.gate.kind].worse * self.change > self.gate.tolerance

    @property
    def verdict(self) -> str:
        if self.regressed:
            return "REGRESSION"
        return "ok" if self.gate else ""


def compare(old: list[Record], new: list[Record], gates: list[Gate]) -> list[Delta]:
    """One Delta per record of a gated kind (every vram, tokens/s and ppl record when no gate is
    given, reported without a verdict), in the order of the old file, new-only records last."""
    by_new = {key(r): r for r in new}
    by_old = {key(r): r for r in old}
    out = []
    for k in [*by_old, *(k for k in by_new if k not in by_old)]:
        ref = by_old.get(k) or by_new[k]
        if ref.metric == "run":
            continue  # an OOM/error marker, not a measurement
        if gates:
            matched = [g for g in gates if KINDS[g.kind].selects(ref)]
            if matched:
                gate = min(matched, key=lambda g: g.tolerance)
                out.append(Delta(k, gate, by_old.get(k), by_new.get(k)))
        elif any(kind.selects(ref) for kind in KINDS.values()):
            out.append(Delta(k, None, by_old.get(k), by_new.get(k)))
    return out


def _describe_run(records: list[Record]) -> str:
    criteria = sorted({r.criterion for r in records})
    cases = sorted({r.case_id or f"{r.model}:{r.preset}" for r in records})
    shown = ", ".join(cases[:3]) + (f" and {len(cases) - 3} more" if len(cases) > 3 else "")
    return f"{', '.join(criteria) or 'no criterion'} on {shown or 'no case'}"


def check(old_doc: dict, new_doc: dict, gates: list[Gate]) -> list[str]:
    """Raises MuseError when the two runs have nothing to compare: no case in common, or no
    record of any gate's kind. Returns warnings: a gate with nothing to gate, and GPUs, dtypes
    or batch sizes that differ."""
    old = [r for r in old_doc["records"] if r.metric != "run"]
    new = [r for r in new_doc["records"] if r.metric != "run"]
    if not {key(r) for r in old} & {key(r) for r in new}:
        raise MuseError(
            f"the two results files share no case: nothing to compare (old: "
            f"{_describe_run(old)}; new: {_describe_run(new)}); compare runs of the same "
            "criteria, models, seqs and dtype"
        )
    warnings = []
    empty = [g for g in gates if not any(KINDS[g.kind].selects(r) for r in [*old, *new])]
    for g in empty:
        warnings.append(f"--fail {g.kind}: neither file has a {KINDS[g.kind].what} record; "
                        "not gated")
    if gates and len(empty) == len(gates):
        raise MuseError("; ".join(w.removesuffix("; not gated") for w in warnings)
                        + ": nothing to gate")

    def gpus(doc):
        return ", ".join(doc.get("environment", {}).get("gpu_names") or ["no GPU"])

    if gpus(old_doc) != gpus(new_doc):
        warnings.append(f"GPUs differ: {gpus(old_doc)} (old) against {gpus(new_doc)} (new)")
    for field, name in (("dtype", "dtypes"), ("batch", "batch sizes")):
        a, b = ({getattr(r, field) for r in rs} - {None} for rs in (old, new))
        if a != b:
            warnings.append(f"{name} differ: {', '.join(map(str, sorted(a)))} (old) against "
                            f"{', '.join(map(str, sorted(b)))} (new)")
    return warnings


def table(deltas: list[Delta]) -> list[str]:
    header = ("criterion", "case", "seq", "metric", "old", "new", "change", "gate", "result")
    rows = []
    for d in deltas:
        criterion, case, metric, seq = d.key
        unit = (d.old or d.new).unit
        change = d.change
        rows.append((
            criterion, case, "" if seq is None else str(seq), metric,
            format_value(d.old.value, unit) if d.old else "absent",
            format_value(d.new.value, unit) if d.new else "absent",
            "" if change is None else f"{change:+.1%}",
            str(d.gate) if d.gate else "", d.verdict,
        ))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines
