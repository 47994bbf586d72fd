"""Sliding-window attention: the blocked O(N·w) form against the N×N definition in float64."""

import pytest
import torch

from muse.layers.local_attention import (
    local_attention,
    local_attention_naive,
    rotary_local_attention,
)


def qkv(n, seed=0, b=2, h=3, d=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("n", [1, 5, 16, 17, 50])
@pytest.mark.parametrize("window", [1, 3, 8, 16, 64])
def test_blocked_form_equals_the_definition(n, window):
    q, k, v = qkv(n, seed=n * 100 + window)
    # float64 softmax over ≤ 64 keys: agreement to ~1e-15
    assert torch.allclose(local_attention(q, k, v, window), local_attention_naive(q, k, v, window),
                          rtol=1e-12, atol=1e-12)


def test_a_window_as_long_as_the_sequence_is_causal_attention():
    q, k, v = qkv(20)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(local_attention(q, k, v, 20), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [1, 4, 8])
@pytest.mark.parametrize("cuts", [(3,), (3, 20, 21), (7, 8, 9, 10)])
def test_segments_with_the_carried_keys_equal_one_run(window, cuts):
    q, k, v = qkv(40, seed=window)
    whole, _ = rotary_local_attention(q, k, v, window, 10000.0)
    past, parts = None, []
    for a, b in zip((0, *cuts), (*cuts, 40), strict=True):
        y, past = rotary_local_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], window,
                                         10000.0, past)
        assert past[0].shape[2] == min(window - 1, b)
        parts.append(y)
    assert torch.allclose(torch.cat(parts, dim=2), whole, rtol=1e-12, atol=1e-12)


def test_future_tokens_do_not_change_the_past():
    q, k, v = qkv(30)
    y, _ = rotary_local_attention(q, k, v, 8, 10000.0)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] += 1.0
    v2[:, :, 20:] -= 1.0
    y2, _ = rotary_local_attention(q, k2, v2, 8, 10000.0)
    assert torch.equal(y[:, :, :20], y2[:, :, :20])


def test_bad_window_and_too_long_a_past_are_refused():
    q, k, v = qkv(4)
    with pytest.raises(ValueError, match="window must be ≥ 1, got 0"):
        local_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="at most window − 1 = 2 past tokens, got 3"):
        local_attention(q, torch.cat((k[:, :, :3], k), 2), torch.cat((v[:, :, :3], v), 2), 3,
                        past=3)
