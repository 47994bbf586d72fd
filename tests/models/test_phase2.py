"""Phase 2 specifics beyond the contract."""

import pytest
import torch

from muse import models
from muse.measure.phases import random_ids


def test_bk_zero_out_starts_as_the_model_without_bk_and_still_learns_it():
    torch.manual_seed(0)
    m = models.build("phase2", "tiny", vocab_size=97, bk_zero_out=True, init="gpt2").double()
    ids = random_ids(97, 2, 33, "cpu")
    x = m.embed(ids)
    block = m.blocks[0]
    assert torch.equal(block.bk(block.ln_bk(x)), torch.zeros_like(x))
    m(ids).sum().backward()
    # the zero projection gets a gradient, so training moves BK off zero
    assert block.bk.out.weight.grad.abs().max() > 0


def test_bk_options_need_the_bk_sublayer():
    models.build("phase2", "tiny", bk_mixer=False)
    with pytest.raises(ValueError, match="bk_zero_out"):
        models.build("phase2", "tiny", bk_zero_out=False, bk_mixer=False)


def test_plain_heads_are_fewer_than_the_heads_of_a_delta_rule_block():
    with pytest.raises(ValueError, match="hebbian_plain_heads must be < n_heads = 2"):
        models.build("phase2", "tiny", vocab_size=97, hebbian_plain_heads=2)
    # the presets' plain head stands with the delta rule off too: every head is plain then
    models.build("phase2", "tiny", vocab_size=97, hebbian_delta=False)


def test_hebbian_recompute_trains_as_the_default_block():
    # the same weights with and without the delta rule's recompute: the loss and every
    # gradient bit for bit (float64)
    ids = random_ids(97, 2, 40, "cpu")
    runs = []
    for recompute in (False, True):
        torch.manual_seed(0)
        m = models.build("phase2", "tiny", vocab_size=97, hebbian_recompute=recompute).double()
        assert all(b.hebbian.recompute == recompute for b in m.blocks)
        loss = m(ids, loss_chunk=16)
        loss.backward()
        runs.append([loss] + [p.grad for p in m.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
