"""The delta rule's chunk-to-chunk pass (muse.ops.delta_rule): the state carried through the
chunks and each chunk's output read from it. `reference.py` is the loop in PyTorch, `triton.py`
one launch forward and one backward."""
