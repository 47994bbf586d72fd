"""The short causal conv's Triton kernels under TRITON_INTERPRET=1 in float64 against the
PyTorch form (values, ∂x, ∂w; the backward in one launch and in two), with and without SiLU,
at lengths shorter than the kernel and channels past one column block; the layer through them
against its own PyTorch path."""

import textwrap

import pytest
import torch

from muse.layers.short_conv import ShortConv

from .interpreted import run_interpreted

_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    import torch.nn.functional as F
    from muse.layers.short_conv import ShortConv
    from muse.ops.short_conv import triton as kernels
    from muse.ops.short_conv.naive import causal_depthwise
    from muse.ops.short_conv.triton import short_conv_triton

    def nerr(x, y):
        return float((x - y).norm() / y.norm())

    def reference(x, w, activation):
        y = causal_depthwise(F.pad(x, (0, 0, w.shape[-1] - 1, 0)), w)
        return F.silu(y) if activation else y

    out = {}
    # (B, N, C, K, SiLU): N below K, N past one row tile (32), C past one column block (128)
    for bsz, n, c, k, act in [(2, 37, 6, 4, True), (1, 70, 130, 3, False), (2, 2, 129, 4, True),
                              (1, 33, 7, 1, True), (3, 65, 256, 2, True)]:
        g = torch.Generator().manual_seed(n + c)
        f64 = dict(generator=g, dtype=torch.float64)
        x, w, up = torch.randn(bsz, n, c, **f64), torch.randn(c, 1, k, **f64), \\
            torch.randn(bsz, n, c, **f64)
        runs, default = [], kernels.BACKWARD
        for backward in (None, "fused", "split"):  # None: the PyTorch form
            kernels.BACKWARD = backward
            leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
            y = reference(*leaves, act) if backward is None else short_conv_triton(*leaves, act)
            (y * up).sum().backward()
            runs.append([y.detach()] + [t.grad for t in leaves])
        for i, backward in ((1, "fused"), (2, "split")):
            out[f"kernel {bsz}x{n}x{c} K{k} silu={act} {backward}"] = max(
                nerr(a, b) for a, b in zip(runs[i], runs[0]))
        kernels.BACKWARD = default

    torch.manual_seed(0)
    layer = ShortConv(12, kernel_size=4, backend="torch").double()
    x = torch.randn(2, 19, 12, dtype=torch.float64)
    runs = []
    for backend in ("torch", "triton"):
        layer.backend = backend
        leaf = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(leaf)
        (y * torch.cos(y)).sum().backward()
        runs.append([y.detach(), leaf.grad, layer.conv.weight.grad.clone()])
    out["layer triton vs torch"] = max(nerr(a, b) for a, b in zip(runs[1], runs[0]))
    print(json.dumps(out))
    """
)


@pytest.mark.slow  # the interpreter subprocess
def test_the_triton_kernels_match_the_pytorch_form_in_float64():
    out = run_interpreted(_SCRIPT)
    assert len(out) == 11, out
    # float64 throughout; only the order of the K products (and of ∂w's tile sums) differs
    for case, worst in out.items():
        assert worst < 1e-13, (case, worst)


def test_an_unknown_backend_is_named():
    with pytest.raises(ValueError, match="'cuda'.*auto, triton, torch|auto, triton, torch.*'cuda'"):
        ShortConv(8, backend="cuda")


def test_the_triton_form_names_a_weight_of_the_wrong_shape():
    from muse.ops.short_conv.triton import short_conv_triton

    with pytest.raises(ValueError, match=r"\(8, 1, K\), got \(6, 1, 4\)"):
        short_conv_triton(torch.randn(1, 5, 8), torch.randn(6, 1, 4))
    with pytest.raises(ValueError, match=r"x \(B, N, C\), got shape \(5, 8\)"):
        short_conv_triton(torch.randn(5, 8), torch.randn(8, 1, 4))
    huge = torch.empty(1, 2**20, 2**11, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match=r"N × C = 1048576 × 2048 entries in int32"):
        short_conv_triton(huge, torch.randn(2**11, 1, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_the_layer_through_triton_matches_its_pytorch_path(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    layer = ShortConv(1536, kernel_size=4, backend="torch").cuda()
    x = torch.randn(3, 1000, 1536, device="cuda")
    runs = []
    for backend in ("torch", "triton"):
        layer.backend = backend
        leaf = x.clone().requires_grad_()
        layer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = layer(leaf)
        (y.float() * torch.cos(y.float())).sum().backward()
        runs.append([y.detach().float(), leaf.grad, layer.conv.weight.grad.clone()])
    # float32: the same sums in another order; bf16: each output rounded to bf16 (2⁻⁸) in both
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(("y", "dx", "dw"), runs[1], runs[0], strict=True):
        err = float((a - b).norm() / b.norm())
        assert err < bound, (name, err)
