"""Complex-valued layers on planar storage (DESIGN §3.4).

A complex activation of D channels is one real tensor (…, 2D): the real parts in the first D
entries of the last dim, the imaginary parts in the last D. In bf16 or fp16 that is 4 bytes a
complex value, half of complex64, and every product is a real GEMM or elementwise op, so
autocast, fused optimizers and any device work as for a real model. `to_planar` and
`from_planar` convert to and from torch's complex dtypes; each layer's `*_reference` twin
computes the same map on complex tensors (the tests bind the two in complex128).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from muse.layers.cast import autocast_read
from muse.ops.complex_scan import complex_decayed_cumsum
from muse.ops.complex_scan.selective import complex_gated_selective_scan


def to_planar(z: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Complex (…, D) → real (…, 2D) [re | im]."""
    x = torch.cat((z.real, z.imag), dim=-1)
    return x if dtype is None else x.to(dtype)


def from_planar(x: torch.Tensor) -> torch.Tensor:
    """Real (…, 2D) [re | im] → complex (…, D) (complex64 from float32 or lower, else 128)."""
    d = x.shape[-1] // 2
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.complex(wide[..., :d], wide[..., d:])


def planes(x: torch.Tensor) -> torch.Tensor:
    """(…, 2D) → a (…, 2, D) view: plane 0 real, plane 1 imaginary."""
    return x.unflatten(-1, (2, x.shape[-1] // 2))


def complex_mul(x: torch.Tensor, w_re: torch.Tensor, w_im: torch.Tensor) -> torch.Tensor:
    """Planar x (…, 2D) times the complex vector w = w_re + i·w_im (D,), elementwise."""
    p = planes(x)
    re = p[..., 0, :] * w_re - p[..., 1, :] * w_im
    im = p[..., 0, :] * w_im + p[..., 1, :] * w_re
    return torch.cat((re, im), dim=-1)


class ComplexLinear(nn.Module):
    """y = W z + b with complex W (out × in) and b, as one real GEMM on planar storage:
    [y_re | y_im] = [z_re | z_im] · [[W_re, W_im], [−W_im, W_re]] (the 2 × 2 real form of a
    complex number), so one matmul instead of four."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True, std: float | None = None):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.weight_re = nn.Parameter(torch.empty(d_out, d_in))
        self.weight_im = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(2 * d_out)) if bias else None
        self.reset_parameters(std)

    def reset_parameters(self, std: float | None = None) -> None:
        """Each plane N(0, std²); by default E|W_ij|² = 1/d_in (complex Glorot, fan-in)."""
        std = 1 / math.sqrt(2 * self.d_in) if std is None else std
        nn.init.normal_(self.weight_re, std=std)
        nn.init.normal_(self.weight_im, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def real_weight(self) -> torch.Tensor:
        """The (2·out × 2·in) real matrix that acts on planar vectors."""
        top = torch.cat((self.weight_re, -self.weight_im), dim=1)
        bottom = torch.cat((self.weight_im, self.weight_re), dim=1)
        return torch.cat((top, bottom), dim=0)

    def complex_weight(self) -> torch.Tensor:
        return torch.complex(self.weight_re, self.weight_im)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.real_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.d_in} → {self.d_out} complex, bias={self.bias is not None}"


def complex_linear_reference(z: torch.Tensor, layer: ComplexLinear) -> torch.Tensor:
    w = layer.complex_weight().to(z.dtype)
    out = z @ w.transpose(0, 1)
    return out if layer.bias is None else out + from_planar(layer.bias).to(z.dtype)


def _modrelu_scale(p: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ReLU(|z| + b)/|z| per channel (…, D) from the planes p (…, 2, D); 0 where z = 0."""
    sq = p.pow(2).sum(dim=-2)  # |z|², (…, D)
    nonzero = sq > 0
    mod = torch.sqrt(torch.where(nonzero, sq, 1))
    return torch.where(nonzero, F.relu(mod + bias.to(mod.dtype)) / mod, 0)


class _ModReLU(torch.autograd.Function):
    """modReLU(z) (· SiLU(a) per channel, with a gate logit a) as one autograd node: it keeps z
    and a as given and forms |z|, the scale and SiLU(a) again in backward (elementwise over
    N × D), where autograd through the ops keeps |z|, its mask, ReLU(|z| + b), the scale, the
    output and both halves of the doubled gate besides. The forward runs the plain ops in the
    plain order, so values are bit for bit theirs; backward is the closed form, in float32 at
    least (the gradients agree with autograd's in float64)."""

    @staticmethod
    def forward(ctx, x, bias, gate):
        p = planes(x)
        out = (p * _modrelu_scale(p, bias).unsqueeze(-2)).flatten(-2)
        ctx.save_for_backward(x, bias, gate)
        if gate is None:
            return out
        g = F.silu(gate)
        return out * torch.cat((g, g), dim=-1).to(out.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, bias, gate = ctx.saved_tensors
        need_x, need_bias, need_gate = ctx.needs_input_grad
        wide = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            p, gp = planes(x.to(wide)), planes(grad.to(wide))
            sq = p.pow(2).sum(dim=-2)
            nonzero = sq > 0
            mod = torch.sqrt(torch.where(nonzero, sq, 1))
            shifted = mod + bias.to(wide)
            on = nonzero & (shifted > 0)  # where the scale moves with |z| and b (ReLU open)
            scale = torch.where(on, shifted / mod, 0)
            dot = (gp * p).sum(dim=-2)  # Re(conj(grad) · z) per channel, (…, D)
            grad_gate = None
            if gate is not None:
                a = gate.to(wide)
                sig = torch.sigmoid(a)
                if need_gate:
                    grad_gate = (dot * scale * sig * (1 + a * (1 - sig))).to(gate.dtype)
                silu = a * sig
                gp, dot = gp * silu.unsqueeze(-2), dot * silu
            grad_x = grad_bias = None
            if need_x:
                # ∂(s·p)/∂p = s + p ⊗ p · s'(|z|)/|z|, s'(m) = (1 − s)/m where ReLU is open
                radial = torch.where(on, dot * (1 - scale) / torch.where(on, sq, 1), 0)
                grad_x = (gp * scale.unsqueeze(-2) + p * radial.unsqueeze(-2)).flatten(-2)
                grad_x = grad_x.to(x.dtype)
            if need_bias:
                grad_bias = torch.where(on, dot / mod, 0).reshape(-1, bias.shape[-1]).sum(0)
                grad_bias = grad_bias.to(bias.dtype)
        return grad_x, grad_bias, grad_gate


class ModReLU(nn.Module):
    """modReLU (Arjovsky et al. 2016): z ↦ ReLU(|z| + b) · z/|z| per channel, b real; the phase
    passes through, the modulus is thresholded. At z = 0 the output is 0 (and so is its
    gradient): the square root and the division only see |z|² where it is > 0.

    With `gate` (…, D), a logit per channel, the output is also scaled by SiLU(gate) (both
    planes). For backward it keeps its input and the logit only (_ModReLU)."""

    def __init__(self, features: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return _ModReLU.apply(x, self.bias, gate)


def modrelu_reference(z: torch.Tensor, layer: ModReLU) -> torch.Tensor:
    mod = z.abs()
    return torch.where(mod > 0, F.relu(mod + layer.bias.to(mod.dtype)) / mod, 0) * z


class _ComplexLayerNorm(torch.autograd.Function):
    """The complex LN as one autograd node: it keeps its input x as given and the per-token
    statistics (the mean of each plane in x's dtype, 1/√(E|z − μ|² + ε) in float32 at least),
    where autograd through the ops keeps the centred planes and their scaled copy (float32 for
    a float32 residual stream). The forward runs the plain ops in the plain order, so values are
    bit for bit theirs; backward is the closed form, in float32 at least."""

    @staticmethod
    def forward(ctx, x, weight, bias, features: int, eps: float):
        p = planes(x)
        mean = p.mean(dim=-1, keepdim=True)
        p = p - mean
        # E|z − μ|² = (Σ over both planes of the squares) / D, accumulated in float32 at least
        wide = torch.promote_types(p.dtype, torch.float32)
        sq = torch.linalg.vector_norm(p, dim=(-2, -1), keepdim=True, dtype=wide).pow(2)
        rstd = torch.rsqrt(sq / features + eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.features = features
        scale = rstd.to(p.dtype)
        return (p * scale * weight.to(p.dtype)).flatten(-2) + bias.to(p.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        wide = rstd.dtype
        with torch.autocast(x.device.type, enabled=False):
            xhat = (planes(x) - mean).to(wide) * rstd  # (…, 2, D)
            gy = planes(grad.to(wide))
            grad_x = grad_weight = grad_bias = None
            if need_bias:
                grad_bias = gy.reshape(-1, 2 * ctx.features).sum(0).to(weight.dtype)
            if need_weight:
                grad_weight = (gy * xhat).reshape(-1, ctx.features).sum(0).to(weight.dtype)
            if need_x:
                gxh = gy * weight.to(wide)
                dot = (gxh * xhat).sum(dim=(-2, -1), keepdim=True) / ctx.features
                gc = rstd * (gxh - xhat * dot)
                grad_x = (gc - gc.mean(dim=-1, keepdim=True)).flatten(-2).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None


class ComplexLayerNorm(nn.Module):
    """ẑ = (z − μ) / √(E|z − μ|² + ε), then γ ⊙ ẑ + β: complex mean μ, real gain γ, complex
    shift β. Centring and scaling are rotation-equivariant (a common phase passes through).
    For backward it keeps its input and the per-token statistics (_ComplexLayerNorm)."""

    def __init__(self, features: int, eps: float = 1e-5):
        super().__init__()
        self.features, self.eps = features, eps
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(2 * features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ComplexLayerNorm.apply(x, self.weight, self.bias, self.features, self.eps)


def complex_layer_norm_reference(z: torch.Tensor, layer: ComplexLayerNorm) -> torch.Tensor:
    c = z - z.mean(dim=-1, keepdim=True)
    var = c.abs().pow(2).mean(dim=-1, keepdim=True)
    beta = from_planar(layer.bias).to(z.dtype)
    return c / torch.sqrt(var + layer.eps) * layer.weight.to(var.dtype) + beta


class ComplexEmbedding(nn.Module):
    """Two tables (real and imaginary parts, V × D each) → planar (B, N, 2D)."""

    def __init__(self, vocab_size: int, features: int, std: float = 0.02):
        super().__init__()
        self.real = nn.Embedding(vocab_size, features)
        self.imag = nn.Embedding(vocab_size, features)
        nn.init.normal_(self.real.weight, std=std)
        nn.init.normal_(self.imag.weight, std=std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.real(ids), self.imag(ids)), dim=-1)


class RealPart(nn.Module):
    """Planar (…, 2D) → its real plane (…, D)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : x.shape[-1] // 2]


class ComplexDiagonalRecurrence(nn.Module):
    """Planar x (B, N, 2·d_in) → h (B, N, 2·d_state): h_t = λ ⊙ h_{t−1} + γ ⊙ B x_t per channel,
    λ = exp(−softplus(ν) + iω), B a ComplexLinear without bias, computed by the complex scan
    (ops.complex_scan: the chunked PyTorch form, one Triton scan each way on CUDA).

    γ = √(1 − |λ|²) is the LRU's input normalisation (Orvieto et al. 2023): it keeps E|h|²
    near E|Bx|² whatever |λ|, where unnormalised a channel with |λ| = 0.999 would read out ~30×
    its input. Init: −log|λ| log-uniform in [1e-3, 0.1] (memories of ~10 to ~1000 tokens) and
    ω uniform in [0, max_phase] (the LRU's ring initialisation, max phase π/10)."""

    def __init__(self, d_in: int, d_state: int, chunk: int = 64,
                 decay_range: tuple[float, float] = (1e-3, 0.1), max_phase: float = math.pi / 10,
                 selective_rank: int = 0):
        super().__init__()
        self.d_state, self.chunk = d_state, chunk
        self.proj_in = ComplexLinear(d_in, d_state, bias=False)
        rate = torch.exp(torch.empty(d_state).uniform_(*map(math.log, decay_range)))
        self.nu = nn.Parameter(rate + torch.log(-torch.expm1(-rate)))  # softplus⁻¹(rate)
        self.omega = nn.Parameter(torch.empty(d_state).uniform_(0.0, max_phase))
        # selective_rank > 0: |λ_t| = exp(−softplus(ν + W₂W₁ x_t)), chosen by the input through
        # a rank-r map (Mamba's Δ); W₂ = 0 at init, so the layer starts time-invariant
        self.select = (nn.Sequential(nn.Linear(2 * d_in, selective_rank, bias=False),
                                     nn.Linear(selective_rank, d_state, bias=False))
                       if selective_rank else None)
        if self.select is not None:
            nn.init.zeros_(self.select[1].weight)

    def log_decay(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log|λ|, arg λ): each (d_state,), or log|λ| (B, N, d_state) for planar x (B, N,
        2·d_in) when the layer is selective."""
        if self.select is None or x is None:
            return -F.softplus(self.nu), self.omega
        shift = self.select(x)
        shift = shift.to(torch.promote_types(shift.dtype, torch.float32))
        return -F.softplus(self.nu + shift), self.omega

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        """With `state` (h before x, planar (B, 2·d_state)) also returns h after the last token."""
        if self.select is not None:
            return self._selective(x, state)
        log_mag, angle = self.log_decay()
        gain = torch.sqrt(-torch.expm1(2 * log_mag)).to(x.dtype)
        u = self.proj_in(x) * torch.cat((gain, gain))
        if state is not None:  # h_0 = λ h_{−1} + u_0: the carried state enters with the first input
            lam = torch.exp(log_mag) * torch.cos(angle), torch.exp(log_mag) * torch.sin(angle)
            carried = complex_mul(state[:, None].to(u.dtype), *(p.to(u.dtype) for p in lam))
            first = u[:, :1] + carried
            u = torch.cat((first, u[:, 1:]), dim=1)
        if u.is_cuda:  # one Triton launch each way instead of the chunked form's dozens of ops
            from muse.ops.complex_scan.triton import complex_decayed_cumsum_triton

            h = complex_decayed_cumsum_triton(u, log_mag, angle)
        else:
            h = complex_decayed_cumsum(u, log_mag, angle, self.chunk)
        if state is None:
            return h
        # carried in float32 at least, whatever precision this segment's path computed in
        return h, h[:, -1].to(torch.promote_types(h.dtype, torch.float32))

    def _selective(self, x: torch.Tensor, state: torch.Tensor | None):
        # the decays, the gain and u are formed inside the scan's node: for backward it keeps the
        # shift (z − ν) and the projection in their own dtypes and the scanned planes, not them
        # both projections read one autocast copy of x, shared with the block's gate (layers.cast)
        read = autocast_read(x)
        shift = self.select(read)
        p = self.proj_in(read)
        carry = None if state is None else self._carried(state, shift[:, 0])
        h = complex_gated_selective_scan(p, shift, self.omega, self.nu, carry)
        out = h.to(torch.promote_types(p.dtype, x.dtype))
        return out if state is None else (out, h[:, -1])

    def _carried(self, state: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """λ_0 h_{−1} (B, 2·d_state): the carried state as it enters the first step."""
        shift = shift.to(torch.promote_types(shift.dtype, torch.float32))
        mag = torch.exp(-F.softplus(self.nu + shift))
        return complex_mul(state, mag * torch.cos(self.omega), mag * torch.sin(self.omega))

    def extra_repr(self) -> str:
        return f"d_state={self.d_state}, chunk={self.chunk}, selective={self.select is not None}"
