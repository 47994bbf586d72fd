"""HTT embedding (`muse/layers/htt.py`): parameter count, the formula against a naive per-token
float64 implementation, gather against the full table, no collisions, gradients, id checks."""

from __future__ import annotations

import math

import pytest
import torch

from muse.layers.htt import HTTEmbedding, htt_param_count

SHAPES = [(1, 1, 1), (2, 3, 1), (10, 7, 2), (97, 33, 4), (1000, 64, 8), (50257, 512, 16)]


def naive_row(emb: HTTEmbedding, token: int) -> torch.Tensor:
    """E[id] straight from the formula, one token, with explicit outer products."""
    v1 = math.ceil(math.sqrt(emb.vocab_size))
    v2 = math.ceil(emb.vocab_size / v1)
    i1, i2 = token // v2, token % v2
    row = torch.zeros(emb.d1 * emb.d2, dtype=torch.float64)
    for rho in range(emb.rank):
        a = emb.core1[i1, rho].double()
        b = emb.core2[i2, rho].double()
        a, b = a / a.norm(), b / b.norm()
        row += torch.cos(emb.theta[rho].double()) * torch.outer(a, b).flatten()
    return row[: emb.d_model] / math.sqrt(emb.rank)


@pytest.mark.parametrize("vocab,dim,rank", SHAPES, ids=lambda s: str(s))
def test_param_count_formula_and_real_count(vocab, dim, rank):
    v1, d1 = math.ceil(math.sqrt(vocab)), math.ceil(math.sqrt(dim))
    v2, d2 = math.ceil(vocab / v1), math.ceil(dim / d1)
    assert v1 * v2 >= vocab and d1 * d2 >= dim
    expected = v1 * rank * d1 + v2 * rank * d2 + rank
    assert htt_param_count(vocab, dim, rank) == expected
    emb = HTTEmbedding(vocab_size=vocab, d_model=dim, rank=rank)
    assert emb.num_params() == expected == sum(p.numel() for p in emb.parameters())


def test_compression_at_gpt2_vocab():
    ratio = htt_param_count(50257, 512, 16) / (50257 * 512)
    assert ratio < 0.01, ratio


@pytest.mark.parametrize("vocab,dim,rank", [(97, 33, 4), (1000, 64, 8), (50, 10, 1)])
def test_forward_matches_naive_float64(vocab, dim, rank):
    torch.manual_seed(0)
    emb = HTTEmbedding(vocab_size=vocab, d_model=dim, rank=rank).double()
    ids = torch.randint(0, vocab, (3, 11))
    ids[0, 0], ids[0, 1] = 0, vocab - 1
    out = emb(ids)
    assert out.shape == (3, 11, dim) and out.dtype == torch.float64
    expected = torch.stack([naive_row(emb, int(t)) for t in ids.flatten()]).view(3, 11, dim)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("vocab,dim,rank", [(97, 33, 4), (1000, 64, 8), (50257, 512, 16)])
def test_forward_equals_full_table_rows(vocab, dim, rank):
    torch.manual_seed(1)
    emb = HTTEmbedding(vocab_size=vocab, d_model=dim, rank=rank)
    table = emb.full_table()
    assert table.shape == (vocab, dim)
    ids = torch.randint(0, vocab, (2, 64))
    ids[0, 0], ids[0, 1] = 0, vocab - 1
    torch.testing.assert_close(emb(ids), table[ids], rtol=1e-5, atol=1e-7)


def test_row_scale_at_init():
    """Per-entry RMS ≈ RMS(cos θ)/√(d1·d2) ≈ 0.031 at D = 512, GPT-2's embedding scale (0.02)."""
    torch.manual_seed(2)
    emb = HTTEmbedding(vocab_size=50257, d_model=512, rank=16)
    rms = emb.full_table().pow(2).mean(dim=1).sqrt()
    assert torch.isfinite(rms).all()
    assert 0.02 < rms.min() and rms.max() < 0.045, (rms.min(), rms.max())


def test_no_collisions_within_factor_rows_and_columns():
    """Ids sharing i1 (same core-1 slice) or sharing i2 (same core-2 slice) stay distinct."""
    torch.manual_seed(3)
    emb = HTTEmbedding(vocab_size=1000, d_model=64, rank=8).double()
    v2 = emb.v2
    same_i1 = torch.arange(5 * v2, 6 * v2)  # i1 = 5, every i2
    same_i2 = torch.arange(3, 1000, v2)  # i2 = 3, every i1
    sample = torch.randint(0, 1000, (200,))
    for ids in (same_i1, same_i2, sample.unique()):
        rows = emb(ids[None])[0]
        dist = torch.cdist(rows, rows) + torch.eye(len(ids), dtype=rows.dtype)
        assert dist.min() > 1e-3, dist.min()


def test_gradient_reaches_every_core_and_theta():
    torch.manual_seed(4)
    emb = HTTEmbedding(vocab_size=97, d_model=33, rank=4)
    ids = torch.randint(0, 97, (2, 16))
    (emb(ids) * torch.randn(2, 16, 33)).sum().backward()
    for name, p in emb.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name
    # Only gathered slices receive gradient.
    used1 = torch.zeros(emb.v1, dtype=torch.bool)
    used1[ids.flatten() // emb.v2] = True
    assert (emb.core1.grad[~used1] == 0).all()


def test_tied_head_gradient_through_full_table():
    torch.manual_seed(5)
    emb = HTTEmbedding(vocab_size=97, d_model=33, rank=4)
    h = torch.randn(2, 5, 33)
    (h @ emb.full_table().T).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in emb.parameters())


@pytest.mark.parametrize("bad", [97, 98, 10**6, -1])
def test_out_of_range_ids_raise(bad):
    emb = HTTEmbedding(vocab_size=97, d_model=8, rank=2)
    ids = torch.zeros(1, 4, dtype=torch.long)
    ids[0, 2] = bad
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        emb(ids)


def test_float_ids_raise():
    emb = HTTEmbedding(vocab_size=97, d_model=8, rank=2)
    with pytest.raises(TypeError):
        emb(torch.zeros(1, 4))


def test_constructor_is_keyword_only():
    with pytest.raises(TypeError):
        HTTEmbedding(97, 8, 2)  # type: ignore[misc]
