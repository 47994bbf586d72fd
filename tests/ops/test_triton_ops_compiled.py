"""muse's Triton scans, the delta rule's chunk kernels and the short conv inside torch.compile
with fullgraph=True, under TRITON_INTERPRET=1: the launches are custom ops, opaque nodes of one
graph, and the compiled forward and gradients are the eager ones (the same kernels: observed 0,
bound 1e-6)."""

import textwrap

import pytest

from .interpreted import run_interpreted

_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    from muse.ops.complex_scan.triton import complex_decayed_cumsum_triton
    from muse.ops.decayed_scan.triton import decayed_cumsum_triton
    from muse.ops.delta_states.triton import delta_walk_triton
    from muse.ops.delta_states.readout import chunk_readout_triton
    from muse.ops.delta_states.solve import chunk_solve_triton
    from muse.ops.short_conv.triton import short_conv_triton

    def err(x, y):
        return float((x - y).abs().max() / max(float(y.abs().max()), 1e-30))

    g = torch.Generator().manual_seed(3)
    bsz, n, r = 2, 37, 6
    cases = {
        "decayed per channel": (decayed_cumsum_triton,
                                (torch.randn(bsz, n, r, generator=g),
                                 -torch.rand(r, generator=g) * 0.3)),
        "decayed per step": (decayed_cumsum_triton,
                             (torch.randn(bsz, n, r, generator=g),
                              -torch.rand(bsz, n, generator=g) * 0.3)),
        "complex": (complex_decayed_cumsum_triton,
                    (torch.randn(bsz, n, 2 * r, generator=g),
                     -torch.rand(r, generator=g) * 0.3 - 0.01, torch.randn(r, generator=g))),
        "delta walk": (lambda *a: torch.cat([x.flatten() for x in delta_walk_triton(*a)]),
                       (torch.randn(2, 3, 16, 16, generator=g) / 4,
                        torch.randn(2, 3, 16, 32, generator=g),
                        torch.nn.functional.normalize(torch.randn(2, 3, 16, 16, generator=g),
                                                      dim=-1),
                        torch.cumsum(-torch.rand(2, 3, 16, generator=g) / 8, dim=-1),
                        torch.randn(2, 16, 32, generator=g))),
        "delta readout": (chunk_readout_triton,
                          (torch.randn(2, 3, 16, 16, generator=g),
                           torch.randn(2, 3, 16, 16, generator=g),
                           torch.randn(2, 3, 16, 32, generator=g),
                           torch.randn(2, 3, 16, 32, generator=g),
                           torch.cumsum(-torch.rand(2, 3, 16, generator=g), dim=-1))),
        "delta solve": (lambda *a: torch.cat([x.flatten() for x in chunk_solve_triton(*a)]),
                        (torch.nn.functional.normalize(torch.randn(2, 3, 16, 16, generator=g),
                                                       dim=-1),
                         torch.randn(2, 3, 16, 32, generator=g), torch.rand(2, 3, 16, generator=g),
                         torch.cumsum(-torch.rand(2, 3, 16, generator=g), dim=-1))),
        "short conv": (short_conv_triton,
                       (torch.randn(2, n, 2 * r, generator=g),
                        torch.randn(2 * r, 1, 4, generator=g))),
    }
    out = {}
    for name, (fn, inputs) in cases.items():
        torch._dynamo.reset()
        res = []
        for f in (torch.compile(fn, backend="aot_eager", fullgraph=True), fn):
            leaves = [t.clone().requires_grad_() for t in inputs]
            y = f(*leaves)
            up = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
            (y * up).sum().backward()
            res.append([y.detach()] + [t.grad for t in leaves])
        out[name] = max(err(a, b) for a, b in zip(res[0], res[1]))
    print(json.dumps(out))
    """
)


@pytest.mark.slow  # the interpreter subprocess
def test_the_triton_scans_compile_as_one_graph_with_the_eager_gradients():
    out = run_interpreted(_SCRIPT, min_triton=(3, 7))
    assert set(out) == {"decayed per channel", "decayed per step", "complex", "delta walk",
                        "delta readout", "delta solve", "short conv"}
    for name, worst in out.items():
        assert worst <= 1e-6, (name, worst)
