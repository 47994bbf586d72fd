"""Equal-budget perplexity: each --model against the `transformer` of matched size, both trained
here with one recipe (--corpus, --tokenizer, --train-tokens, --train-seq, --train-batch,
--train-lr or --lr-sweep, --train-dtype, --seeds) or both loaded from --checkpoint NAME=PATH, then
scored on the test split with sliding windows (--ppl-context, --ppl-stride). Passes when the mean
over seeds of PPL_model / PPL_baseline − 1 is < --max-ppl-degradation. The harness checks itself:
an untrained copy of the model must fail that gate against the trained baseline
(muse.training.quality). Recorded beside the gate: PPL and degradation on recall tokens and on
the rest, the chosen learning rates, each side's training budget, and with --also-corpus the
same checkpoints' PPL and degradation on other corpora's test splits."""

import statistics
from dataclasses import replace

import pytest

from muse.harness.summary import describe

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_perplexity_within_budget_of_matched_transformer(
    model_case, record, muse_settings, quality_runs
):
    limit = muse_settings.thresholds.max_ppl_degradation
    quality = muse_settings.quality
    cmp = quality_runs.compare(model_case.spec)
    common = {**quality_runs.facts(), "baseline": cmp.baseline}
    # the records carry the gate's own precision and batch (--train-dtype, --train-batch)
    case = replace(model_case, dtype=quality.dtype, batch=quality.batch_size)

    def put(metric, value, unit="1", **kw):
        kw["extra"] = {**common, **kw.get("extra", {})}
        return record(case, metric, value, unit, seq=quality.eval_context, **kw)

    model, base = cmp.side("model"), cmp.side("baseline")
    put("ppl", model["ppl"], extra={**model, "summary": True})
    put("baseline_ppl", base["ppl"], extra={**base, "summary": True})
    gate = put("ppl_degradation", cmp.degradation, threshold=limit, comparison="<",
               extra={**cmp.gate_facts(), "summary": True})
    put("bits_per_byte", model["bits_per_byte"])
    put("baseline_bits_per_byte", base["bits_per_byte"])
    for part in ("recall", "other"):
        put(f"ppl_{part}", model[f"ppl_{part}"])
        put(f"baseline_ppl_{part}", base[f"ppl_{part}"])
        put(f"ppl_degradation_{part}", cmp.part_degradation(part), extra={
            "summary": True, "per_seed": dict(zip(map(str, cmp.seeds),
                                                  cmp.part_degradations(part), strict=True))})
    for corpus in cmp.also:  # the same checkpoints on other corpora (--also-corpus)
        there, base_there = cmp.also_side(corpus, "model"), cmp.also_side(corpus, "baseline")
        put(f"ppl@{corpus}", there["ppl"])
        put(f"baseline_ppl@{corpus}", base_there["ppl"])
        put(f"bits_per_byte@{corpus}", there["bits_per_byte"])
        put(f"ppl_degradation@{corpus}", statistics.fmean(cmp.also_degradations(corpus)),
            extra={"summary": True, "per_seed": dict(zip(
                map(str, cmp.seeds), cmp.also_degradations(corpus), strict=True))})
    # the same for both sides: it depends only on the test text and the windows
    put("recall_fraction", model["recall_fraction"])
    for prefix, side in (("", model), ("baseline_", base)):
        lr_facts = {k: side[k] for k in ("lr_per_seed", "lr_tried", "lr_valid_loss", "lr_at_edge")}
        put(f"{prefix}lr", side["lr"], extra=lr_facts)
        put(f"{prefix}train_budget_tokens", side["budget_tokens"], "tokens", extra={
            "rates": len(side["lr_tried"]), "seeds": len(cmp.seeds)})
    put("control_ppl", cmp.control.ppl, extra=cmp.control.facts())
    control = put("control_degradation", cmp.control_degradation, threshold=limit,
                  comparison=">=", extra={"summary": True, "seed": cmp.control.seed})
    if not control.passed:
        pytest.fail(
            f"the negative control passed the gate: an untrained {model_case.spec} scores PPL "
            f"{cmp.control.ppl:.4g} against the trained {cmp.baseline}'s "
            f"{cmp.control_baseline.ppl:.4g} (seed {cmp.control.seed}; {describe(control)}), "
            "so the gate cannot tell training from none and the harness itself is broken",
            pytrace=False,
        )
    assert gate.passed, describe(gate)
