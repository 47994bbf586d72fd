"""The delta rule's chunked form on CUDA in float32 — its chunk pass by the Triton kernels
(muse.ops.delta_states) or by the two-level walk (muse.ops.affine_walk) — against the same form
in float64 on the CPU: outputs, the final state and every gradient."""

import pytest
import torch

from .test_delta_rule import inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("n", [63, 1000, 4096])
@pytest.mark.parametrize("carried", [False, True], ids=["fresh", "carried"])
@pytest.mark.parametrize("states", ["triton", "torch"])
def test_cuda_path_matches_float64(n, carried, states, monkeypatch):
    """TF32 off, as the CPU reference multiplies: 1e-4 of the norm (float32 through a
    triangular solve per chunk)."""
    from muse.ops import delta_rule

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    walked = []
    real = delta_rule.affine_walk
    monkeypatch.setattr(delta_rule, "affine_walk",
                        lambda *a, **k: walked.append(a[0].device.type) or real(*a, **k))
    args = inputs(n, seed=n, b=2, h=4, dk=64, dv=64)
    state = torch.randn(2, 4, 64, 64, dtype=torch.float64) / 8 if carried else None
    ups = (torch.randn(2, 4, n, 64, dtype=torch.float64),
           torch.randn(2, 4, 64, 64, dtype=torch.float64))
    runs = []
    for device, dtype in (("cpu", torch.float64), ("cuda", torch.float32)):
        leaves = [t.detach().to(device, dtype).requires_grad_() for t in args]
        s0 = None if state is None else state.detach().to(device, dtype).requires_grad_()
        y, w = delta_rule.delta_rule_chunked(*leaves, state=s0, chunk=64,
                                             states=states if device == "cuda" else "torch")
        ((y * ups[0].to(device, dtype)).sum() + (w * ups[1].to(device, dtype)).sum()).backward()
        runs.append([y, w, *(t.grad for t in leaves), *([] if s0 is None else [s0.grad])])
    if states == "torch":
        assert walked and set(walked) == {"cuda"}, "the CUDA run did not take the two-level walk"
    else:
        assert not walked, "the Triton run took the PyTorch walk"
    for got, want in zip(runs[1], runs[0], strict=True):
        err = float((got.detach().cpu().double() - want.detach()).norm() / want.detach().norm())
        assert err < 1e-4, err
