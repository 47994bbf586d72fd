"""Every MUSE family's presets against the transformer preset the registry matches them to:
within 10% in parameters at GPT-2's vocabulary, at the perplexity gate's bpe:8192 and at a BPE
that stopped short of it (HTT keeps Phase 1 near 13.5M while dense tables scale)."""

import pytest
import torch

from muse import models

MAX_GAP = 0.10
FAMILIES = [n for n in models.names()
            if not n.startswith("transformer") and not models.family(n).extra]
# tiny is for the CPU tests: too small to match a model carrying a 50k-token table
CASES = [(n, p) for n in FAMILIES for p in models.presets(n) if p != "tiny"]


def count(name, preset, vocab):
    with torch.device("meta"):
        return models.build(name, preset, vocab_size=vocab).num_params()


@pytest.mark.parametrize("vocab", [50257, 8192, 8000])
@pytest.mark.parametrize("name, preset", CASES, ids=[f"{n}:{p}" for n, p in CASES])
def test_matched_transformer_within_ten_percent(name, preset, vocab):
    base_name, base_preset = models.baseline_for(name, preset, vocab)
    assert base_name == "transformer"
    ours, theirs = count(name, preset, vocab), count(base_name, base_preset, vocab)
    assert abs(theirs / ours - 1) < MAX_GAP, (name, preset, vocab, ours, base_preset, theirs)
