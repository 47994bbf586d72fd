"""Dissipative Hebbian fast weights (DESIGN §3.3), per head of size D_h:

    W_t = exp(−Γ_t·dt) · W_{t−1} + η · k_t v_tᵀ,        y_t = W_tᵀ q_t,      Γ_t ≥ 0.

This is gated linear attention with a scalar decay per head and step. With the log-decays
b_t = Σ_{s≤t} −Γ_s·dt it reads y_t = η Σ_{j≤t} e^{b_t − b_j} (q_t·k_j) v_j (+ the decayed
initial state), computed in chunks of T: inside every chunk one masked (T × T) product, all
chunks in one batched call, and across chunks a carried (D_h × D_h) state. Every exponent is
a difference b_t − b_j ≤ 0 taken inside one chunk, so nothing overflows. The gradient flows
through time (W is never detached). `hebbian_naive` is the per-token definition the tests
bind to.

Backends: "torch" (the default, "auto") is the chunked form above and runs everywhere; on CUDA
its chunk-to-chunk state steps run as one Triton scan (muse.ops.decayed_scan.triton). "fla" is
flash-linear-attention's `chunk_simple_gla`, the field's kernels for exactly this recurrence,
CUDA only and opt-in: fla 0.6 refuses its backward on Hopper with Triton < 3.7.1 (a known
miscompile, fla issue #640).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from muse.layers.cast import autocast_operands, autocast_read
from muse.layers.decay import mamba2_a_log, mamba2_bias
from muse.layers.local_attention import rotary_local_attention
from muse.layers.norm import gated_out, rms_normalize
from muse.layers.short_conv import ShortConv
from muse.ops.decayed_scan.chunk import above_diagonal, pad_time
from muse.ops.delta_rule import STATES, delta_rule_chunked

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


def hebbian_chunked(q, k, v, log_decay, eta: float = 1.0, state=None, chunk: int = 64):
    """Same contract as `hebbian_naive`; O(N·T) work in batched chunk products, O(N/T)
    carried (D_h × D_h) steps. Padding at the end uses log-decay 0 and zero keys, so it
    leaves the final state as it is."""
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")
    bsz, heads, n, dk = q.shape
    if n == 1:  # decoding: one recurrent step, not one token padded to a chunk
        acc = torch.promote_types(q.dtype, log_decay.dtype)
        y, w = hebbian_naive(*(t.to(acc) for t in (q, k, v, log_decay)), eta,
                             None if state is None else state.to(acc))
        return y.to(q.dtype), w
    dv = v.shape[-1]
    m = -(-n // chunk)
    pad = m * chunk - n
    qc, kc, vc = (pad_time(x, pad, 2).view(bsz, heads, m, chunk, -1) for x in (q, k, v))
    b = torch.cumsum(pad_time(log_decay, pad, 2).view(bsz, heads, m, chunk), dim=-1)
    intra = intra_chunk(qc, kc, vc, b)  # (B, H, M, T, Dv)
    if eta != 1.0:  # (only when not 1: on a GPU at batch 1 every op is a launch)
        intra = eta * intra
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
        # unbound, not indexed per chunk: an index's backward is a full-size zero tensor
        for through_c, added_c in zip(through.unbind(-1), added.unbind(2), strict=True):
            states.append(w)
            w = through_c[..., None, None] * w + added_c
        entering = torch.stack(states, dim=2)
    inter = torch.exp(b)[..., None].to(qc.dtype) * (qc @ entering.to(qc.dtype))
    y = (intra + inter).reshape(bsz, heads, m * chunk, dv)[:, :, :n]
    return y, w


def intra_chunk(qc, kc, vc, b):
    """Within each chunk, y_i = Σ_{j≤i} e^{b_i − b_j} (q_i·k_j) v_j: qc, kc (…, T, Dk), vc
    (…, T, Dv), b (…, T) the log-decays summed from the chunk's start (kept wide: float32
    under autocast) → (…, T, Dv) in the products' dtype (autocast's, where it is on).
    Backward keeps only the inputs, which the chunked form holds anyway, and forms the
    (T × T) scores again: none of the chunk's T × T products is kept."""
    qc, kc, vc = autocast_operands(qc, kc, vc)
    with torch.autocast(qc.device.type, enabled=False):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (qc, kc, vc, b)):
            return _IntraChunk.apply(qc, kc, vc, b)
        return _intra_scores(qc, kc, b)[0] @ vc


def _intra_scores(qc, kc, b):
    """(scores (q_i·k_j) e^{b_i − b_j} below the diagonal, 0 above; q·k; the decay factors
    in the products' dtype; the same, wide)."""
    # b_i − b_j, with −∞ above the diagonal so that exp gives the causal mask itself
    lag = (b[..., :, None] - b[..., None, :]).masked_fill(above_diagonal(b.shape[-1], b.device),
                                                          -torch.inf)
    # the factors are in [0, 1]: cast to the products' dtype only when formed, so fp16 works
    wide = torch.exp(lag)
    qk = qc @ kc.transpose(-1, -2)
    decay = wide.to(qk.dtype)
    return qk * decay, qk, decay, wide


class _IntraChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qc, kc, vc, b):
        ctx.save_for_backward(qc, kc, vc, b)
        return _intra_scores(qc, kc, b)[0] @ vc

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        qc, kc, vc, b = ctx.saved_tensors
        scores, qk, decay, wide = _intra_scores(qc, kc, b)
        dy = dy.to(vc.dtype)
        d_scores = dy @ vc.transpose(-1, -2)
        d_qk = d_scores * decay
        # ∂lag = ∂decay · decay (0 above the diagonal); b_i enters with +, b_j with −
        d_lag = (d_scores * qk).to(wide.dtype) * wide
        return (d_qk @ kc, d_qk.transpose(-1, -2) @ qc, scores.transpose(-1, -2) @ dy,
                (d_lag.sum(-1) - d_lag.sum(-2)).to(b.dtype))


def _carry_scan(added, log_through, w0):
    """The chunk-to-chunk state recurrence W_c = e^{b_c} W_{c−1} + A_c as one Triton scan
    over the chunks (D_h² channels a head); a loop here cost a launch or two per 64 tokens.
    → (the state entering each chunk (B, H, M, Dk, Dv), the state after the last)."""
    from muse.ops.decayed_scan.triton import decayed_cumsum_triton

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


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """t laid out densely in its own order (a copy where it is a strided view)."""
    return t.contiguous()


DECAYS = ("softplus", "mamba2")
QK_NORMS = ("k", "l2")


class DissipativeHebbian(nn.Module):
    """(B, N, D) → (B, N, D). Γ_t ≥ 0 per head is chosen by the input; η and dt are fixed.

    The read-out options close the gap to attention the way gated linear-attention models do
    (QUALITY.md): `conv` a short causal conv + SiLU on q, k, v; `qk_norm="l2"` unit q and k
    (default "k": unit keys only); `decay="mamba2"` Γ_t = A·softplus(w·x_t + b) with A spread
    over [1, 16] and softplus(b) log-uniform in `dt_range` (default [1e-3, 0.1]; "softplus": Γ_t =
    softplus(w·x_t + b), b spread by `gamma_init`); `out_gate` a per-head RMSNorm with a gain,
    times SiLU(W_g x); `local_window` w > 0 adds exact softmax attention over the last w tokens
    on the same q, k, v (rotary positions), mixed per head and token with the fast-weight
    read-out by a learned gate σ(W_m x) — both read-outs RMS-normalised first. `delta=True`
    erases before it writes (the gated delta rule, muse.ops.delta_rule) with a write strength
    β_t = η·σ(w_β·x_t) per head; with it, `plain_heads` h keeps the first h heads on the plain
    rule, `recompute` forms the delta rule's chunk products again in backward instead of
    keeping them, and `states` picks its chunk-to-chunk pass (muse.ops.delta_rule.STATES)."""

    def __init__(self, *, d_model: int, n_heads: int, head_dim: int, eta: float = 1.0,
                 dt: float = 1.0, chunk: int = 64, backend: str = "auto", out_norm: bool = True,
                 gamma_init: tuple[float, float] = (-9.0, -3.0), conv: int = 0,
                 qk_norm: str = "k", decay: str = "softplus", out_gate: bool = False,
                 local_window: int = 0, rope_base: float = 10000.0, delta: bool = False,
                 dt_range: tuple[float, float] = (1e-3, 0.1), plain_heads: int = 0,
                 recompute: bool = False, states: str = "auto"):
        super().__init__()
        if states not in STATES:
            raise ValueError(f"hebbian states must be one of {STATES}, got {states!r}")
        if backend not in BACKENDS:
            raise ValueError(f"hebbian backend must be one of {BACKENDS}, got {backend!r}")
        if decay not in DECAYS:
            raise ValueError(f"hebbian decay must be one of {DECAYS}, got {decay!r}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"hebbian qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        if delta and not 0 < eta <= 1:
            raise ValueError(f"the delta rule needs 0 < eta ≤ 1 (β = η·σ(·) ≤ 1), got {eta}")
        if delta and backend == "fla":
            raise ValueError("hebbian backend 'fla' runs the plain rule; the delta rule runs on "
                             "backend 'torch' or 'auto'")
        # without the delta rule every head is plain already, and any count of them says so
        if plain_heads < 0 or (delta and plain_heads >= n_heads):
            raise ValueError(f"hebbian plain_heads must be in [0, n_heads − 1 = {n_heads - 1}] "
                             f"with the delta rule, got {plain_heads}")
        if conv < 0 or local_window < 0:
            raise ValueError(f"conv and local_window must be ≥ 0, got {conv}, {local_window}")
        self.n_heads, self.head_dim = n_heads, head_dim
        # the first (slowest-decaying) heads write without erasing: a path that keeps what
        # was written long ago, which the delta rule's erasure overwrites within ~D_h/β writes
        self.plain_heads = plain_heads
        self.recompute = recompute  # the delta rule's chunk form again in backward, not kept
        self.states = states
        self.eta, self.dt, self.chunk, self.backend = eta, dt, chunk, backend
        self.out_norm = out_norm  # each head's read-out divided by its RMS (see layers.norm)
        self.qk_norm, self.decay, self.local_window, self.rope_base = (
            qk_norm, decay, local_window, rope_base)
        inner = n_heads * head_dim
        self.qkv = nn.Linear(d_model, 3 * inner, bias=False)
        self.conv = ShortConv(3 * inner, conv) if conv else None
        self.gamma = nn.Linear(d_model, n_heads)
        with torch.no_grad():
            if decay == "softplus":
                # Γ ≈ softplus(bias) spread from 1e-4 to 5e-2 per step across heads at init:
                # memories of ~10k down to ~20 tokens. With bias 0 (Γ ≈ 0.7, decay 0.5 a step)
                # the last token's gradient at the first 128 of 1024 tokens underflowed to 0.
                self.gamma.bias.copy_(torch.linspace(*map(float, gamma_init), n_heads))
            else:
                # Mamba2's start: per-step decays e^{−A·dt} from ≈ 0.2 to ≈ 1 across heads
                try:
                    self.gamma.bias.copy_(mamba2_bias(n_heads, dt_range))
                except ValueError as exc:
                    raise ValueError(f"hebbian {exc}") from None
        if decay == "mamba2":
            self.a_log = nn.Parameter(mamba2_a_log(n_heads))
        self.beta = nn.Linear(d_model, n_heads) if delta else None  # σ(0) = ½ at the start
        if delta:
            nn.init.zeros_(self.beta.bias)
        self.mix = nn.Linear(d_model, n_heads) if local_window else None
        self.gate = nn.Linear(d_model, inner, bias=False) if out_gate else None
        self.head_gain = nn.Parameter(torch.ones(head_dim)) if out_gate else None
        self.out = nn.Linear(inner, d_model, bias=False)

    last_log_decay: torch.Tensor | None = None

    def init_tails(self, batch: int, device=None, dtype=None) -> dict:
        """What besides W a stream carries: the conv's last inputs, the window's keys/values."""
        tails = {}
        if self.conv is not None:
            tails["conv"] = self.conv.init_tail(batch, device, dtype)
        if self.local_window:
            ref = self.qkv.weight
            shape = (batch, self.n_heads, 0, self.head_dim)
            empty = torch.zeros(shape, device=device or ref.device, dtype=dtype or ref.dtype)
            tails["k"], tails["v"] = empty, empty.clone()
        return tails

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """−Γ_t·dt per head, (B, N, H), in float32 at least."""
        # softplus on heads-first rows, as its readers lay them out: a transposed gradient
        # into softplus breaks the gate's view in a traced (aot) backward
        gate = self.gamma(autocast_read(x)).transpose(1, 2).contiguous()
        gate = gate.to(torch.promote_types(gate.dtype, torch.float32))
        if self.decay == "mamba2":
            log_decay = -torch.exp(self.a_log.float())[:, None] * F.softplus(gate) * self.dt
        else:
            log_decay = -F.softplus(gate)
            log_decay = log_decay * self.dt if self.dt != 1.0 else log_decay
        return log_decay.transpose(1, 2)

    def _delta(self, q, k, v, log_decay, beta, state, eta_scale):
        """The delta rule on heads plain_heads… and the plain rule (η, no erasing) on the first
        plain_heads: (B, N, H, D_h) in, y (B, N, H, D_h) and W (B, H, D_h, D_h) out."""
        h = self.plain_heads
        qh, kh, vh, ld, bh = (t.transpose(1, 2) for t in (q, k, v, log_decay, beta))
        y, w = delta_rule_chunked(qh[:, h:], kh[:, h:], vh[:, h:], ld[:, h:], bh[:, h:],
                                  state=None if state is None else state[:, h:], chunk=self.chunk,
                                  recompute=self.recompute, states=self.states)
        if h:
            keys = kh[:, :h]
            if eta_scale is not None:  # η per head scales the plain heads' writes, as β's
                keys = keys * eta_scale[:, :h, None, None].to(keys.dtype)
            # laid out (B, h, N, D_h) once: as head slices of (B, N, H, D_h) each batched
            # product would make (and autograd keep) contiguous copies of its own
            qp, kp, vp = (_contiguous(t) for t in (qh[:, :h], keys, vh[:, :h]))
            y0, w0 = hebbian_chunked(qp, kp, vp, ld[:, :h], self.eta,
                                     None if state is None else state[:, :h], chunk=self.chunk)
            y = torch.cat((y0.to(y.dtype), y), dim=1)
            w = torch.cat((w0.to(w.dtype), w), dim=1)
        return y.transpose(1, 2).to(q.dtype), w

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                return_state: bool = False, gamma_offset: torch.Tensor | None = None,
                eta_scale: torch.Tensor | None = None, tails: dict | None = None):
        """x (B, N, D); `state` is W carried in, (B, H, D_h, D_h); with `return_state`,
        returns (y, W at the end), and with `tails` (from `init_tails`) also the next tails.
        `gamma_offset` (B, H) ≥ 0 is added to every Γ_t and `eta_scale` (B, H) multiplies η,
        per head, for this call (the streaming SNR filter)."""
        bsz, n, _ = x.shape
        new_tails = {}
        # the projections of x (qkv, β, Γ, the gate, the mix) read one autocast copy of it:
        # backward keeps one, not one a projection, and each reader's gradient still goes back
        # to x's dtype before they add up, as through autocast's own casts (layers.cast)
        p = self.qkv(autocast_read(x))
        if self.conv is not None:
            if tails is None:
                p = self.conv(p)
            else:
                p, new_tails["conv"] = self.conv(p, tails["conv"])
        q, k, v = p.view(bsz, n, 3, self.n_heads, self.head_dim).unbind(2)
        raw_q, raw_k = q, k
        # unit keys keep ‖W‖ bounded by η/(1 − e^{−Γ dt}); autocast runs the norm in float32,
        # and fla's kernels need q, k, v of one dtype
        k = F.normalize(k, dim=-1).to(q.dtype)
        if self.qk_norm == "l2":
            q = F.normalize(q, dim=-1).to(k.dtype)
        beta = None
        if self.beta is not None:  # the write strength is β; the keys stay unit
            logit = self.beta(autocast_read(x))
            beta = torch.sigmoid(logit.to(torch.promote_types(logit.dtype, torch.float32)))
            beta = beta * self.eta if self.eta != 1.0 else beta
            if eta_scale is not None:
                beta = beta * eta_scale[:, None, :].to(beta.dtype)
        elif eta_scale is not None:
            # η multiplies every write k vᵀ, so a per-head η is a per-head scale on the keys
            k = k * eta_scale[:, None, :, None].to(k.dtype)
        log_decay = self.log_decay(x)
        # kept for diagnostics, reduced only when they are read
        self.last_log_decay = log_decay.detach()
        if gamma_offset is not None:
            log_decay = log_decay - gamma_offset[:, None, :].to(log_decay.dtype) * self.dt
        if beta is not None:
            y, w = self._delta(q, k, v, log_decay, beta, state, eta_scale)
        elif resolve_backend(self.backend, x.device) == "fla":
            y, w = hebbian_fla(q, k, v, log_decay, self.eta, state)  # (B, N, H, D_h)
            y = y.to(q.dtype)
        else:
            heads_first = (t.transpose(1, 2) for t in (q, k, v))
            y, w = hebbian_chunked(*heads_first, log_decay.transpose(1, 2), self.eta, state,
                                   chunk=self.chunk)
            y = y.transpose(1, 2).to(q.dtype)
        if self.local_window:
            past = None if tails is None else (tails["k"], tails["v"])
            local, past = rotary_local_attention(
                *(t.transpose(1, 2) for t in (raw_q, raw_k, v)), self.local_window,
                self.rope_base, past)
            if tails is not None:
                new_tails["k"], new_tails["v"] = past
            g = torch.sigmoid(self.mix(autocast_read(x)))[..., None]  # (B, N, H, 1)
            y = g * rms_normalize(local.transpose(1, 2)) + (1 - g) * rms_normalize(y)
        if self.gate is not None:
            y = gated_out(y, self.head_gain, self.gate(autocast_read(x)))
        elif self.out_norm:
            y = rms_normalize(y)
        y = self.out(y.reshape(bsz, n, -1))
        if not return_state:
            return y
        return (y, w, new_tails) if tails is not None else (y, w)


def decay_diagnostics(model: nn.Module) -> dict[str, float]:
    """The Hebbian heads' per-step decay e^{mean log α} in the last forward, over every head of
    every layer: min, median and max (α near 1: memory of ~1/(1 − α) tokens)."""
    heads = [m.last_log_decay for m in model.modules()
             if isinstance(m, DissipativeHebbian) and m.last_log_decay is not None]
    if not heads:
        return {}
    alpha = torch.exp(torch.cat([h.mean(dim=(0, 1)) for h in heads]).float())
    return {"decay_min": float(alpha.min()), "decay_median": float(alpha.median()),
            "decay_max": float(alpha.max())}
