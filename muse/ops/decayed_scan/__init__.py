"""s_t = a_t ⊙ s_{t−1} + u_t: the chunked PyTorch form (chunk.py), the Triton scan (triton.py)."""
