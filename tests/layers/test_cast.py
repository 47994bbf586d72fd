"""autocast_read (`muse/layers/cast.py`): the readers of one activation share its autocast copy,
with autocast's values and gradients, and backward keeps the copy once."""

import torch
import torch.nn as nn

from muse.layers.cast import autocast_read


def _readers(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(16, 8), nn.Linear(16, 4), nn.Conv1d(16, 16, 3, groups=16, padding=2)


def _forward(layers, x, shared):
    a, b, conv = layers
    read = autocast_read if shared else (lambda t: t)
    n = x.shape[1]
    return (a(read(x)).float().sum(-1) + b(read(x)).float().square().sum(-1)
            + conv(read(x).transpose(1, 2))[..., :n].float().sum(1))


def test_outside_autocast_and_for_other_dtypes_it_is_x_itself():
    x = torch.randn(2, 5, 16)
    assert autocast_read(x) is x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_read(x.double()).dtype == torch.float64
        y = x.to(torch.bfloat16)
        assert autocast_read(y) is y


def test_readers_get_autocasts_values_and_gradients():
    """Two Linears and a Conv1d reading one float32 activation under bf16 autocast: outputs and
    the gradients of x and of every weight bit for bit as through autocast's own three casts
    (each reader's gradient goes back to float32 before they are added)."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 33, 16, generator=g)
    up = torch.randn(2, 33, generator=g)
    runs = []
    for shared in (True, False):
        layers = _readers()
        leaf = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # a layer's output, as a block's normed input is: autocast caches its casts of
            # leaves (weights), and its readers would share the cast and add up in bf16
            y = _forward(layers, leaf * 1, shared)
        (y * up).sum().backward()
        runs.append([y.detach(), leaf.grad, *(p.grad for m in layers for p in m.parameters())])
    for a, b in zip(*runs, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_one_copy_per_activation_formed_again_after_an_in_place_change():
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = autocast_read(x), autocast_read(x)
        assert a.dtype == torch.bfloat16 and torch.equal(a, x.detach().to(torch.bfloat16))
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        with torch.no_grad():
            x.mul_(2)
            c = autocast_read(x)
        assert c.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
        assert torch.equal(c, x.detach().to(torch.bfloat16))


def test_backward_keeps_one_bf16_copy_for_all_readers():
    """2 bytes a token and channel for the three readers, where autocast's own casts keep 6."""
    n, d = 64, 16
    leaf = torch.randn(1, n, d, requires_grad=True)
    per_token = []
    for shared in (True, False):
        layers = _readers()
        kept = {}

        def pack(t, kept=kept):
            if t.dtype == torch.bfloat16 and t.untyped_storage().nbytes() == n * d * 2:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            _forward(layers, leaf * 1, shared)
        per_token.append(sum(kept.values()) / (n * d))
    assert per_token == [2, 6]


def test_inference_tensors_are_cast_without_the_shared_copy():
    """Inference tensors carry no version counter: each read is autocast's own cast."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(3, 16)
        first, second = autocast_read(x), autocast_read(x)
    assert first.dtype == torch.bfloat16 and torch.equal(first, x.to(torch.bfloat16))
    assert torch.equal(first, second)
