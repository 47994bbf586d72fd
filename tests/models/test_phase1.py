"""Phase 1 specifics beyond the contract: matched baselines, the sublayers really present and
live, the long-range gradient at N = 1024, and HTT compression."""

import pytest
import torch

from muse import models
from muse.measure.gradient import gradient_flow
from muse.measure.phases import random_ids


def count(name, preset, **overrides):
    with torch.device("meta"):
        return models.build(name, preset, **overrides).num_params()


def test_htt_presets_compress_the_embedding():
    dense, htt = count("phase1", "dense"), count("phase1", "10gb")
    # the dense table alone is V·D = 25.7M; HTT at r = 16 keeps about 0.6% of it
    assert dense - htt > 0.99 * 50257 * 512 - 1e6


def test_every_block_changes_its_input_and_holds_all_three_sublayers():
    torch.manual_seed(0)
    m = models.build("phase1", "tiny", vocab_size=97).double().eval()
    ids = random_ids(97, 2, 33, "cpu")
    x = m.embed(ids)
    for block in m.blocks:
        assert block.mixer is not None and block.ssm is not None and block.ffn is not None
        y = block(x)
        assert (y - x).abs().max() > 1e-6  # no dead block
        x = y


def test_long_range_gradient_reaches_the_first_token_at_1024():
    torch.manual_seed(0)
    m = models.build("phase1", "tiny", vocab_size=97)
    flow = gradient_flow(m, random_ids(97, 1, 1024, "cpu"), torch.float32)
    assert flow.finite
    assert flow.buckets[0].max_grad_norm > 0 and flow.long_range_grad_norm > 0


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = models.build("phase1", "tiny", vocab_size=97).double()
    ckpt = models.build("phase1", "tiny", vocab_size=97, checkpointing=True).double()
    ckpt.load_state_dict(plain.state_dict())
    ids = random_ids(97, 2, 40, "cpu")
    for m in (plain, ckpt):
        m.train()
        m(ids).logsumexp(-1).sum().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12), n


def test_dense_head_is_untied_and_costs_v_times_d():
    tied = models.build("phase1:tiny", vocab_size=300)
    dense = models.build("phase1:tiny", vocab_size=300, head="dense")
    assert dense.num_params() - tied.num_params() == 300 * 64
    assert dense.output_table() is dense.head
    with pytest.raises(ValueError, match="head must be one of"):
        models.build("phase1:tiny", head="htt")


def test_local_window_adds_an_attention_sublayer_per_block():
    m = models.build("phase1:tiny", vocab_size=300, local_window=8, local_heads=2,
                     local_head_dim=16)
    base = models.build("phase1:tiny", vocab_size=300)
    # q, k, v and out projections (4 · 64 · 32) and a LayerNorm (2 · 64) in each of 2 blocks
    assert m.num_params() - base.num_params() == 2 * (4 * 64 * 32 + 2 * 64)
    with pytest.raises(ValueError, match="local_window must be an integer ≥ 0"):
        models.build("phase1:tiny", local_window=-1)
