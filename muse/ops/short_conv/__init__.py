"""The short causal depthwise convolution (+ SiLU) that gated linear-attention models put before
q, k and v. `naive.py` is the PyTorch form (shifted multiply-adds), `triton.py` one launch
forward and one (or two) backward that read the unpadded input, not a padded copy."""
