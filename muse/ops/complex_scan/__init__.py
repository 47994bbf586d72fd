"""h_t = λ ⊙ h_{t−1} + u_t with a complex decay per channel: the chunked PyTorch form on
complex or planar storage (chunk.py) beside its per-token definition (naive.py); on CUDA, one
Triton scan on planar storage (triton.py, imported where used)."""

from muse.ops.complex_scan.chunk import complex_decayed_cumsum
from muse.ops.complex_scan.naive import complex_recurrence_naive

__all__ = ["complex_decayed_cumsum", "complex_recurrence_naive"]
