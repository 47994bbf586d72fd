"""BKMixer: token mixing through the BK-Core resolvent diagonal (DESIGN §3.1–3.2).

Per token the layer projects a potential v ∈ ℝ^C and a coupling k ∈ ℝ^C to the next token;
each channel is one tridiagonal operator over the sequence, and the causal Green's function
g_i = [(T_{0..i} − z)⁻¹]_{ii} mixes every earlier token into position i in O(N).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from muse.layers.cast import autocast_read
from muse.ops.bk_core import bk_core


def _wide(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 → fp32 for the resolvent (fp32 accumulation); fp32 and fp64 stay as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class BKMixer(nn.Module):
    def __init__(
        self,
        *,
        d_model: int,
        channels: int,
        backend: str = "auto",
        z_imag_init: float | tuple[float, float] = -3.0,
    ):
        super().__init__()
        self.backend = backend
        self.potential = nn.Linear(d_model, channels)  # v: the diagonal
        self.coupling = nn.Linear(d_model, channels)  # k_i = softplus(·) between i and i+1
        self.a0 = nn.Parameter(torch.zeros(channels))
        # z per channel: Re z spread over the band so channels resonate differently;
        # Im z = softplus(·) + 1e-3 > 0 bounds |g| ≤ 1/Im z (stability by construction). Im z
        # also sets how far g reaches back: the smaller it is, the further.
        self.z_real = nn.Parameter(torch.linspace(-1.0, 1.0, channels))
        # A pair (lo, hi) spreads the pre-softplus Im z over the channels, so some channels
        # reach far back and others stay local: all far-reaching, the mixer blurs the nearby
        # context it is best at. The AR-SSM and Hebbian slow decays carry the long range.
        if isinstance(z_imag_init, (tuple, list)):
            lo, hi = map(float, z_imag_init)
            z_imag = torch.linspace(lo, hi, channels)
        else:
            z_imag = torch.full((channels,), float(z_imag_init))
        self.z_imag = nn.Parameter(z_imag)
        self.out = nn.Linear(2 * channels, d_model)

    def zero_out(self) -> None:
        """Start as a no-op sublayer: the residual stream learns first, then what g adds."""
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def shift(self) -> torch.Tensor:
        zr, zi = _wide(self.z_real), _wide(self.z_imag)
        return torch.complex(zr, F.softplus(zi) + 1e-3)

    def diagonal(self, x: torch.Tensor) -> torch.Tensor:
        """The potential a (B, N, C); Phase 2 overrides this with V − iΓ."""
        # every projection of x reads one autocast copy of it (layers.cast): backward keeps
        # that one, not one a projection
        return _wide(self.potential(autocast_read(x))) + _wide(self.a0)

    def init_carry(
        self, batch: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The boundary value before any token: zeros (B, C), complex."""
        ref = self.a0
        wide = torch.promote_types(dtype or ref.dtype, torch.float32) == torch.float64
        cdtype = torch.complex128 if wide else torch.complex64
        return torch.zeros(batch, ref.shape[0], device=device or ref.device, dtype=cdtype)

    def forward(
        self, x: torch.Tensor, carry: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D) → (B, N, D). With `carry` (B, C), the boundary value k_{−1}·g_{−1} left
        by the previous segment, also returns this segment's: the recurrence
        g_0 = 1/(α_0 − k_{−1} g_{−1}) resumes exactly where the last one stopped."""
        a = self.diagonal(x)
        if carry is None:
            # k_i couples i and i+1 and is computed from x_i, so g_i sees only x_{≤i}.
            k = F.softplus(_wide(self.coupling(autocast_read(x)[:, :-1])))
            g = bk_core(a, k, self.shift(), backend=self.backend, validate=False)
            return self.out(torch.cat((g.real, g.imag), dim=-1).to(x.dtype))
        # the last token's coupling reaches into the next segment, so here it is computed too
        k_all = F.softplus(_wide(self.coupling(autocast_read(x))))
        a = torch.cat((a[:, :1] - carry[:, None], a[:, 1:]), dim=1)
        g = bk_core(a, k_all[:, :-1], self.shift(), backend=self.backend, validate=False)
        out = self.out(torch.cat((g.real, g.imag), dim=-1).to(x.dtype))
        return out, k_all[:, -1] * g[:, -1]


class NonHermitianBKMixer(BKMixer):
    """Phase 2's potential (DESIGN §3.3): the diagonal is V − iΓ with
    Γ = softplus(Linear(x)) + Γ_base ≥ Γ_base > 0. Γ enters the resolvent itself:
    Im α = −Γ − Im z, so the dissipation tightens |g| ≤ 1/(Γ + Im z)."""

    def __init__(self, *, d_model: int, channels: int, gamma_base: float = 1e-3, **kwargs):
        super().__init__(d_model=d_model, channels=channels, **kwargs)
        self.dissipation = nn.Linear(d_model, channels)
        # Γ ≈ softplus(−5) ≈ 7e-3 at init: dissipative, yet the resolvent still reaches back
        # thousands of tokens (at Γ ≈ 0.7 it forgot within tens).
        nn.init.constant_(self.dissipation.bias, -5.0)
        self.gamma_base = gamma_base

    def gamma(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(_wide(self.dissipation(autocast_read(x)))) + self.gamma_base

    def diagonal(self, x: torch.Tensor) -> torch.Tensor:
        return torch.complex(super().diagonal(x), -self.gamma(x))
