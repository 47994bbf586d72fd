"""Gradient flow at the longest seq with the loss on the last token only: the first layer's
parameter gradient and the long-range gradient ‖∂ℓ_b/∂h₀[b, t]‖ (per sequence, at any --batch)
over the earliest positions are ≥ --min-grad, and nothing is NaN/Inf. The whole profile is
recorded."""

import pytest

from muse.harness.summary import describe
from muse.measure.gradient import gradient_flow

pytestmark = pytest.mark.gpu


def test_gradient_reaches_first_layer_and_first_tokens(longest_case, record, muse_settings):
    case, min_grad = longest_case, muse_settings.thresholds.min_grad
    model = case.build()
    flow = gradient_flow(model, case.ids(model), case.torch_dtype)
    for i, norm in enumerate(flow.layer_grad_norms):
        record(case, f"layer{i}_grad_norm", norm, "1")
    for b in flow.buckets:
        record(
            case,
            f"h0_grad_norm_t{b.start}_{b.stop}",
            b.mean_grad_norm,
            "1",
            extra={"start": b.start, "stop": b.stop, "max": b.max_grad_norm},
        )
    record(case, "embedding_grad_norm", flow.embedding_grad_norm, "1")
    verdicts = [
        record(
            case,
            "nonfinite_grad_tensors",
            len(flow.nonfinite_params) + (not flow.finite),
            "1",
            threshold=0,
            comparison="<=",
            extra={"params": flow.nonfinite_params},
        ),
        record(
            case,
            "first_layer_grad_norm",
            flow.first_layer_grad_norm,
            "1",
            threshold=min_grad,
            comparison=">=",
        ),
        record(
            case,
            "long_range_grad_norm",
            flow.long_range_grad_norm,
            "1",
            threshold=min_grad,
            comparison=">=",
            extra={
                "positions": [flow.buckets[0].start, flow.buckets[0].stop],
                "loss_scale": flow.loss_scale,
            },
        ),
    ]
    failed = [describe(r) for r in verdicts if not r.passed]
    assert not failed, "; ".join(failed)
