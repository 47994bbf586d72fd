"""The delta rule's chunk walk: the Triton kernels under TRITON_INTERPRET=1 in float64 against
the PyTorch loop (values and every gradient), and the delta rule through them against its
per-token definition; the loop itself against the chunked form's two-level walk."""

import textwrap

import pytest
import torch

from muse.ops.delta_rule import delta_rule_chunked
from muse.ops.delta_states.reference import (
    chunk_readout_reference,
    chunk_solve_reference,
    delta_walk_reference,
)

from .interpreted import run_interpreted
from .test_delta_rule import inputs

_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    import torch.nn.functional as F
    from muse.ops.delta_rule import delta_rule_chunked, delta_rule_naive
    from muse.ops.delta_states.readout import chunk_readout_triton
    from muse.ops.delta_states.reference import (chunk_readout_reference,
                                                 chunk_solve_reference, delta_walk_reference)
    from muse.ops.delta_states.solve import chunk_solve_triton
    from muse.ops.delta_states.triton import delta_walk_triton

    def nerr(x, y):
        return float((x - y).norm() / y.norm())

    def walk_inputs(seqs, m, t, dk, dv, seed):
        g = torch.Generator().manual_seed(seed)
        f64 = dict(generator=g, dtype=torch.float64)
        return (torch.randn(seqs, m, t, dk, **f64) / 4, torch.randn(seqs, m, t, dv, **f64),
                F.normalize(torch.randn(seqs, m, t, dk, **f64), dim=-1),
                torch.cumsum(-torch.rand(seqs, m, t, **f64) * 4 / t, dim=-1),
                torch.randn(seqs, dk, dv, **f64))

    out = {}
    # (S, M, T, Dk, Dv, block_v): one and several column blocks, T ≠ Dk ≠ Dv
    for seqs, m, t, dk, dv, bv in [(2, 3, 16, 16, 32, 16), (1, 2, 32, 16, 16, None),
                                   (2, 2, 16, 32, 64, 32), (1, 1, 16, 16, 16, None)]:
        args = walk_inputs(seqs, m, t, dk, dv, seed=m + t + dv)
        g = torch.Generator().manual_seed(5)
        ups = (torch.randn(seqs, m, dk, dv, generator=g, dtype=torch.float64),
               torch.randn(seqs, m, t, dv, generator=g, dtype=torch.float64),
               torch.randn(seqs, dk, dv, generator=g, dtype=torch.float64))
        runs = []
        for fn in (delta_walk_reference, lambda *a: delta_walk_triton(*a, block_v=bv)):
            leaves = [x.clone().requires_grad_() for x in args]
            outs = fn(*leaves)
            sum((o * u).sum() for o, u in zip(outs, ups)).backward()
            runs.append([o.detach() for o in outs] + [x.grad for x in leaves])
        out[f"walk {seqs}x{m}x{t}x{dk}x{dv}/{bv}"] = max(
            nerr(a, b) for a, b in zip(runs[1], runs[0]))

    # each chunk's read-out: decays from none to steep (b down to -12 in a chunk), T ≠ Dk ≠ Dv
    for seqs, m, t, dk, dv in [(2, 3, 16, 16, 32), (1, 2, 32, 64, 16), (1, 1, 64, 64, 64)]:
        g = torch.Generator().manual_seed(m + t + dv)
        f64 = dict(generator=g, dtype=torch.float64)
        args = (torch.randn(seqs, m, t, dk, **f64), torch.randn(seqs, m, t, dk, **f64),
                torch.randn(seqs, m, t, dv, **f64), torch.randn(seqs, m, dk, dv, **f64),
                torch.cumsum(-torch.rand(seqs, m, t, **f64) * 12 / t, dim=-1))
        up = torch.randn(seqs, m, t, dv, **f64)
        runs = []
        for fn in (chunk_readout_reference, chunk_readout_triton):
            leaves = [x.clone().requires_grad_() for x in args]
            y = fn(*leaves)
            (y * up).sum().backward()
            runs.append([y.detach()] + [x.grad for x in leaves])
        out[f"readout {seqs}x{m}x{t}x{dk}x{dv}"] = max(
            nerr(a, b) for a, b in zip(runs[1], runs[0]))

    # each chunk's solve: unit keys, β in (0, 1), decays from none to steep, T ≠ Dk ≠ Dv, v in
    # its own dtype (its gradient too)
    for seqs, m, t, dk, dv in [(2, 3, 16, 16, 32), (1, 2, 32, 64, 16), (1, 1, 64, 64, 64)]:
        g = torch.Generator().manual_seed(m + t + dk)
        f64 = dict(generator=g, dtype=torch.float64)
        args = (F.normalize(torch.randn(seqs, m, t, dk, **f64), dim=-1),
                torch.randn(seqs, m, t, dv, **f64), torch.rand(seqs, m, t, **f64),
                torch.cumsum(-torch.rand(seqs, m, t, **f64) * 12 / t, dim=-1))
        ups = (torch.randn(seqs, m, t, dv, **f64), torch.randn(seqs, m, t, dk, **f64))
        runs = []
        for fn in (chunk_solve_reference, chunk_solve_triton):
            leaves = [x.clone().requires_grad_() for x in args]
            u0, p = fn(*leaves)
            ((u0 * ups[0]).sum() + (p * ups[1]).sum()).backward()
            runs.append([u0.detach(), p.detach()] + [x.grad for x in leaves])
        out[f"solve {seqs}x{m}x{t}x{dk}x{dv}"] = max(
            nerr(a, b) for a, b in zip(runs[1], runs[0]))

    # q, k and v in bfloat16 (as autocast hands them over), the rest float32 (the interpreter
    # turns float64 into bfloat16 as NaN): against the reference in float64 on the same inputs
    # (cast up exactly), the narrow inputs' gradients stored in bfloat16
    g = torch.Generator().manual_seed(11)
    f64 = dict(generator=g, dtype=torch.float64)
    seqs, m, t, dk, dv = 1, 2, 32, 16, 32
    q, k = (F.normalize(torch.randn(seqs, m, t, dk, **f64), dim=-1).bfloat16() for _ in "qk")
    v = torch.randn(seqs, m, t, dv, **f64).bfloat16()
    b = torch.cumsum(-torch.rand(seqs, m, t, **f64) * 12 / t, dim=-1)
    cases = {"solve": ((k, v, torch.rand(seqs, m, t, **f64), b),
                       (chunk_solve_reference, chunk_solve_triton)),
             "readout": ((q, k, torch.randn(seqs, m, t, dv, **f64),
                          torch.randn(seqs, m, dk, dv, **f64), b),
                         (chunk_readout_reference, chunk_readout_triton)),
             "walk": ((torch.randn(seqs, m, t, dk, **f64) / 4, torch.randn(seqs, m, t, dv, **f64),
                       k, b, torch.randn(seqs, dk, dv, **f64)),
                      (delta_walk_reference, delta_walk_triton))}
    for name, (args, fns) in cases.items():
        narrow = [x.dtype == torch.bfloat16 for x in args]
        runs = []
        for fn, wide in zip(fns, (torch.float64, torch.float32)):
            leaves = [x.to(x.dtype if n and wide == torch.float32 else wide,
                           copy=True).requires_grad_() for x, n in zip(args, narrow)]
            outs = fn(*leaves)
            outs = outs if isinstance(outs, tuple) else (outs,)
            g = torch.Generator().manual_seed(3)
            sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(wide)).sum()
                for o in outs).backward()
            runs.append(([o.detach() for o in outs]
                         + [x.grad for x, n in zip(leaves, narrow) if not n],
                         [x.grad for x, n in zip(leaves, narrow) if n]))
        out[f"{name} bf16 inputs, float32"] = max(
            nerr(a.double(), b) for a, b in zip(runs[1][0], runs[0][0]))
        out[f"{name} bf16 inputs' gradients"] = max(
            nerr(a.double(), b) for a, b in zip(runs[1][1], runs[0][1]))
        assert all(x.dtype == torch.bfloat16 for x in runs[1][1])

    # the whole delta rule with its chunk pass in Triton, against the per-token loop: padding
    # (n not a multiple of T), a carried state, every gradient
    for n in (16, 40):
        g = torch.Generator().manual_seed(n)
        f64 = dict(generator=g, dtype=torch.float64)
        b, h, d = 2, 2, 16
        args = (torch.randn(b, h, n, d, **f64),
                F.normalize(torch.randn(b, h, n, d, **f64), dim=-1),
                torch.randn(b, h, n, 32, **f64), -torch.rand(b, h, n, **f64) * 0.5,
                torch.rand(b, h, n, **f64), torch.randn(b, h, d, 32, **f64) / 4)
        ups = (torch.randn(b, h, n, 32, **f64), torch.randn(b, h, d, 32, **f64))
        runs = []
        for fn in (delta_rule_naive,
                   lambda *a, state: delta_rule_chunked(*a, state=state, chunk=16,
                                                        states="triton")):
            leaves = [x.clone().requires_grad_() for x in args]
            y, w = fn(*leaves[:5], state=leaves[5])
            ((y * ups[0]).sum() + (w * ups[1]).sum()).backward()
            runs.append([y.detach(), w.detach()] + [x.grad for x in leaves])
        out[f"rule n={n}"] = max(nerr(a, b) for a, b in zip(runs[1], runs[0]))
    print(json.dumps(out))
    """
)


@pytest.mark.slow  # the interpreter subprocess
def test_the_triton_walk_matches_the_loop_and_the_definition_in_float64():
    out = run_interpreted(_SCRIPT, min_triton=(3, 7))
    assert len(out) == 18
    for case, err in out.items():
        # float64, a few chunks of 16–32 tokens: rounding only (observed ≤ 1e-15); float32
        # against float64 on the same inputs: its rounding; gradients stored in bfloat16: within
        # one bfloat16 step an entry (2⁻⁷ relative)
        tol = {"gradients": 2**-7, "float32": 1e-5}.get(case.rsplit(" ", 1)[-1], 1e-12)
        assert err < tol, (case, err)


@pytest.mark.parametrize("n", [2, 64, 100])
def test_the_loop_is_the_chunked_forms_own_walk(n, monkeypatch):
    """The reference loop, fed what the chunked form hands the kernel, gives the two-level
    walk's y and W, and the same gradients."""
    pytest.importorskip("triton")
    from muse.ops import delta_rule
    from muse.ops.delta_states import readout, solve
    from muse.ops.delta_states import triton as kernels

    args = inputs(n, seed=n, dk=16, dv=16)
    state = torch.randn(2, 3, 16, 16, dtype=torch.float64) / 4
    runs, calls = [], []
    for routed in (False, True):
        if routed:
            monkeypatch.setattr(delta_rule, "_use_triton", lambda *a: True)
            monkeypatch.setattr(kernels, "delta_walk_triton",
                                lambda *a: calls.append(a) or delta_walk_reference(*a))
            monkeypatch.setattr(readout, "chunk_readout_triton",
                                lambda *a: calls.append(a) or chunk_readout_reference(*a))
            monkeypatch.setattr(solve, "chunk_solve_triton",
                                lambda *a: calls.append(a) or chunk_solve_reference(*a))
        leaves = [x.clone().requires_grad_() for x in (*args, state)]
        y, w = delta_rule_chunked(*leaves[:5], state=leaves[5], chunk=16,
                                  states="auto" if routed else "torch")
        (y.sum() + (w * w).sum()).backward()
        runs.append([y.detach(), w.detach(), *(x.grad for x in leaves)])
    assert len(calls) == 3
    for a, b in zip(*runs, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_an_unknown_states_choice_is_named():
    with pytest.raises(ValueError, match="states must be one of auto, triton, torch, got 'cuda'"):
        delta_rule_chunked(*inputs(8), states="cuda")


def test_a_readout_of_mismatched_shapes_names_every_shape():
    q = torch.zeros(1, 2, 16, 16)
    with pytest.raises(ValueError, match=r"chunk_readout needs .*fresh \(1, 2, 16, 8\), "
                                         r"entering \(1, 2, 16, 16\)"):
        chunk_readout_reference(q, q, torch.zeros(1, 2, 16, 8), q, torch.zeros(1, 2, 16))


def test_a_solve_of_mismatched_shapes_names_every_shape():
    k = torch.zeros(1, 2, 16, 16)
    with pytest.raises(ValueError, match=r"chunk_solve needs .*v \(1, 2, 8, 16\), "
                                         r"beta \(1, 2, 16\), b \(1, 2, 8\)"):
        chunk_solve_reference(k, torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 16),
                              torch.zeros(1, 2, 8))


_INVERSES = textwrap.dedent(
    """
    import json
    import torch
    import torch.nn.functional as F
    from muse.ops.delta_states import solve
    from muse.ops.delta_states.reference import chunk_solve_reference

    out = {}
    for s, m, t, dk, dv in [(2, 3, 16, 16, 32), (1, 2, 64, 32, 16)]:
        g = torch.Generator().manual_seed(t)
        f64 = dict(generator=g, dtype=torch.float64)
        k = F.normalize(torch.randn(s, m, t, dk, **f64), dim=-1)
        v, beta = torch.randn(s, m, t, dv, **f64), torch.rand(s, m, t, **f64)
        b = torch.cumsum(-torch.rand(s, m, t, **f64) * 12 / t, -1)
        du0, dp = torch.randn(s, m, t, dv, **f64), torch.randn(s, m, t, dk, **f64)
        leaves = [x.clone().requires_grad_() for x in (k, v, beta, b)]
        u0, p = chunk_solve_reference(*leaves)
        ((u0 * du0).sum() + (p * dp).sum()).backward()
        want = [u0.detach(), p.detach()] + [x.grad for x in leaves]
        for inverse in (0, 1, 2):
            got = [torch.empty_like(x) for x in (v, k, k, v, beta, b)]
            opts = dict(T=t, DK=dk, DV=dv, PRECISION="ieee", WIDE=True, INVERSE=inverse)
            scratch = torch.empty(s * m, t, t, dtype=torch.float64)
            solve._solve_forward[(s * m,)](k, v, beta, b, *got[:2], scratch, **opts)
            solve._solve_backward[(s * m,)](k, v, beta, b, du0, dp, *got[2:], scratch, **opts)
            out[f"{t}/{inverse}"] = max(float((x - y).norm() / y.norm())
                                        for x, y in zip(got, want))
    print(json.dumps(out))
    """
)


@pytest.mark.slow  # the interpreter subprocess
def test_every_way_of_forming_the_inverse_gives_the_solve_in_float64():
    """The solve kernels with (I + A)⁻¹ formed row by row (A's rows extracted, or formed from
    the keys) and in 16-row blocks, against the PyTorch reference: values and gradients."""
    out = run_interpreted(_INVERSES, min_triton=(3, 7))
    assert len(out) == 6
    for case, err in out.items():
        assert err < 1e-12, (case, err)  # float64 rounding (observed ≤ 1e-15)


@pytest.mark.parametrize("seqs, dv, sms, block_v", [
    (112, 64, 132, 32),  # 16 × 7 heads at 4096: 224 programs of 32 columns fill 132 SMs
    (28, 64, 132, 16),  # 4 × 7 heads at 16384: 56 programs of 32 would leave SMs idle
    (7, 64, 132, 16),  # one sequence of 65536
    (7, 16, 132, 16),  # D_v 16: one block whatever the GPU
    (7, 64, None, 32),  # off CUDA
    (1000, 128, 132, 32),
])
def test_the_walk_narrows_its_column_blocks_only_where_sms_would_idle(seqs, dv, sms, block_v):
    pytest.importorskip("triton")
    from muse.ops.delta_states.triton import default_block_v

    assert default_block_v(seqs, dv, sms) == block_v
