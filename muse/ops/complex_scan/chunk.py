"""h_t = λ ⊙ h_{t−1} + u_t with a time-invariant complex decay λ = exp(log|λ| + iθ) per channel,
in chunked matrix form: the complex counterpart of `decayed_cumsum`.

Inside a chunk of T steps the recurrence is one lower-triangular Toeplitz matrix of powers
λ^{t−j} per channel, applied as a batched product; the chunk end states obey the same
recurrence with λ^T, one level up; each chunk then adds λ^{t+1} times the state carried in.

`u` is either a complex tensor or planar real storage: (…, 2R) with the real parts in the first
R entries of the last dim and the imaginary parts in the last R, in any real dtype (bf16: 4
bytes a complex value). Planar products run as real einsums (λ^k · u = (P_re u_re − P_im u_im)
+ i(P_re u_im + P_im u_re)) in u's dtype; the powers are formed in float64 from (T, R)
exponents, so no angle k·θ loses precision, and the state carried between chunks (1/T of the
activations) is kept in float32 at least.
"""

from __future__ import annotations

import torch


def _powers(lags: torch.Tensor, log_mag: torch.Tensor, angle: torch.Tensor):
    """λ^k for the lags k (L,) ≥ 0: (real, imaginary) parts, each (L, R), in float64."""
    k = lags.to(torch.float64)[:, None]
    mag = torch.exp(k * log_mag.to(torch.float64))
    phase = k * angle.to(torch.float64)
    return mag * torch.cos(phase), mag * torch.sin(phase)


def _toeplitz(p_re: torch.Tensor, p_im: torch.Tensor, n: int):
    """(n, n, R) planes of λ^{t−j} below and on the diagonal, 0 above, from the powers of 0..n−1."""
    t = torch.arange(n, device=p_re.device)
    lag = t[:, None] - t[None, :]
    idx = lag.clamp_min(0)
    keep = (lag >= 0)[..., None]
    return (torch.where(keep, p_re[idx], 0.0), torch.where(keep, p_im[idx], 0.0))


def _mul(u: torch.Tensor, p_re: torch.Tensor, p_im: torch.Tensor, eq: str) -> torch.Tensor:
    """The einsum `eq` of the complex powers (p_re + i p_im) with u, complex or planar."""
    if u.is_complex():
        return torch.einsum(eq, torch.complex(p_re, p_im).to(u.dtype), u)
    r = u.shape[-1] // 2
    u_re, u_im = u[..., :r], u[..., r:]
    p_re, p_im = p_re.to(u.dtype), p_im.to(u.dtype)
    re = torch.einsum(eq, p_re, u_re) - torch.einsum(eq, p_im, u_im)
    im = torch.einsum(eq, p_re, u_im) + torch.einsum(eq, p_im, u_re)
    return torch.cat((re, im), dim=-1)


def _wide(u: torch.Tensor) -> torch.dtype:
    return torch.promote_types(u.dtype, torch.complex64 if u.is_complex() else torch.float32)


def complex_decayed_cumsum(u: torch.Tensor, log_mag: torch.Tensor, angle: torch.Tensor,
                           chunk: int = 64) -> torch.Tensor:
    """u (B, N, R) complex or (B, N, 2R) planar; log_mag (R,) ≤ 0 and angle (R,) real
    (λ = e^{log_mag + i·angle}) → h like u, h_t = Σ_{j≤t} λ^{t−j} u_j."""
    r = log_mag.shape[0] if log_mag.dim() == 1 else -1
    width = r if u.is_complex() else 2 * r
    if u.dim() != 3 or angle.shape != log_mag.shape or u.shape[-1] != width:
        raise ValueError(
            f"u must be (B, N, R) complex or (B, N, 2R) planar with log_mag and angle (R,), "
            f"got u {tuple(u.shape)} ({u.dtype}), log_mag {tuple(log_mag.shape)}, "
            f"angle {tuple(angle.shape)}"
        )
    if chunk < 2:
        raise ValueError(f"chunk must be ≥ 2, got {chunk}")
    bsz, n, _ = u.shape
    size = min(n, chunk)
    p_re, p_im = _powers(torch.arange(size + 1, device=u.device), log_mag, angle)
    mat = _toeplitz(p_re[:size], p_im[:size], size)
    if n <= chunk:
        return _mul(u, *mat, "tjr,bjr->btr")
    m = -(-n // chunk)
    padded = torch.cat((u, u.new_zeros(bsz, m * chunk - n, u.shape[-1])), dim=1)
    local = _mul(padded.view(bsz, m, chunk, -1), *mat, "tjr,bmjr->bmtr")
    # the states at the chunk ends, one level up with λ^T, in float32 at least
    ends = complex_decayed_cumsum(local[:, :, -1].to(_wide(u)), chunk * log_mag,
                                  chunk * angle, chunk)
    before = torch.cat((ends.new_zeros(bsz, 1, ends.shape[-1]), ends[:, :-1]), dim=1)
    # λ^{t+1} times the state entering the chunk, for t = 0..T−1
    carried = _mul(before, p_re[1:], p_im[1:], "tr,bmr->bmtr")
    return (local + carried.to(u.dtype)).reshape(bsz, m * chunk, -1)[:, :n]
