"""The padded tied head changes no logit beyond rounding; the chunked next-token loss equals the
loss of the full logits, with its gradients, in float64."""

import pytest
import torch
import torch.nn.functional as F

from muse.layers.head import chunked_next_token_loss, tied_logits


def test_padded_head_equals_the_plain_product_in_float64():
    g = torch.Generator().manual_seed(0)
    for vocab in (1, 63, 64, 65, 50257):
        table = torch.randn(vocab, 8, generator=g, dtype=torch.float64)
        h = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
        out = tied_logits(h, table)
        assert out.shape == (2, 3, vocab)
        # the padded product may block the sum differently: equal to float64 rounding
        assert torch.allclose(out, F.linear(h, table), rtol=1e-13, atol=1e-13)


def test_gradient_reaches_the_table():
    table = torch.randn(65, 4, dtype=torch.float64, requires_grad=True)
    tied_logits(torch.randn(1, 2, 4, dtype=torch.float64), table).sum().backward()
    assert table.grad.shape == (65, 4) and table.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk", [1, 7, 29, 1000])
def test_the_chunked_loss_and_its_gradients_equal_the_full_logits_loss(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 15, 8, dtype=torch.float64, generator=g, requires_grad=True)
    table = torch.randn(70, 8, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 70, (2, 15), generator=g)
    full = F.cross_entropy(tied_logits(h, table)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    chunked = chunked_next_token_loss(h, table, ids, chunk)
    assert torch.allclose(chunked, full, rtol=1e-12, atol=0)
    want = torch.autograd.grad(full, (h, table))
    got = torch.autograd.grad(chunked, (h, table))
    for a, b in zip(want, got, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True])
def test_a_chunk_that_is_not_a_positive_integer_is_refused(chunk):
    with pytest.raises(ValueError, match="loss chunk must be an integer ≥ 1"):
        chunked_next_token_loss(torch.zeros(1, 3, 4), torch.zeros(5, 4),
                                torch.zeros(1, 3, dtype=torch.long), chunk)
