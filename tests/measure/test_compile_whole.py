"""The bench, the profiler and the saved-bytes count compile a model as one graph: a graph
break fails with its cause instead of a step measured in pieces."""

import pytest
import torch
import torch.nn as nn
from torch._dynamo.exc import TorchDynamoException

from muse.measure.phases import compile_whole


class _Breaks(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch: dynamo cannot keep it in one graph
            return x * 2
        return x


class _Whole(nn.Module):
    def forward(self, x):
        return torch.where(x.sum() > 0, x * 2, x)


def test_a_graph_break_fails_naming_its_cause():
    torch._dynamo.reset()
    with pytest.raises(TorchDynamoException, match="(?i)data-dependent"):
        compile_whole(_Breaks(), "eager")(torch.ones(3))


def test_one_graph_runs_as_eager_does():
    torch._dynamo.reset()
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    assert torch.equal(compile_whole(_Whole(), "eager")(x), _Whole()(x))
