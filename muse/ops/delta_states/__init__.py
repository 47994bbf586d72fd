"""The delta rule's chunk pass (muse.ops.delta_rule) after its chunk layout: each chunk's solve,
the state carried through the chunks and each chunk's output read from it. `reference.py` is
all three in PyTorch; `solve.py`, `triton.py` (the walk) and `readout.py` are each one Triton
launch forward and one backward."""
