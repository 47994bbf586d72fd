"""The CUDA-graph training step and forward: refused where a graph cannot hold them, and on CUDA
the same losses and logits as the work launched op by op from the same weights."""

import copy

import pytest
import torch

from muse import models
from muse.measure.graphs import WARMUP, GraphedForward, GraphedTrainStep
from muse.measure.phases import GRAPHED_PHASES, TrainStep, forward_fn, make_phase, random_ids


def test_off_cuda_it_names_the_device():
    model = models.build("transformer", "tiny", vocab_size=97)
    with pytest.raises(ValueError, match="needs a CUDA device, got ids on cpu"):
        GraphedTrainStep(model, random_ids(97, 2, 16, "cpu"), torch.bfloat16)


def test_the_graphed_forward_off_cuda_names_the_device():
    model = models.build("transformer", "tiny", vocab_size=97)
    with pytest.raises(ValueError, match="needs a CUDA device, got ids on cpu"):
        GraphedForward(model, random_ids(97, 2, 16, "cpu"), torch.float16)


@pytest.mark.parametrize("phase", GRAPHED_PHASES)
def test_each_graphed_phase_off_cuda_names_the_device(phase):
    model = models.build("transformer", "tiny", vocab_size=97)
    with pytest.raises(ValueError, match="needs a CUDA device, got ids on cpu"):
        make_phase(phase, model, random_ids(97, 2, 16, "cpu"), torch.bfloat16)


def test_an_unknown_phase_lists_every_valid_one():
    model = models.build("transformer", "tiny", vocab_size=97)
    with pytest.raises(ValueError, match="unknown phase 'backward'; valid: forward, train_step, "
                                         "graphed_forward, graphed_train_step$"):
        make_phase("backward", model, random_ids(97, 2, 16, "cpu"), torch.float32)


def test_fp16_is_refused_for_its_host_side_loss_scaling():
    model = models.build("transformer", "tiny", vocab_size=97)
    ids = random_ids(97, 2, 16, "cpu")
    with pytest.raises(ValueError, match="capture bf16 or fp32"):
        GraphedTrainStep(model, ids, torch.float16)


def tiny_on_cuda(name, batch):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = models.build(name, "tiny", vocab_size=97)
    return model, random_ids(97, batch, 128, "cuda")


on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FAMILIES = ["transformer", "phase1", "phase2", "phase3", "phase7", "phase8"]


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("name", FAMILIES)
def test_replays_follow_the_eager_steps_losses(name):
    model, ids = tiny_on_cuda(name, 4)
    eager = TrainStep(copy.deepcopy(model), ids, torch.float32, lr=1e-3, fused=True)
    graphed = GraphedTrainStep(model, ids, torch.float32, lr=1e-3)
    for _ in range(WARMUP):
        eager()
    for _ in range(3):
        eager()
        graphed()
        torch.testing.assert_close(graphed.last_loss, eager.last_loss, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("name", FAMILIES)
def test_a_replayed_forward_gives_the_eager_forwards_logits(name):
    model, ids = tiny_on_cuda(name, 2)
    eager = forward_fn(copy.deepcopy(model), ids, torch.float32)()
    graphed = GraphedForward(model, ids, torch.float32)
    with torch.inference_mode():
        graphed.logits.zero_()  # a replay must write them afresh
    graphed()
    torch.testing.assert_close(graphed.logits, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@on_cuda
def test_the_capture_peak_holds_what_the_step_allocates():
    """A replay allocates nothing, so the step's footprint is what capture allocated: at least
    the float32 logits the full loss keeps for backward."""
    model, ids = tiny_on_cuda("transformer", 4)
    graphed = GraphedTrainStep(model, ids, torch.float32, lr=1e-3)
    logits_bytes = ids.numel() * model.config.vocab_size * 4
    assert graphed.capture_peak_bytes >= logits_bytes
