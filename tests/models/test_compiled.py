"""A training step under torch.compile (inductor, the backend `pytest bench --compile` uses)
computes what the eager step computes: the loss to 1e-5, and every parameter's gradient within
1e-4 of its norm of the same weights' float64 gradient on the CPU, or at most 2× as far from it
as the eager float32 step's (TF32 off on CUDA): inductor reorders float32 sums and takes its own
transcendentals, so where eager float32 itself strays, the compiled step may stray as far. On the
CPU inductor's C++ runs 8 float lanes (AVX2's width) on every host: its reductions' order, and so
their rounding, follow the vector width, and the bound is not to depend on the machine. On
the CPU the families with the sliding window, whose overlapping unfold had a backward inductor
got wrong (pytorch #172064); on CUDA every family the bench compiles."""

import copy
import shutil

import pytest
import torch

from muse import models

NO_CXX = shutil.which("c++") is None and shutil.which("g++") is None


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, loss_chunk=32)
    loss.backward()
    return loss.detach(), {name.removeprefix("_orig_mod."): p.grad.clone()
                           for name, p in model.named_parameters() if p.grad is not None}


def relative_errors(grads, ref):
    return {n: float((grads[n].cpu().double() - g).norm() / g.norm())
            for n, g in ref.items() if g.norm() > 0}


def check_compiled_step(family, device, backend="inductor"):
    torch.manual_seed(0)
    model = models.build(family, "tiny", vocab_size=97)
    ref_model = copy.deepcopy(model).double()
    model.to(device)
    ids = torch.randint(0, 97, (2, 64))
    _, ref = loss_and_grads(ref_model, ids)
    ids = ids.to(device)
    loss, grads = loss_and_grads(model, ids)
    got_loss, got = loss_and_grads(torch.compile(model, backend=backend, dynamic=False), ids)
    assert torch.allclose(got_loss, loss, rtol=1e-5, atol=0)
    assert got.keys() == grads.keys() == ref.keys()
    eager, compiled = relative_errors(grads, ref), relative_errors(got, ref)
    worse = {n: (compiled[n], eager[n]) for n in eager if compiled[n] > max(2 * eager[n], 1e-4)}
    assert not worse, f"compiled against eager float32 error, both to float64: {worse}"


@pytest.mark.slow  # inductor compiles C++ kernels for each model
@pytest.mark.skipif(NO_CXX, reason="inductor on the CPU needs a C++ compiler (c++ or g++)")
@pytest.mark.parametrize("family", ["phase3", "phase8"])
def test_the_compiled_step_has_the_eager_gradients(family):
    import torch._inductor.config

    with torch._inductor.config.patch({"cpp.simdlen": 8}):
        check_compiled_step(family, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["phase1", "phase2", "phase3", "phase7", "phase8",
                                    "transformer"])
def test_the_compiled_step_has_the_eager_gradients_on_cuda(family, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    check_compiled_step(family, "cuda")


# fla's peers run fla's own Triton kernels, which need a GPU
@pytest.mark.parametrize("family", [n for n in models.registry.names() if not n.startswith("fla-")])
@pytest.mark.parametrize("loss_chunk", [0, 32])
def test_the_training_forward_is_one_graph(family, loss_chunk):
    """A graph break would split the compiled step into pieces run between eager code (slower)
    and, under compile_mode=reduce-overhead, leave torch.utils.checkpoint regions running as
    eager checkpoints around CUDA graphs, which cudagraph trees cannot replay."""
    torch._dynamo.reset()  # each case traced afresh, not against another's recompile count
    torch.manual_seed(0)
    model = models.build(family, "tiny", vocab_size=97).train()
    step = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    ids = torch.randint(0, 97, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = step(ids, loss_chunk=loss_chunk) if loss_chunk else step(ids)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("family", [n for n in models.registry.names() if not n.startswith("fla-")])
def test_the_traced_forward_and_backward_have_the_eager_gradients(family):
    """AOTAutograd's traced graphs run by eager kernels (aot_eager): where a layer's fake
    strides differ from the real ones, a view in the traced backward fails here."""
    torch._dynamo.reset()
    check_compiled_step(family, "cpu", backend="aot_eager")
