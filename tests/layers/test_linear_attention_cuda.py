"""Phase 8's decayed linear attention on CUDA (the Hebbian chunk products and its Triton carry
scan, with the normaliser as a value column) against the float64 chunked form on the CPU."""

import pytest
import torch

from muse.layers.linear_attention import decayed_linear_attention, elu_feature

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("carried", [False, True], ids=["fresh", "carried"])
def test_cuda_path_matches_float64_with_gradients(dtype, bound, carried):
    g = torch.Generator("cuda").manual_seed(0)
    b, h, n, d = 2, 4, 300, 64
    q, k = (elu_feature(torch.randn(b, h, n, d, device="cuda", generator=g)) for _ in range(2))
    v = torch.randn(b, h, n, d, device="cuda", generator=g)
    log_decay = -torch.rand(b, h, n, device="cuda", generator=g) * 0.05
    state = ((torch.rand(b, h, d, d, device="cuda", generator=g),
              torch.rand(b, h, d, device="cuda", generator=g) + 1) if carried else None)
    leaves = [q, k, v, log_decay]
    cuda = [t.to(dtype).requires_grad_() if i < 3 else t.clone().requires_grad_()
            for i, t in enumerate(leaves)]
    ref = [t.detach().cpu().double().requires_grad_() for t in cuda]
    ref_state = None if state is None else tuple(s.cpu().double() for s in state)
    grad_y = torch.randn(b, h, n, d, device="cuda", generator=g)
    y, _ = decayed_linear_attention(*cuda, state=state, chunk=64)
    (y.float() * grad_y).sum().backward()
    want, _ = decayed_linear_attention(*ref, state=ref_state, chunk=64)
    (want * grad_y.cpu().double()).sum().backward()
    for got, expect, what in [(y, want, "y"), *((a.grad, r.grad, f"grad {i}")
                                               for i, (a, r) in enumerate(zip(cuda, ref)))]:
        err = float((got.detach().cpu().double() - expect).norm() / expect.norm())
        assert err < bound, f"{what}: relative error {err:.2e} (bound {bound:.0e})"
