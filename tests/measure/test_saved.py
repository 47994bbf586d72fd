"""muse.measure.saved: the bytes a forward keeps for backward, attributed by sublayer."""

import torch
from torch import nn

from muse.measure.saved import COMPILED, OUTSIDE, saved_bytes_by_sublayer, saved_bytes_compiled


class Square(nn.Module):
    def forward(self, x):
        return x * x  # saves x twice: one storage


class Toy(nn.Module):
    def __init__(self, vocab=32, d=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([nn.Sequential(Square(), nn.Linear(d, d))])
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_each_storage_counts_once_under_its_innermost_module_and_weights_not_at_all():
    torch.manual_seed(0)
    n, d = 6, 8
    saved = saved_bytes_by_sublayer(Toy(d=d), torch.randint(0, 32, (1, n)), torch.float32)
    activation = n * d * 4  # float32
    assert saved["Square"] == activation  # x saved by both factors of x * x
    assert saved["Linear"] == activation  # its input; its weight is a parameter
    assert saved[OUTSIDE] > 0  # the ids, the head's input, the loss
    assert "Sequential" not in saved  # nothing saved by the container itself


def test_hooks_are_removed_after_counting():
    model = Toy()
    saved_bytes_by_sublayer(model, torch.randint(0, 32, (1, 4)), torch.float32)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_the_compiled_count_is_one_total_without_the_weights():
    """aot_eager: torch.compile's autograd graph without inductor's C++ build. The compiled
    forward keeps at least the Linear's input and never a weight."""
    torch.manual_seed(0)
    n, d = 6, 8
    model = Toy(d=d)
    ids = torch.randint(0, 32, (1, n))
    saved = saved_bytes_compiled(model, ids, torch.float32, backend="aot_eager")
    assert list(saved) == [COMPILED]
    assert n * d * 4 <= saved[COMPILED] <= sum(saved_bytes_by_sublayer(model, ids,
                                                                       torch.float32).values())
    assert all(p.grad is None for p in model.parameters())  # the warm-up's gradients dropped
