"""The delta rule's chunk-step walk in Triton (muse.ops.matrix_scan) under TRITON_INTERPRET=1,
against the float64 loop of multiply-adds it replaces: both walks, and the autograd node's
values and gradients with the walk in place of its loops."""

import textwrap

from .interpreted import run_interpreted

_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    import muse.ops.delta_rule as delta_rule
    from muse.ops.matrix_scan import matrix_scan

    def nerr(x, y):
        return float((x.double() - y).norm() / y.norm())

    def loop(a, p, w, reverse=False, transpose=False):
        before = [None] * a.shape[1]
        order = range(a.shape[1] - 1, -1, -1) if reverse else range(a.shape[1])
        for c in order:
            before[c] = w
            step = a[:, c].transpose(1, 2) if transpose else a[:, c]
            w = step @ w + p[:, c]
        return torch.stack(before, dim=1), w

    out = {}
    g = torch.Generator().manual_seed(0)
    for seqs, m, dk, dv in [(3, 1, 16, 20), (2, 7, 32, 64), (1, 40, 64, 33)]:
        a = torch.randn(seqs, m, dk, dk, generator=g, dtype=torch.float64) / dk ** 0.5
        p = torch.randn(seqs, m, dk, dv, generator=g, dtype=torch.float64)
        w0 = torch.randn(seqs, dk, dv, generator=g, dtype=torch.float64)
        for reverse, transpose in [(False, False), (True, True), (True, False)]:
            want = loop(a, p, w0, reverse, transpose)
            got = matrix_scan(a.float(), p.float(), w0.float(), reverse, transpose)
            out[f"{seqs}x{m}x{dk}x{dv} reverse={reverse} transpose={transpose}"] = max(
                nerr(x, y) for x, y in zip(got, want))

    # the autograd node: the walk in place of its loops (on CUDA it takes them), float32,
    # against the same node's loops in float64
    seqs, m, dk, dv = 2, 9, 16, 24
    leaves = [torch.randn(seqs, m, dk, dk, generator=g, dtype=torch.float64) / 4,
              torch.randn(seqs, m, dk, dv, generator=g, dtype=torch.float64),
              torch.randn(seqs, dk, dv, generator=g, dtype=torch.float64)]
    ups = [torch.randn(seqs, m, dk, dv, generator=g, dtype=torch.float64),
           torch.randn(seqs, dk, dv, generator=g, dtype=torch.float64)]
    runs = []
    for dtype, walk in ((torch.float64, False), (torch.float32, True)):
        delta_rule._on_triton = lambda *ts, walk=walk: walk
        xs = [t.detach().to(dtype).requires_grad_() for t in leaves]
        entering, last = delta_rule._AffineScan.apply(*xs)
        ((entering * ups[0].to(dtype)).sum() + (last * ups[1].to(dtype)).sum()).backward()
        runs.append([entering.detach(), last.detach(), *(x.grad for x in xs)])
    names = ("entering", "last", "grad step", "grad push", "grad w0")
    out.update({f"node {name}": nerr(got, want)
                for name, got, want in zip(names, runs[1], runs[0])})
    print(json.dumps(out))
    """
)


def test_the_walk_matches_the_float64_loop():
    """float32 products (IEEE) against float64: 1e-5 of the norm."""
    errors = run_interpreted(_SCRIPT, min_triton=(3, 7))
    bad = {case: err for case, err in errors.items() if not err < 1e-5}
    assert len(errors) == 14 and not bad, bad
