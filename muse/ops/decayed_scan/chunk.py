"""s_t = λ ⊙ s_{t−1} + u_t with a time-invariant decay λ ∈ (0, 1]^R, in chunked matrix form.

Within a chunk of T steps the recurrence is one (T × T) lower-triangular matrix of powers
λ^{t−j} per channel, applied as a batched product (tensor cores, no per-step launches). The
chunk end states obey the same recurrence with decay λ^T, so they are computed by the same
function one level up, and each chunk then adds λ^{t+1} times the state carried in. A few
launches per level and log_T(N) levels, where the odd–even scan needed dozens per level and
log₂(N) levels. Powers are formed as exp(k · log λ) with k ≥ 0, so nothing overflows.
"""

from __future__ import annotations

import functools

import torch


def _powers(steps: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    return torch.exp(steps[..., None] * log_decay)


def _within(u: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """u (..., T, R) → inclusive decayed sums along T, directly."""
    n = u.shape[-2]
    t = torch.arange(n, device=u.device, dtype=log_decay.dtype)
    lag = t[:, None] - t[None, :]
    mat = torch.where((lag >= 0)[..., None], _powers(lag.clamp_min(0), log_decay), 0.0)
    return torch.einsum("tjr,...jr->...tr", mat.to(u.dtype), u)


def decayed_cumsum(u: torch.Tensor, log_decay: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """u (B, N, R), log_decay (R,) ≤ 0 (log λ) → s (B, N, R) with s_t = Σ_{j≤t} λ^{t−j} u_j."""
    if u.dim() != 3 or log_decay.shape != (u.shape[-1],):
        raise ValueError(
            f"u must be (B, N, R) and log_decay (R,), got {tuple(u.shape)} and "
            f"{tuple(log_decay.shape)}"
        )
    if chunk < 2:
        raise ValueError(f"chunk must be ≥ 2, got {chunk}")
    bsz, n, r = u.shape
    if n <= chunk:
        return _within(u, log_decay)
    m = -(-n // chunk)
    padded = torch.cat((u, u.new_zeros(bsz, m * chunk - n, r)), dim=1)
    local = _within(padded.view(bsz, m, chunk, r), log_decay)
    carried = decayed_cumsum(local[:, :, -1], chunk * log_decay, chunk)  # state at chunk ends
    before = torch.cat((carried.new_zeros(bsz, 1, r), carried[:, :-1]), dim=1)
    steps = torch.arange(1, chunk + 1, device=u.device, dtype=log_decay.dtype)
    s = local + before[:, :, None, :] * _powers(steps, log_decay).to(u.dtype)
    return s.reshape(bsz, m * chunk, r)[:, :n]


def selective_cumsum(u: torch.Tensor, log_decay: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """u (B, N, R), log_decay (B, N, R) ≤ 0, one decay per step and channel → s (B, N, R) with
    s_t = a_t s_{t−1} + u_t. Within a chunk of T steps, the weights exp(L_t − L_j) of the
    cumulative log-decays L (t ≥ j, so ≤ 1); the chunk ends by the same function one level up.
    Its (T × T) weights per channel take T times the memory of u: T is small."""
    if u.dim() != 3 or log_decay.shape != u.shape:
        raise ValueError(f"u and log_decay must both be (B, N, R), got {tuple(u.shape)} and "
                         f"{tuple(log_decay.shape)}")
    if chunk < 2:
        raise ValueError(f"chunk must be ≥ 2, got {chunk}")
    bsz, n, r = u.shape
    m = -(-n // chunk)
    pad = m * chunk - n  # padded steps: no input and log-decay 0, after every real step
    uc = pad_time(u, pad, 1).view(bsz, m, chunk, r)
    cum = pad_time(log_decay, pad, 1).view(bsz, m, chunk, r).cumsum(dim=2)
    lag = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # L_t − L_j: (B, M, T, T, R)
    below = ~above_diagonal(chunk, u.device)[:, :, None]
    weight = torch.exp(torch.where(below, lag, float("-inf")))
    local = torch.einsum("bmtjr,bmjr->bmtr", weight.to(u.dtype), uc)
    if m > 1:
        ends = selective_cumsum(local[:, :, -1], cum[:, :, -1], chunk)
        before = torch.cat((ends.new_zeros(bsz, 1, r), ends[:, :-1]), dim=1)
        local = local + before[:, :, None, :] * torch.exp(cum).to(u.dtype)
    return local.reshape(bsz, m * chunk, r)[:, :n]


def above_diagonal(chunk: int, device: torch.device) -> torch.Tensor:
    """(chunk × chunk) True above the diagonal, the causal mask of a chunk: built once per size
    and device; under torch.compile a node of the graph, which inductor folds."""
    if torch.compiler.is_compiling():
        return torch.ones(chunk, chunk, dtype=torch.bool, device=device).triu(1)
    return _cached_above_diagonal(chunk, device)


@functools.lru_cache(maxsize=16)
def _cached_above_diagonal(chunk: int, device: torch.device) -> torch.Tensor:
    # a plain tensor even when first asked for under inference_mode: training reuses it
    with torch.inference_mode(False):
        return torch.ones(chunk, chunk, dtype=torch.bool, device=device).triu(1)


def pad_time(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """x with `size` zeros appended along `dim`."""
    if size == 0:
        return x
    shape = list(x.shape)
    shape[dim] = size
    return torch.cat((x, x.new_zeros(shape)), dim=dim)
