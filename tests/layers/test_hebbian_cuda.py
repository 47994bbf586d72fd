"""flash-linear-attention's kernel against the float64 chunked form (CUDA with fla only)."""

import pytest
import torch

from muse.layers.hebbian import DissipativeHebbian, fla_available, hebbian_chunked, hebbian_fla

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and fla_available()),
        reason="needs CUDA and flash-linear-attention",
    ),
]


@pytest.mark.parametrize("n", [63, 1000, 4096])
def test_fla_matches_the_float64_reference_with_gradients(n):
    g = torch.Generator("cuda").manual_seed(n)
    b, h, d = 2, 4, 64
    q, k, v = (torch.randn(b, n, h, d, device="cuda", generator=g) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    log_decay = -torch.rand(b, n, h, device="cuda", generator=g) * 0.05
    state = torch.randn(b, h, d, d, device="cuda", generator=g) * 0.1
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_decay, state)]
    y, w = hebbian_fla(*leaves[:4], eta=0.5, state=leaves[4])
    grad_y = torch.randn_like(y)
    (y * grad_y).sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, log_decay, state)]
    heads_first = [t.transpose(1, 2) for t in ref[:4]]
    y64, w64 = hebbian_chunked(*heads_first, eta=0.5, state=ref[4], chunk=64)
    (y64.transpose(1, 2) * grad_y.double()).sum().backward()

    def close(a, ref_value, what):
        # fla multiplies float32 in TF32 (10-bit mantissa): relative error ~1e-3 of the norm
        err = (a.double() - ref_value).norm() / ref_value.norm()
        assert err < 5e-3, f"{what}: relative error {err:.2e}"

    close(y, y64.transpose(1, 2), "y")
    close(w, w64, "final state")
    for name, leaf, r in zip(("dq", "dk", "dv", "dlog_decay", "dstate"), leaves, ref, strict=True):
        close(leaf.grad, r.grad, name)


def test_layer_backends_agree_under_bf16_autocast():
    torch.manual_seed(0)
    m = DissipativeHebbian(d_model=256, n_heads=4, head_dim=64, backend="fla").cuda()
    x = torch.randn(2, 2048, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_fla = m(x).float()
        m.backend = "torch"
        y_torch = m(x).float()
    err = (y_fla - y_torch).norm() / y_torch.norm()
    assert err < 2e-2, f"relative error {err:.2e}"  # two bf16 computations, different orders
