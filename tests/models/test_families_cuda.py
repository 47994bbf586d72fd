"""Every family's CUDA path (Triton BK-Core and scans, blocked window attention, the chunked
forms) against the same weights in float64 on the CPU, at the tiny presets: forward, loss and
every gradient, and streaming on the GPU. What the GPU acceptance runs rest on."""

import copy

import pytest
import torch

from muse import models
from muse.measure.phases import lm_loss, random_ids

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
VOCAB = 97
# the fla peers have their own CUDA tests (tests/models/test_fla_peers.py)
NAMES = [n for n in models.names() if not models.family(n).extra]


@pytest.fixture(autouse=True)
def _full_float32(monkeypatch):
    # TF32 would put ~1e-3 of rounding into matmuls and convs: the bounds below are for float32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _pair(name):
    torch.manual_seed(0)
    ref = models.build(name, "tiny", vocab_size=VOCAB).double()
    return ref, copy.deepcopy(ref).float().cuda()


@pytest.mark.parametrize("name", NAMES)
def test_cuda_loss_and_gradients_match_the_cpu_in_float64(name):
    ref, gpu = _pair(name)
    ids = random_ids(VOCAB, 2, 200, "cpu", seed=1)
    want = lm_loss(ref(ids), ids)
    want.backward()
    got = lm_loss(gpu(ids.cuda()), ids.cuda())
    got.backward()
    assert abs(got.item() - want.item()) <= 1e-4 * abs(want.item()), (got.item(), want.item())
    for (n, p), (_, q) in zip(ref.named_parameters(), gpu.named_parameters(), strict=True):
        assert torch.isfinite(q.grad).all(), n
        err = float((q.grad.double().cpu() - p.grad).norm())
        # zero-initialised outputs give exact zero gradients on both sides
        assert err <= 1e-3 * float(p.grad.norm()) + 1e-7, f"{n}: |Δgrad| {err:.2e}"


@pytest.mark.parametrize("name", [n for n in NAMES
                                  if hasattr(models.family(n).model_cls, "init_state")])
def test_cuda_streaming_equals_one_pass(name):
    _, gpu = _pair(name)
    ids = random_ids(VOCAB, 2, 150, "cuda", seed=2)
    with torch.no_grad():
        whole = gpu(ids)
        state = gpu.init_state(2)
        parts = []
        for a, b in ((0, 37), (37, 100), (100, 150)):
            logits, state = gpu(ids[:, a:b], state)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["phase1", "phase7", "phase2"])
def test_decoding_after_a_long_fp16_prompt_stays_finite(name):
    """The bench's decode protocol at the small preset: 16,384 prompt tokens in segments of 4096
    under fp16 autocast, then tokens one at a time (one-position BK-Core calls among them)."""
    from muse.measure.decode import measure_decode

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = models.build(name, "small")
    stats = measure_decode(model, 16384, 8, torch.device("cuda"), torch.float16)
    assert stats.state_bytes > 0 and stats.seconds > 0
