"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"), per head:

    S_t = S_{t−1} + φ(k_t) v_tᵀ,   z_t = z_{t−1} + φ(k_t),   y_t = φ(q_t)ᵀ S_t / (φ(q_t)·z_t + ε),

with φ = elu + 1 > 0, so the normaliser φ(q)·z is positive. The state (S, z) is carried
between segments, which makes streaming exact. With a decay (`decay="mamba2"`, off by default)
both S and z are multiplied by a_t = exp(log a_t) ∈ (0, 1] per head before each write, a_t
chosen by the input (Mamba2's parameterisation, layers.decay): gated linear attention with
linear attention's normaliser, computed by the Hebbian layer's chunked form
(`decayed_linear_attention`).

`linear_attention_chunked` computes it in chunks of T: inside each chunk one masked (T × T)
product, across chunks the state entering each chunk, which without a decay is an exclusive
cumulative sum of the chunks' contributions (one parallel `cumsum`, no loop over chunks).
O(N·T) work. The normaliser is the same computation with a value of 1, so it rides along as
one more value column. `linear_attention_naive` is the per-token definition the tests bind to.

Backends: "torch" is the chunked form and runs everywhere; "fla" runs the numerator through
flash-linear-attention's `chunk_simple_gla` (CUDA, Triton) and the normaliser as a cumulative
sum here (fla's own normalisation ignores a carried state); with a decay, the normaliser as a
value column through the same kernel. "auto" is "torch": fla 0.6 refuses its backward on
Hopper with Triton < 3.7.1 (fla #640), and its paths are checked against float64 only where
it runs (tests/layers/test_linear_attention_cuda.py); asking for "fla" where it cannot run is
an error.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from muse.layers.cast import autocast_read
from muse.layers.decay import mamba2_a_log, mamba2_bias
from muse.layers.hebbian import fla_available, hebbian_chunked, hebbian_fla
from muse.layers.norm import gated_out
from muse.layers.short_conv import ShortConv
from muse.ops.decayed_scan.chunk import above_diagonal, pad_time

BACKENDS = ("auto", "torch", "fla")
DECAYS = ("none", "mamba2")
EPS = 1e-6  # added to the normaliser φ(q)·z, which is > 0 already (the paper's ε)


def elu_feature(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1, positive everywhere. Backward keeps φ(x), not x: φ' is 1 where
    φ > 1 and φ itself elsewhere (e^x), and φ(x) is kept by the products that read it anyway,
    while x is a view of the whole q | k | v projection. Under torch.compile the partitioner
    picks what to keep (the node would only force φ to be kept beside what it keeps)."""
    if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
        return _EluFeature.apply(x)
    return F.elu(x) + 1


class _EluFeature(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = F.elu(x) + 1
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * torch.where(y > 1, torch.ones_like(y), y)


def linear_attention_naive(q, k, v, state=None, eps: float = EPS, log_decay=None):
    """q, k (B, H, N, Dk) already feature-mapped (≥ 0), v (B, H, N, Dv); state (S (B, H, Dk,
    Dv), z (B, H, Dk)) or None; log_decay (B, H, N) ≤ 0 or None → y (B, H, N, Dv), (S, z)
    after the last token."""
    bsz, heads, n, dk = q.shape
    if state is None:
        s, z = q.new_zeros(bsz, heads, dk, v.shape[-1]), q.new_zeros(bsz, heads, dk)
    else:
        s, z = state
    out = []
    for t in range(n):
        if log_decay is not None:
            a = torch.exp(log_decay[:, :, t])
            s, z = a[..., None, None] * s, a[..., None] * z
        s = s + k[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + k[:, :, t]
        num = torch.einsum("bhk,bhkv->bhv", q[:, :, t], s)
        den = (q[:, :, t] * z).sum(-1, keepdim=True) + eps
        out.append(num / den)
    return torch.stack(out, dim=2), (s, z)


def linear_attention_chunked(q, k, v, state=None, chunk: int = 64, eps: float = EPS):
    """Same contract as `linear_attention_naive`. The carried state and the normaliser are
    kept in float32 at least: without a decay they grow with every token, and in bf16 a sum
    over thousands of tokens stops changing. fp16 inputs are computed in float32 throughout."""
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")
    if q.dtype == torch.float16:
        # the unnormalised sums φ(q)·φ(k) over a chunk pass fp16's 65,504 at a few thousand
        # tokens (bf16 has float32's range): fp16 inputs are worked in float32, autocast or not
        with torch.autocast(q.device.type, enabled=False):
            out, state = linear_attention_chunked(q.float(), k.float(), v.float(), state,
                                                  chunk, eps)
        return out.to(v.dtype), state
    bsz, heads, n, dk = q.shape
    dv = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    m = -(-n // chunk)
    pad = m * chunk - n  # zero keys at the end add nothing to the state
    v1 = with_normaliser_column(v)
    qc, kc, vc = (pad_time(x, pad, 2).view(bsz, heads, m, chunk, -1) for x in (q, k, v1))
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(above_diagonal(chunk, q.device), 0.0)
    intra = scores @ vc  # (B, H, M, T, width): Dv, the normaliser's column, padding
    added = (kc.transpose(-1, -2) @ vc).to(acc)  # what each chunk adds: (B, H, M, Dk, width)
    if state is None:
        start = added.new_zeros(bsz, heads, 1, dk, v1.shape[-1])
    else:
        start = state_with_normaliser(state, v1.shape[-1]).to(acc)[:, :, None]
    ends = start + torch.cumsum(added, dim=2)  # the state after each chunk
    entering = torch.cat((start, ends[:, :, :-1]), dim=2)
    y = intra.to(acc) + qc.to(acc) @ entering
    y = y.reshape(bsz, heads, m * chunk, v1.shape[-1])[:, :, :n]
    out = (y[..., :dv] / (y[..., dv:dv + 1] + eps)).to(v.dtype)
    last = ends[:, :, -1]
    return out, (last[..., :dv], last[..., dv])


def decayed_linear_attention(q, k, v, log_decay, state=None, chunk: int = 64,
                             eps: float = EPS, backend: str = "torch"):
    """`linear_attention_naive`'s contract with log_decay (B, H, N) ≤ 0, in chunks: the
    numerator and the normaliser (a value column of ones) through `hebbian_chunked` (backend
    "torch") or fla's kernel for the same recurrence (`hebbian_fla`, backend "fla", which keeps
    only q, k, v and the decays for backward), the state (S | z | zero padding) carried as one
    (Dk × `with_normaliser_column`'s width) matrix in float32 at least."""
    if q.dtype == torch.float16:
        # a slow head's state sums ~1/(1 − a) writes: past fp16's range, as without a decay
        with torch.autocast(q.device.type, enabled=False):
            out, state = decayed_linear_attention(q.float(), k.float(), v.float(),
                                                  log_decay.float(), state, chunk, eps, backend)
        return out.to(v.dtype), state
    dv = v.shape[-1]
    acc = torch.promote_types(torch.promote_types(q.dtype, log_decay.dtype), torch.float32)
    v1 = with_normaliser_column(v)
    w0 = None if state is None else state_with_normaliser(state, v1.shape[-1]).to(acc)
    if backend == "fla":
        y, w = hebbian_fla(*(t.transpose(1, 2) for t in (q, k, v1, log_decay)), state=w0)
        y = y.transpose(1, 2)
    else:
        y, w = hebbian_chunked(q, k, v1, log_decay.to(acc), state=w0, chunk=chunk)
    if torch.is_grad_enabled() and y.requires_grad:  # keeps y, not its float32 copy
        out = checkpoint(_normalised, y, dv, acc, eps, use_reentrant=False,
                         preserve_rng_state=False)
    else:
        out = _normalised(y, dv, acc, eps)
    return out.to(v.dtype), (w[..., :dv], w[..., dv])


def _decayed_output(q, k, v, log_decay, chunk: int) -> torch.Tensor:
    return decayed_linear_attention(q, k, v, log_decay, chunk=chunk)[0]


def _normalised(y: torch.Tensor, dv: int, acc: torch.dtype, eps: float) -> torch.Tensor:
    """The numerator columns y[..., :dv] over column dv (the normaliser), in `acc`, returned
    in y's dtype."""
    wide = y.to(acc)
    return (wide[..., :dv] / (wide[..., dv:dv + 1] + eps)).to(y.dtype)


# value rows padded to this many elements: a 65-column bf16 row is 130 bytes, which only the
# unaligned (align1) GEMM kernels take
ALIGN = 8


def with_normaliser_column(v: torch.Tensor) -> torch.Tensor:
    """v (…, Dv) → (…, Dv + 1 + pad): the normaliser is the numerator's computation with value
    1, one more value column; zero columns after it bring the width to a multiple of ALIGN."""
    pad = -(v.shape[-1] + 1) % ALIGN
    ones = v.new_ones(*v.shape[:-1], 1)
    if not pad:
        return torch.cat((v, ones), dim=-1)
    return torch.cat((v, ones, v.new_zeros(*v.shape[:-1], pad)), dim=-1)


def state_with_normaliser(state, width: int) -> torch.Tensor:
    """(S (…, Dk, Dv), z (…, Dk)) → the carried (…, Dk, width) matrix S | z | zeros."""
    s, z = state
    pad = width - s.shape[-1] - 1
    parts = (s, z[..., None].to(s.dtype)) + ((s.new_zeros(*z.shape, pad),) if pad else ())
    return torch.cat(parts, dim=-1)


def linear_attention_fla(q, k, v, state=None, eps: float = EPS):
    """The chunked contract with fla's kernel for the numerator, in (B, H, N, D) layout."""
    from fla.ops.simple_gla import chunk_simple_gla

    acc = torch.promote_types(q.dtype, torch.float32)
    s0, z0 = (None, None) if state is None else state
    num, s = chunk_simple_gla(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0,
        initial_state=None if s0 is None else s0.float(), output_final_state=True,
    )
    z = torch.cumsum(k.to(acc), dim=2)
    if z0 is not None:
        z = z + z0.to(acc)[:, :, None]
    den = (q.to(acc) * z).sum(-1, keepdim=True) + eps
    out = (num.transpose(1, 2).to(acc) / den).to(v.dtype)
    return out, (s, z[:, :, -1])


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs on `device`: never a silent substitute for the one asked for."""
    if backend not in BACKENDS:
        raise ValueError(f"linear attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "torch"
    if backend == "fla":
        if device.type != "cuda":
            raise RuntimeError(f"linear attention backend 'fla' runs Triton kernels and needs a "
                               f"CUDA tensor, got one on {device}; use backend='torch' or 'auto'")
        if not fla_available():
            raise RuntimeError("linear attention backend 'fla' needs flash-linear-attention: "
                               "`pip install flash-linear-attention`, or use backend='torch'")
    return backend


class CausalLinearAttention(nn.Module):
    """(B, N, D) → (B, N, D): q, k, v projections, φ = elu + 1 on q and k, causal linear
    attention with its normaliser per head, output projection.

    Read-out options that leave the mixer causal linear attention (QUALITY.md items 1, 2):
    `conv` a short causal conv + SiLU on q, k, v before φ (kernel size, 0 = none);
    `out_gate` each head's output RMS-normalised with a gain, times SiLU(W_g x). `decay`
    "mamba2" forgets: S and z decay by a_t = exp(−A·softplus(w·x_t + b)) per head, softplus(b)
    log-uniform in `dt_range` at init (QUALITY.md's gated decay; "none": no decay), except on
    the first `plain_heads` heads, which keep everything written (a memory as long as the input,
    beside heads that forget). `recompute` keeps only q, k, v and the decays of the decayed
    form for backward and forms its chunk products again there (matmuls: opt-in)."""

    def __init__(self, *, d_model: int, n_heads: int, head_dim: int, chunk: int = 64,
                 backend: str = "auto", conv: int = 4, out_gate: bool = True,
                 decay: str = "none", dt_range: tuple[float, float] = (1e-3, 0.1),
                 plain_heads: int = 0, recompute: bool = False):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"linear attention backend must be one of {BACKENDS}, "
                             f"got {backend!r}")
        if conv < 0:
            raise ValueError(f"conv must be ≥ 0 (0: none), got {conv}")
        if decay not in DECAYS:
            raise ValueError(f"linear attention decay must be one of {DECAYS}, got {decay!r}")
        if not 0 <= plain_heads < n_heads:
            raise ValueError(f"linear attention plain_heads must be in [0, n_heads − 1 = "
                             f"{n_heads - 1}], got {plain_heads}")
        if plain_heads and decay == "none":
            raise ValueError(f"linear attention plain_heads ({plain_heads}) keeps heads out of "
                             f"a decay: it needs decay 'mamba2', got {decay!r}")
        self.gamma = nn.Linear(d_model, n_heads) if decay != "none" else None
        self.plain_heads = plain_heads
        if self.gamma is not None:
            with torch.no_grad():
                self.gamma.bias.copy_(mamba2_bias(n_heads, dt_range))
            self.a_log = nn.Parameter(mamba2_a_log(n_heads))
        self.n_heads, self.head_dim, self.chunk, self.backend = n_heads, head_dim, chunk, backend
        self.recompute = recompute
        inner = n_heads * head_dim
        self.qkv = nn.Linear(d_model, 3 * inner, bias=False)
        self.conv = ShortConv(3 * inner, conv) if conv else None
        self.gate = nn.Linear(d_model, inner, bias=False) if out_gate else None
        self.head_gain = nn.Parameter(torch.ones(head_dim)) if out_gate else None
        self.out = nn.Linear(inner, d_model, bias=False)

    # the backend the last forward ran ("auto" resolves per device): printed with the module
    ran_backend: str | None = None

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}, head_dim={self.head_dim}, chunk={self.chunk}, "
                f"backend={self.backend!r}, ran={self.ran_backend!r}")

    def init_state(self, batch: int, device=None, dtype=None) -> dict:
        """S = 0 and z = 0 (float32 at least), and the conv's last inputs if there is a conv."""
        ref = self.qkv.weight
        device = device or ref.device
        wide = torch.promote_types(dtype or ref.dtype, torch.float32)
        h, d = self.n_heads, self.head_dim
        state = {"s": torch.zeros(batch, h, d, d, device=device, dtype=wide),
                 "z": torch.zeros(batch, h, d, device=device, dtype=wide)}
        if self.conv is not None:
            state["conv"] = self.conv.init_tail(batch, device, dtype)
        return state

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """log a_t per head, (B, H, N), in float32 at least."""
        # heads first before softplus, as the output is laid out: a transposed gradient into
        # softplus breaks the gate's view in a traced (aot) backward
        gate = self.gamma(autocast_read(x)).transpose(1, 2).contiguous()
        gate = gate.to(torch.promote_types(gate.dtype, torch.float32))
        rate = torch.exp(self.a_log.float())
        if self.plain_heads:
            rate = torch.cat((rate.new_zeros(self.plain_heads), rate[self.plain_heads:]))
        return -rate[:, None] * F.softplus(gate)

    def forward(self, x: torch.Tensor, state: dict | None = None):
        """x (B, N, D) → y; with `state` (from `init_state`), (y, the state after x)."""
        bsz, n, _ = x.shape
        new = {}
        p = self.qkv(autocast_read(x))
        if self.conv is not None:
            if state is None:
                p = self.conv(p)
            else:
                p, new["conv"] = self.conv(p, state["conv"])
        q, k, v = p.view(bsz, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = elu_feature(q), elu_feature(k)
        carried = None if state is None else (state["s"], state["z"])
        self.ran_backend = resolve_backend(self.backend, x.device)
        if self.gamma is not None and self.recompute and self.ran_backend == "torch" and (
                state is None and torch.is_grad_enabled()):
            y = checkpoint(_decayed_output, q, k, v, self.log_decay(x), self.chunk,
                           use_reentrant=False, preserve_rng_state=False)
        elif self.gamma is not None:
            y, (s, z) = decayed_linear_attention(q, k, v, self.log_decay(x), carried,
                                                 chunk=self.chunk, backend=self.ran_backend)
        elif self.ran_backend == "fla":
            y, (s, z) = linear_attention_fla(q, k, v, carried)
        else:
            y, (s, z) = linear_attention_chunked(q, k, v, carried, chunk=self.chunk)
        y = y.transpose(1, 2)  # (B, N, H, Dh)
        if self.gate is not None:
            y = gated_out(y, self.head_gain, self.gate(autocast_read(x)))
        y = self.out(y.reshape(bsz, n, -1))
        if state is None:
            return y
        return y, {**new, "s": s, "z": z}
