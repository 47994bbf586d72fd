"""Masks and bases cached across calls must serve training after an inference-mode call."""

import torch

from muse import models
from muse.measure.phases import random_ids


def test_training_after_inference_mode_reuses_cached_masks():
    torch.manual_seed(0)
    m = models.build("phase2", "tiny", vocab_size=97, hebbian_delta=False, local_window=8,
                     resonance=True)
    # a chunk and window size no other test uses, so the first call here fills the caches
    m.blocks[0].hebbian.chunk = 23
    ids = random_ids(97, 1, 50, "cpu")
    with torch.inference_mode():
        m(ids)
        state = m.init_state(1)
        m(ids, state)
    m(ids).sum().backward()
    assert m.embed.weight.grad is not None
