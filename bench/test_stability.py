"""Stability at every seq: the forward in --dtype is finite, the full next-token loss and every
gradient are finite, and each block's gradient norm lies in [1e-6, 1e3]."""

import pytest
import torch

from muse.harness.summary import describe
from muse.measure.gradient import backward_probe, layer_grad_norms
from muse.measure.phases import lm_loss

pytestmark = pytest.mark.gpu


def test_finite_forward_and_backward(case, record, muse_settings):
    t = muse_settings.thresholds
    model = case.build()
    ids = case.ids(model)
    model.to(case.torch_dtype).eval()
    with torch.inference_mode():
        nonfinite_logits = int((~model(ids).isfinite()).sum())
    probe = backward_probe(model, ids, case.torch_dtype, lm_loss)
    norms = layer_grad_norms(model)
    verdicts = [
        record(case, "nonfinite_logits", nonfinite_logits, "1", threshold=0, comparison="<="),
        record(
            case,
            "nonfinite_grad_tensors",
            len(probe.nonfinite_params) + (not probe.finite),
            "1",
            threshold=0,
            comparison="<=",
            extra={"params": probe.nonfinite_params, "loss": probe.loss},
        ),
        record(
            case,
            "min_layer_grad_norm",
            min(norms),
            "1",
            threshold=t.min_layer_grad,
            comparison=">=",
            extra={"layer_grad_norms": norms},
        ),
        record(case, "max_layer_grad_norm", max(norms), "1", threshold=t.max_grad, comparison="<="),
    ]
    failed = [describe(r) for r in verdicts if not r.passed]
    assert not failed, "; ".join(failed)
