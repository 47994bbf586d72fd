"""Sliding-window attention on CUDA (SDPA's masked kernels) against the float64 definition."""

import pytest
import torch

from muse.layers.local_attention import local_attention, local_attention_naive

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_forward_and_backward_match_float64(dtype, tol):
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1000, 64, device="cuda", generator=g) for _ in range(3))
    grad = torch.randn(2, 4, 1000, 64, device="cuda", generator=g)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    y_ref = local_attention_naive(*ref, 128)
    (y_ref * grad.double()).sum().backward()
    got = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    y = local_attention(*got, 128)
    (y.float() * grad).sum().backward()
    # bf16 keeps 8 bits of mantissa: outputs of unit size agree to a few 1e-2 at worst
    assert (y.double() - y_ref).abs().max() < tol
    for a, b in zip(got, ref, strict=True):
        assert (a.grad.double() - b.grad).abs().max() < tol * 10
