"""Dissipative Hebbian fast weights (DESIGN §3.3), per head of size D_h:

    W_t = exp(−Γ_t·dt) · W_{t−1} + η · k_t v_tᵀ,        y_t = W_tᵀ q_t,      Γ_t ≥ 0.

This is gated linear attention with a scalar decay per head and step. With the log-decays
b_t = Σ_{s≤t} −Γ_s·dt it reads y_t = η Σ_{j≤t} e^{b_t − b_j} (q_t·k_j) v_j (+ the decayed
initial state), computed in chunks of T: inside every chunk one masked (T × T) product, all
chunks in one batched call, and across chunks a carried (D_h × D_h) state. Every exponent is
a difference b_t − b_j ≤ 0 taken inside one chunk, so nothing overflows. The gradient flows
through time (the earlier project detached W at every step). `hebbian_naive` is the per-token
definition the tests bind to.

Backends: "torch" (the default, "auto") is the chunked form above and runs everywhere; on CUDA
its chunk-to-chunk state steps run as one Triton scan (muse.ops.decayed_scan_triton). "fla" is
flash-linear-attention's `chunk_simple_gla`, the field's kernels for exactly this recurrence,
CUDA only and opt-in: fla 0.6 refuses its backward on Hopper with Triton < 3.7.1 (a known
miscompile, fla issue #640), which is what the lent H100/H200 machines have (Triton 3.6).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from muse.layers.norm import rms_normalize

BACKENDS = ("auto", "fla", "torch")


def hebbian_naive(q, k, v, log_decay, eta: float = 1.0, state=None):
    """q, k (B, H, N, Dk), v (B, H, N, Dv), log_decay (B, H, N) ≤ 0 → y (B, H, N, Dv), W."""
    bsz, heads, n, dk = q.shape
    w = q.new_zeros(bsz, heads, dk, v.shape[-1]) if state is None else state
    out = []
    for t in range(n):
        w = torch.exp(log_decay[..., t])[..., None, None] * w
        w = w + eta * k[..., t, :, None] * v[..., t, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[..., t, :], w))
    return torch.stack(out, dim=2), w


def _pad_time(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    if size == 0:
        return x
    shape = list(x.shape)
    shape[dim] = size
    return torch.cat((x, x.new_zeros(shape)), dim=dim)


def hebbian_chunked(q, k, v, log_decay, eta: float = 1.0, state=None, chunk: int = 64):
    """Same contract as `hebbian_naive`; O(N·T) work in batched chunk products, O(N/T)
    carried (D_h × D_h) steps. Padding at the end uses log-decay 0 and zero keys, so it
    leaves the final state as it is."""
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")
    bsz, heads, n, dk = q.shape
    dv = v.shape[-1]
    m = -(-n // chunk)
    pad = m * chunk - n
    qc, kc, vc = (_pad_time(x, pad, 2).view(bsz, heads, m, chunk, -1) for x in (q, k, v))
    b = torch.cumsum(_pad_time(log_decay, pad, 2).view(bsz, heads, m, chunk), dim=-1)
    # b_t − b_j, with −∞ above the diagonal so that exp gives the causal mask itself
    lag = (b[..., :, None] - b[..., None, :]).masked_fill(_above(chunk, q.device), -torch.inf)
    # the decay factors are in [0, 1] and b is kept wide (float32 under autocast): each factor
    # is cast to the products' dtype only when formed, so fp16 weights work without autocast
    scores = (qc @ kc.transpose(-1, -2)) * torch.exp(lag).to(qc.dtype)
    # (η is applied only when it is not 1: on a GPU at batch 1 every op is a launch)
    intra = scores @ vc if eta == 1.0 else eta * (scores @ vc)  # (B, H, M, T, Dv)
    # what each chunk adds to the state at its end: η Σ_j e^{b_end − b_j} k_j v_jᵀ
    tail = torch.exp(b[..., -1:] - b)[..., None].to(kc.dtype)
    added = (kc * tail).transpose(-1, -2) @ vc  # (B, H, M, Dk, Dv)
    if eta != 1.0:
        added = eta * added
    # the carried state keeps the precision of the decays (float32 under bf16 autocast)
    acc = torch.promote_types(q.dtype, log_decay.dtype)
    if q.is_cuda and acc != torch.float64:  # the scan accumulates in float32
        w0 = None if state is None else state.to(acc)
        entering, w = _carry_scan(added.to(acc), b[..., -1].to(acc), w0)
    else:  # only the small state steps remain sequential
        through = torch.exp(b[..., -1])  # (B, H, M): decay across a whole chunk
        w = q.new_zeros(bsz, heads, dk, dv, dtype=acc) if state is None else state.to(acc)
        states = []
        for c in range(m):
            states.append(w)
            w = through[..., c, None, None] * w + added[:, :, c]
        entering = torch.stack(states, dim=2)
    inter = torch.exp(b)[..., None].to(qc.dtype) * (qc @ entering.to(qc.dtype))
    y = (intra + inter).reshape(bsz, heads, m * chunk, dv)[:, :, :n]
    return y, w


def _carry_scan(added, log_through, w0):
    """The chunk-to-chunk state recurrence W_c = e^{b_c} W_{c−1} + A_c as one Triton scan
    over the chunks (D_h² channels a head); a loop here cost a launch or two per 64 tokens.
    → (the state entering each chunk (B, H, M, Dk, Dv), the state after the last)."""
    from muse.ops.decayed_scan_triton import decayed_cumsum_triton

    bsz, heads, m, dk, dv = added.shape
    if w0 is None:  # a fresh start: nothing to fold in (and no zeros to launch)
        u = added.reshape(bsz * heads, m, dk * dv)
        w0 = added.new_zeros(bsz, heads, dk, dv)
    else:
        first = added[:, :, :1] + torch.exp(log_through[..., :1])[..., None, None] * w0[:, :, None]
        u = torch.cat((first, added[:, :, 1:]), dim=2).reshape(bsz * heads, m, dk * dv)
    ends = decayed_cumsum_triton(u, log_through.reshape(bsz * heads, m))
    ends = ends.view(bsz, heads, m, dk, dv)
    return torch.cat((w0[:, :, None].to(ends.dtype), ends[:, :, :-1]), dim=2), ends[:, :, -1]


@functools.lru_cache(maxsize=16)
def _above(chunk: int, device: torch.device) -> torch.Tensor:
    """(chunk × chunk) True above the diagonal: built once per size and device."""
    return torch.ones(chunk, chunk, dtype=torch.bool, device=device).triu(1)


def fla_available() -> bool:
    try:
        import fla.ops.simple_gla  # noqa: F401
    except ImportError:
        return False
    return True


def hebbian_fla(q, k, v, log_decay, eta: float = 1.0, state=None):
    """The same recurrence through fla's `chunk_simple_gla`, in fla's (B, N, H, D) layout.
    fla scales q·k by `scale` but its state carries no η, so η goes on the keys and the
    scale is 1: then fla's state is W exactly and carries over to the torch backends."""
    from fla.ops.simple_gla import chunk_simple_gla

    # the per-step log-decays are tiny (Γ down to 1e-4) and fla sums them within a chunk:
    # in bf16 that sum would lose them, so they go in as float32
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    y, w = chunk_simple_gla(
        q, k if eta == 1.0 else k * eta, v, g=log_decay.float(), scale=1.0,
        initial_state=None if state is None else state.float(), output_final_state=True,
    )
    return y, w


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"hebbian backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "fla":
        return "torch"
    if device.type != "cuda":
        raise RuntimeError(f"hebbian backend 'fla' needs a CUDA tensor, got {device}")
    if not fla_available():
        raise RuntimeError(
            "hebbian backend 'fla' needs flash-linear-attention: `pip install "
            "flash-linear-attention`, or use hebbian_backend='torch'"
        )
    return "fla"


class DissipativeHebbian(nn.Module):
    """(B, N, D) → (B, N, D). Γ_t = softplus(Linear(x_t)) per head, so forgetting is chosen by
    the input; η and dt are fixed scalars (η also scales keys at init)."""

    def __init__(self, *, d_model: int, n_heads: int, head_dim: int, eta: float = 1.0,
                 dt: float = 1.0, chunk: int = 64, backend: str = "auto", out_norm: bool = True,
                 gamma_init: tuple[float, float] = (-9.0, -3.0)):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"hebbian backend must be one of {BACKENDS}, got {backend!r}")
        self.n_heads, self.head_dim = n_heads, head_dim
        self.eta, self.dt, self.chunk, self.backend = eta, dt, chunk, backend
        self.out_norm = out_norm  # each head's read-out divided by its RMS (see layers.norm)
        self.qkv = nn.Linear(d_model, 3 * n_heads * head_dim, bias=False)
        self.gamma = nn.Linear(d_model, n_heads)
        # Γ ≈ softplus(bias) spread from 1e-4 to 5e-2 per step across heads at init: memories
        # of ~10k down to ~20 tokens. With bias 0 (Γ ≈ 0.7, decay 0.5 a step) the last token's
        # gradient at the first 128 of 1024 tokens underflowed to exactly 0 in float32.
        with torch.no_grad():
            self.gamma.bias.copy_(torch.linspace(*map(float, gamma_init), n_heads))
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                return_state: bool = False, gamma_offset: torch.Tensor | None = None,
                eta_scale: torch.Tensor | None = None):
        """x (B, N, D); `state` is W carried in, (B, H, D_h, D_h); with `return_state`,
        returns (y, W at the end). `gamma_offset` (B, H) ≥ 0 is added to every Γ_t and
        `eta_scale` (B, H) multiplies η, per head, for this call (the streaming SNR filter)."""
        bsz, n, _ = x.shape
        q, k, v = self.qkv(x).view(bsz, n, 3, self.n_heads, self.head_dim).unbind(2)
        # unit keys keep ‖W‖ bounded by η/(1 − e^{−Γ dt}); autocast runs the norm in float32,
        # and fla's kernels need q, k, v of one dtype
        k = F.normalize(k, dim=-1).to(q.dtype)
        if eta_scale is not None:
            # η multiplies every write k vᵀ, so a per-head η is a per-head scale on the keys
            k = k * eta_scale[:, None, :, None].to(k.dtype)
        gate = self.gamma(x)
        log_decay = -F.softplus(gate.to(torch.promote_types(gate.dtype, torch.float32)))
        if gamma_offset is not None:
            log_decay = log_decay - gamma_offset[:, None, :].to(log_decay.dtype)
        if self.dt != 1.0:
            log_decay = log_decay * self.dt  # (B, N, H)
        if resolve_backend(self.backend, x.device) == "fla":
            y, w = hebbian_fla(q, k, v, log_decay, self.eta, state)  # (B, N, H, D_h)
            y = y.to(q.dtype)
        else:
            heads_first = (t.transpose(1, 2) for t in (q, k, v))
            y, w = hebbian_chunked(*heads_first, log_decay.transpose(1, 2), self.eta, state,
                                   chunk=self.chunk)
            y = y.transpose(1, 2).to(q.dtype)
        if self.out_norm:
            y = rms_normalize(y)
        y = self.out(y.reshape(bsz, n, -1))
        return (y, w) if return_state else y
