"""Phase 3 specifics beyond the contract: matched baselines, the planar block against the same
block on complex128 tensors, the memory claim, bad configs, the long-range gradient."""

import pytest
import torch

from muse import models
from muse.layers.complex import from_planar, to_planar
from muse.measure.phases import random_ids
from muse.models.phase3 import block_memory, block_reference


@pytest.mark.parametrize("extra", [{"d_ff": 0}, {"d_ff": 24}, {"gate": True},
                                   {"local_window": 4, "local_heads": 2, "local_head_dim": 8},
                                   {"real_ffn": True, "gate": True}, {"selective_rank": 4}])
def test_planar_block_equals_the_complex128_block(extra):
    torch.manual_seed(0)
    m = models.build("phase3", "tiny", vocab_size=97, chunk=4, **extra).double()
    with torch.no_grad():  # move the ModReLU thresholds and LN shifts off their zero init
        for block in m.blocks:
            for mod in (block.act_rec, block.act_ffn, block.ln_rec, block.ln_ffn, block.ln_local,
                        block.gate):
                if mod is not None:
                    mod.bias.normal_(std=0.3)
            if block.rec.select is not None:  # off its zero init: the decays depend on z
                block.rec.select[1].weight.normal_(std=0.3)
    a = torch.randn(2, 11, 32, dtype=torch.complex128)
    for block in m.blocks:
        torch.testing.assert_close(from_planar(block(to_planar(a))), block_reference(block, a),
                                   rtol=0, atol=1e-12)


def test_planar_bf16_saves_at_most_about_half_of_complex64():
    """Activation memory of one block (saved-for-backward bytes): bf16 planes against the same
    block on complex64 tensors, and against float32 planes (complex64's bytes, planar)."""
    small = dict(d_model=64, seq=256)
    bf16 = block_memory(**small)
    fp32 = block_memory(**small, planar_dtype=torch.float32)
    assert bf16["complex64_bytes"] == fp32["complex64_bytes"]
    assert bf16["planar_bytes"] <= 0.55 * bf16["complex64_bytes"], bf16
    assert bf16["planar_bytes"] <= 0.53 * fp32["planar_bytes"], (bf16, fp32)


@pytest.mark.parametrize("overrides, match", [
    ({"d_model": 65}, "d_model must be even"),
    ({"d_ff": -1}, "d_ff must be an integer ≥ 0"),
    ({"chunk": 1}, "chunk must be ≥ 2, got 1"),
    ({"decay_range": (0.1, 0.01)}, "decay_range"),
    ({"init": "xavier"}, "init must be one of"),
    ({"real_ffn": 1}, "real_ffn must be true or false, got 1"),
    ({"selective_rank": -1}, "selective_rank must be an integer ≥ 0"),
])
def test_bad_config_names_the_value(overrides, match):
    with pytest.raises(ValueError, match=match):
        models.build("phase3", "tiny", **overrides)


def test_trains_on_a_repeated_batch():
    torch.manual_seed(0)
    m = models.build("phase3", "tiny", vocab_size=97)
    ids = random_ids(97, 2, 32, "cpu")
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(m(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses


@pytest.mark.parametrize("n", [10, 200])  # inside one chunk of the scan, and across chunks
def test_the_carried_state_is_float32_under_half_precision_autocast(n):
    model = models.build("phase3", "tiny").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, state = model(torch.randint(0, 100, (1, n)), model.init_state(1))
    assert {b["h"].dtype for b in state.blocks} == {torch.float32}


def test_selective_recurrence_streams_exactly():
    from .test_streaming import streamed

    torch.manual_seed(0)
    m = models.build("phase3", "tiny", vocab_size=97, chunk=4, selective_rank=4).double().eval()
    with torch.no_grad():  # off the zero init: the decays depend on the tokens
        for block in m.blocks:
            block.rec.select[1].weight.normal_(std=0.5)
    ids = random_ids(97, 2, 37, "cpu", seed=1)
    whole = m(ids)
    parts, _ = streamed(m, ids, [1, 20, 21])
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-10)


@pytest.mark.parametrize("extra", [{"local_window": 4, "local_heads": 2, "local_head_dim": 8},
                                   {"d_ff": 24, "real_ffn": False, "selective_rank": 0}])
def test_planar_block_gradients_equal_the_complex128_blocks(extra):
    """The block's one-node LN and gated ModReLU (layers.complex) in float64: the gradients of
    the input and of every weight as autograd's through the complex128 block."""
    torch.manual_seed(0)
    m = models.build("phase3", "tiny", vocab_size=97, chunk=4, **extra).double()
    block = m.blocks[0]
    with torch.no_grad():
        for mod in (block.act_rec, block.act_ffn, block.ln_rec, block.ln_ffn, block.ln_local,
                    block.gate):
            if mod is not None:
                mod.bias.normal_(std=0.3)
        if block.rec.select is not None:
            block.rec.select[1].weight.normal_(std=0.3)
    a = torch.randn(2, 11, 32, dtype=torch.complex128)
    w = torch.randn(2, 11, 32, dtype=torch.complex128)
    x, zc = to_planar(a).requires_grad_(), a.clone().requires_grad_()
    params = list(block.parameters())
    got = torch.autograd.grad((from_planar(block(x)) * w.conj()).real.sum(), [x, *params],
                              allow_unused=True)
    want = torch.autograd.grad((block_reference(block, zc) * w.conj()).real.sum(), [zc, *params],
                               allow_unused=True)
    torch.testing.assert_close(from_planar(got[0]), want[0], rtol=1e-10, atol=1e-10)
    for g, r in zip(got[1:], want[1:], strict=True):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_the_three_projections_of_ln_z_keep_one_autocast_copy():
    """Under bf16 autocast the gate and the recurrence's two projections read LN z (float32)
    through one shared bf16 copy (layers.cast): backward keeps it once, not three times."""
    torch.manual_seed(0)
    block = models.build("phase3", "tiny", vocab_size=97).blocks[0]
    readers = (block.gate, block.rec.select[0], block.rec.proj_in)
    inside = []
    for r in readers:
        r.register_forward_pre_hook(lambda *_: inside.append(True))
        r.register_forward_hook(lambda *_: inside.clear())
    bsz, n, d = 3, 17, block.gate.in_features  # no weight of the block has 3·17·d entries
    copies = set()

    def pack(t):
        if inside and t.dtype == torch.bfloat16 and t.numel() == bsz * n * d:
            copies.add(t.untyped_storage().data_ptr())
        return t

    x = torch.randn(bsz, n, d, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        block(x)
    assert len(copies) == 1
