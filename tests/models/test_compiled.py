"""A training step under torch.compile (inductor, the backend `pytest bench --compile` uses)
computes what the eager step computes: the loss and every parameter's gradient, float32 on the
CPU, to 1e-4 of each gradient's norm (inductor reorders float32 sums). Only the families with
the sliding window: its overlapping unfold had a backward inductor got wrong (pytorch #172064)."""

import shutil

import pytest
import torch

from muse import models

pytestmark = [
    pytest.mark.slow,  # inductor compiles C++ kernels for each model
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                       reason="inductor on the CPU needs a C++ compiler (c++ or g++)"),
]


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, loss_chunk=32)
    loss.backward()
    return loss.detach(), {name.removeprefix("_orig_mod."): p.grad.clone()
                           for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["phase3", "phase8"])
def test_the_compiled_step_has_the_eager_gradients(family):
    torch.manual_seed(0)
    model = models.build(family, "tiny", vocab_size=97)
    ids = torch.randint(0, 97, (2, 64))
    loss, grads = loss_and_grads(model, ids)
    got_loss, got = loss_and_grads(torch.compile(model, dynamic=False), ids)
    assert torch.allclose(got_loss, loss, rtol=1e-5, atol=0)
    assert got.keys() == grads.keys()
    errors = {n: float((got[n] - g).norm() / g.norm()) for n, g in grads.items() if g.norm() > 0}
    assert max(errors.values()) < 1e-4, max(errors.items(), key=lambda kv: kv[1])
