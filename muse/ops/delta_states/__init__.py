"""The delta rule's chunk-to-chunk pass (muse.ops.delta_rule): the state carried through the
chunks and each chunk's output read from it. `reference.py` is both in PyTorch, `triton.py` the
walk and `readout.py` the read-out, each one launch forward and one backward."""
