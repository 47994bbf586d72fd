"""The training-step memory measurement's parts that run anywhere: its optimizers and their
state's bytes, the weights' dtype, the recipe checks, and the step it times."""

import pytest
import torch

from muse import models
from muse.measure.phases import random_ids
from muse.measure.train_memory import (
    WEIGHTS,
    check_recipe,
    make_optimizer,
    measure_train_memory,
    optimizer_state_bytes,
    train_step_fn,
)


def _stepped(optimizer_name, weights="fp32"):
    torch.manual_seed(0)
    model = models.build("phase7", "tiny", vocab_size=97).to(WEIGHTS[weights])
    opt = make_optimizer(optimizer_name, model.parameters())
    ids = random_ids(97, 2, 32, "cpu")
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    loss = train_step_fn(model, ids, dtype, opt)()
    return model, opt, loss


def test_adamw_keeps_two_moments_per_weight_in_the_weights_dtype():
    for weights in WEIGHTS:
        model, opt, loss = _stepped("adamw", weights)
        assert torch.isfinite(loss)
        moments = sum(2 * p.numel() * p.element_size() for p in model.parameters())
        steps = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
        assert optimizer_state_bytes(opt) == moments + steps


def test_adafactor_state_is_far_smaller_than_adamw():
    _, adamw, _ = _stepped("adamw")
    _, adafactor, loss = _stepped("adafactor")
    assert torch.isfinite(loss)
    assert 0 < optimizer_state_bytes(adafactor) < 0.25 * optimizer_state_bytes(adamw)


def test_the_step_changes_every_weight_and_clears_the_gradients():
    torch.manual_seed(0)
    model = models.build("phase7", "tiny", vocab_size=97)
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer("adamw", model.parameters(), lr=1e-2)
    train_step_fn(model, random_ids(97, 2, 32, "cpu"), torch.float32, opt)()
    assert all(p.grad is None for p in model.parameters())
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert changed == len(before)


@pytest.mark.parametrize("weights, dtype, match", [
    ("fp16", torch.bfloat16, "unknown weights 'fp16'"),
    ("fp32", torch.float16, "loss scaling"),
    ("bf16", torch.float32, "--dtype must be bf16"),
])
def test_recipes_it_does_not_model_are_refused(weights, dtype, match):
    with pytest.raises(ValueError, match=match):
        check_recipe(weights, dtype)


def test_unknown_optimizer_names_the_valid_ones():
    with pytest.raises(ValueError, match="adamw, adafactor"):
        make_optimizer("lion", [torch.nn.Parameter(torch.zeros(2))])


def test_off_cuda_there_is_no_peak_to_read():
    model = models.build("phase7", "tiny", vocab_size=97)
    with pytest.raises(ValueError, match="CUDA caching allocator"):
        measure_train_memory(model, 16, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_on_cuda_the_peak_holds_weights_gradients_and_state(optimizer):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = models.build("phase7", "tiny", vocab_size=97, checkpointing=True)
    m = measure_train_memory(model, 256, optimizer=optimizer, device="cuda")
    assert m.peak_allocated_bytes >= m.weight_bytes + m.grad_bytes + m.optimizer_bytes
    assert m.fits(8)
