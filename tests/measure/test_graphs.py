"""The CUDA-graph training step: refused where a graph cannot hold it, and on CUDA the same
losses as the step launched op by op from the same weights."""

import copy

import pytest
import torch

from muse import models
from muse.measure.graphs import WARMUP, GraphedTrainStep
from muse.measure.phases import TrainStep, random_ids


def test_off_cuda_it_names_the_device():
    model = models.build("transformer", "tiny", vocab_size=97)
    with pytest.raises(ValueError, match="needs a CUDA device, got ids on cpu"):
        GraphedTrainStep(model, random_ids(97, 2, 16, "cpu"), torch.bfloat16)


def test_fp16_is_refused_for_its_host_side_loss_scaling():
    model = models.build("transformer", "tiny", vocab_size=97)
    ids = random_ids(97, 2, 16, "cpu")
    with pytest.raises(ValueError, match="capture bf16 or fp32"):
        GraphedTrainStep(model, ids, torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["transformer", "phase1", "phase2", "phase3", "phase7", "phase8"])
def test_replays_follow_the_eager_steps_losses(name):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = models.build(name, "tiny", vocab_size=97)
    ids = random_ids(97, 4, 128, "cuda")
    eager = TrainStep(copy.deepcopy(model), ids, torch.float32, lr=1e-3, fused=True)
    graphed = GraphedTrainStep(model, ids, torch.float32, lr=1e-3)
    for _ in range(WARMUP):
        eager()
    for _ in range(3):
        eager()
        graphed()
        torch.testing.assert_close(graphed.last_loss, eager.last_loss, rtol=1e-4, atol=1e-5)
