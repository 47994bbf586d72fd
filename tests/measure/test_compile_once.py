"""The compiled step's graph count: what the bench records beside the compiled step's speed,
so a step that torch.compile ran in pieces is told from one compiled whole."""

import torch
import torch.nn as nn

from muse.measure.phases import compile_once, dynamo_graphs


class _Breaks(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch: dynamo ends the graph here
            return x * 2
        return x


class _Whole(nn.Module):
    def forward(self, x):
        return torch.where(x.sum() > 0, x * 2, x)


def graphs_of(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    torch._dynamo.reset()
    before = dynamo_graphs()
    out = compile_once(module, "eager")(x)
    return dynamo_graphs() - before, out


def test_one_graph_is_counted_once_and_computes_what_eager_does():
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    graphs, out = graphs_of(_Whole(), x)
    assert graphs == 1
    assert torch.equal(out, _Whole()(x))


def test_a_graph_break_shows_as_more_graphs():
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    graphs, out = graphs_of(_Breaks(), x)
    assert graphs >= 2
    assert torch.equal(out, _Breaks()(x))
