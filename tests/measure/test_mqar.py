"""MQAR: every scored target is the value that followed the same key in the first part."""

import pytest
import torch

from muse.measure.mqar import MQAR, mqar_loss_and_accuracy


def test_scored_targets_are_the_values_stored_under_the_queried_keys():
    task = MQAR(vocab_size=64, pairs=6, seq_len=30)
    ids, targets = task.batch(5, torch.Generator().manual_seed(0))
    for row, tgt in zip(ids.tolist(), targets.tolist(), strict=True):
        stored = dict(zip(row[0:12:2], row[1:12:2], strict=True))
        assert len(stored) == 6  # distinct keys
        scored = [(t, y) for t, y in enumerate(tgt) if y != -100]
        assert len(scored) == 6
        for t, y in scored:
            assert stored[row[t]] == y == row[t + 1]
        assert all(k <= 31 for k in stored) and all(v > 31 for v in stored.values())


def test_a_model_that_looks_up_the_pairs_scores_all_and_chance_scores_little():
    task = MQAR(vocab_size=64, pairs=4, seq_len=16)
    ids, targets = task.batch(3, torch.Generator().manual_seed(1))
    perfect = torch.full((3, 16, 64), -10.0)
    perfect.scatter_(2, targets.clamp(min=0)[..., None], 10.0)
    loss, acc = mqar_loss_and_accuracy(perfect, targets)
    assert acc == 1.0 and loss < 1e-6
    _, acc = mqar_loss_and_accuracy(torch.zeros(3, 16, 64), targets)
    assert acc <= 0.25


def test_sizes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="seq_len 10 < 4 × pairs"):
        MQAR(pairs=4, seq_len=10)
    with pytest.raises(ValueError, match="fewer than pairs=40 distinct keys"):
        MQAR(vocab_size=64, pairs=40, seq_len=200)
