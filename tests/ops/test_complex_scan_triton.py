"""The Triton complex scan (muse.ops.complex_scan.triton) under the interpreter, in float32,
against the chunked PyTorch form in float64: h, and the gradients to u, log|λ| and arg λ.
Observed ≤ 6e-6 (max |x − ref| / max |ref|) up to N = 300; bound 2e-5."""

import textwrap

import pytest

from .interpreted import run_interpreted

SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    from muse.ops.complex_scan import complex_decayed_cumsum
    from muse.ops.complex_scan.triton import complex_decayed_cumsum_triton

    def nerr(x, y):
        scale = y.abs().max()
        return ((x.double() - y).abs().max() / scale).item() if scale > 0 else x.abs().max().item()

    out = {}
    for n in (1, 5, 64, 65, 300):
        torch.manual_seed(n)
        r = 12 if n < 300 else 40  # 40 > 32: programs with a partial block of channels
        u = torch.randn(2, n, 2 * r, dtype=torch.float64)
        log_mag = -torch.rand(r, dtype=torch.float64) * 0.2
        angle = (torch.rand(r, dtype=torch.float64) - 0.5) * 2.0
        ref_in = [t.clone().requires_grad_(True) for t in (u, log_mag, angle)]
        ref = complex_decayed_cumsum(*ref_in, 16)
        up = torch.randn_like(ref)
        ref.backward(up)
        tri_in = [t.float().clone().requires_grad_(True) for t in (u, log_mag, angle)]
        h = complex_decayed_cumsum_triton(*tri_in)
        h.backward(up.float())
        out[n] = {"dtype": str(h.dtype), "h": nerr(h, ref),
                  **{k: nerr(t.grad, r.grad) for k, t, r in zip(("u", "log_mag", "angle"),
                                                                 tri_in, ref_in)}}
    print(json.dumps(out))
    """
)


@pytest.mark.slow  # the interpreter subprocess
def test_triton_complex_scan_matches_the_float64_chunked_form():
    found = run_interpreted(SCRIPT)
    assert sorted(found, key=int) == ["1", "5", "64", "65", "300"]
    for n, errs in found.items():
        assert errs.pop("dtype") == "torch.float32", n
        for name, err in errs.items():
            assert err <= 2e-5, (n, name, err)
