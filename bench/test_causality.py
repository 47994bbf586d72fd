"""Causality at every seq, on the run's device and dtype: the logits at positions ≤ t do not
move when every token after t is redrawn (t at the start, a third, the middle and the end),
beyond the change between two runs of the same ids. A kernel that reads ahead fails here."""

import pytest

from muse.harness.summary import describe
from muse.measure.causality import causal_probe
from muse.measure.phases import forward_fn

pytestmark = pytest.mark.gpu


def test_past_logits_ignore_future_tokens(case, record):
    if case.seq < 2:
        pytest.skip(f"seq {case.seq} has no future token to change")
    model = case.build()
    ids = case.ids(model)
    forward_fn(model, ids, case.torch_dtype)  # weights in --dtype, eval mode, as served
    probe = causal_probe(model, ids)
    rec = record(
        case,
        "future_token_leak",
        probe.leak,
        "1",
        threshold=probe.rerun_noise,
        comparison="<=",
        extra={"rerun_noise": probe.rerun_noise, "leak_by_t": probe.leaks},
    )
    assert rec.passed, describe(rec)
