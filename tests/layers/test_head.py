"""The padded tied head changes no logit beyond rounding."""

import torch
import torch.nn.functional as F

from muse.layers.head import tied_logits


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
