"""Phase 8's decayed linear attention on CUDA (the Hebbian chunk products and its Triton carry
scan, with the normaliser as a value column; and fla's simple-GLA kernel, where fla is
installed) against the float64 chunked form on the CPU."""

import pytest
import torch

from muse.layers.hebbian import fla_available
from muse.layers.linear_attention import decayed_linear_attention, elu_feature

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


# fla multiplies float32 in TF32 (~1e-3 of the norm, as in test_hebbian_cuda.py)
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("carried", [False, True], ids=["fresh", "carried"])
@pytest.mark.parametrize("path", ["torch", "fla"])
def test_cuda_path_matches_float64_with_gradients(dtype, bound, carried, path):
    if path == "fla" and not fla_available():
        pytest.skip("needs flash-linear-attention (pip install -e \".[fla]\")")
    if path == "fla" and dtype == torch.float32:
        bound = 5e-3
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
    y, final = decayed_linear_attention(*cuda, state=state, chunk=64, backend=path)
    try:
        (y.float() * grad_y).sum().backward()
    except RuntimeError as exc:  # fla 0.6's backward on Hopper with Triton < 3.7.1 (fla #640)
        if path != "fla" or "#640" not in str(exc):
            raise
        pytest.skip(f"fla refuses its backward here: {str(exc)[:160]}")
    want, want_final = decayed_linear_attention(*ref, state=ref_state, chunk=64)
    for got, expect in zip(final, want_final, strict=True):
        err = float((got.detach().cpu().double() - expect).norm() / expect.norm())
        assert err < bound, f"final state: relative error {err:.2e} (bound {bound:.0e})"
    (want * grad_y.cpu().double()).sum().backward()
    grads = [(a.grad, r.grad, f"grad {i}") for i, (a, r) in enumerate(zip(cuda, ref, strict=True))]
    for got, expect, what in [(y, want, "y"), *grads]:
        err = float((got.detach().cpu().double() - expect).norm() / expect.norm())
        assert err < bound, f"{what}: relative error {err:.2e} (bound {bound:.0e})"
