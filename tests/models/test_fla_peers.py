"""The fla peer models: registration, config, the errors that say why a peer cannot run, and
(with fla installed) parameter counts; forward and causality need CUDA (fla is Triton only)."""

import subprocess
import sys

import pytest
import torch

from muse import models
from muse.cli import main
from muse.models import fla_peers
from muse.models.fla_peers import FlaUnavailable, check_runs_here, hopper_refusal

PEERS = ["fla-retnet", "fla-gla", "fla-deltanet", "fla-gated-deltanet"]
PRESETS = ["tiny", "small", "base"]
INSTALL = 'pip install -e ".[fla]"'

needs_fla = pytest.mark.skipif(
    not fla_peers.fla_installed(), reason=f"needs flash-linear-attention ({INSTALL})"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's kernels need CUDA")


@pytest.fixture
def no_fla(monkeypatch):
    """fla made unimportable (a None entry in sys.modules makes `import` raise ImportError)."""
    for mod in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "fla", None)


def count(name, preset, vocab_size):
    with torch.device("meta"):
        return models.build(name, preset, vocab_size=vocab_size).num_params()


# ------------------------------------------------------------------ registration and config


@pytest.mark.parametrize("name", PEERS)
def test_registered_with_presets_and_same_named_baselines(name):
    assert name in models.names()
    assert models.presets(name) == PRESETS
    assert models.resolve(name) == (name, "small")
    for preset in PRESETS:
        assert models.baseline_for(name, preset, 8192) == ("transformer", preset)
        assert models.config(name, preset).kind == name.removeprefix("fla-")
    assert "CUDA" in models.family(name).cuda_only


@needs_fla  # (without fla the check would pass vacuously)
def test_registering_imports_nothing_from_fla():
    code = ("import sys, muse.models; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'fla'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_config_key_raises_type_error_naming_it():
    with pytest.raises(TypeError, match="bogus_key"):
        models.config("fla-gla", "tiny", bogus_key=1)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(kind="mamba"), "kind must be one of"),
        (dict(expand_k=0.3), r"expand_k · d_model = 0.3 · 64"),
        (dict(expand_v=1.0, n_heads=3), r"divisible by n_heads \(3\)"),
        (dict(d_ff=0), "d_ff must be a positive integer"),
    ],
)
def test_bad_config_values_raise_naming_them(overrides, match):
    with pytest.raises(ValueError, match=match):
        models.config("fla-gla", "tiny", **overrides)


def test_gated_deltanet_needs_whole_value_heads_per_key_head():
    with pytest.raises(ValueError, match="expand_v must be a multiple of expand_k"):
        models.config("fla-gated-deltanet", "tiny", expand_v=1.5)


def test_a_family_builds_only_its_own_kind():
    with pytest.raises(ValueError, match="use the model fla-retnet"):
        models.build("fla-gla", "tiny", kind="retnet")


# ------------------------------------------------------------------------------ missing fla


@pytest.mark.parametrize("name", PEERS)
def test_missing_fla_is_an_error_that_says_what_to_install(no_fla, name):
    with pytest.raises(FlaUnavailable) as err:
        models.build(name, "tiny")
    assert isinstance(err.value, ValueError)  # the CLI and plugin's usage-error type
    assert INSTALL in str(err.value)


def test_muse_info_lists_the_peers_without_fla(no_fla, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out.splitlines()
    for name in PEERS:
        row = next(line for line in out if line.startswith(f"{name}:small "))
        assert "? params" in row and "not built" in row
    assert any(line.startswith("not built:") and INSTALL in line for line in out)
    assert any(line.startswith("transformer:small ") and "? params" not in line for line in out)


# ------------------------------------------------------------------- where fla's kernels run

HOPPER, AMPERE = (9, 0), (8, 0)


@pytest.mark.parametrize(
    ("kind", "capability", "triton", "tilelang", "refused"),
    [
        ("gated-deltanet", HOPPER, "3.6.0", False, True),
        ("gated-deltanet", HOPPER, "3.4.0", False, True),
        ("gated-deltanet", HOPPER, "3.7.0+git1a2b3c", False, True),
        ("gated-deltanet", HOPPER, "3.7.1", False, False),
        ("gated-deltanet", HOPPER, "3.8", False, False),
        ("gated-deltanet", HOPPER, "3.3.1", False, False),
        ("gated-deltanet", HOPPER, "3.6.0", True, False),  # fla dispatches to tilelang
        ("gated-deltanet", AMPERE, "3.6.0", False, False),
        ("gated-deltanet", (10, 0), "3.6.0", False, False),
        ("retnet", HOPPER, "3.6.0", False, False),  # fixed decay: no gate tensor
        ("gla", HOPPER, "3.6.0", False, False),  # its own chunk backward
        ("deltanet", HOPPER, "3.6.0", False, False),  # no gate
    ],
)
def test_hopper_refusal_matches_flas_condition(kind, capability, triton, tilelang, refused):
    reason = hopper_refusal(kind, capability, triton, tilelang)
    assert (reason is not None) == refused
    if refused:
        for part in (f"fla-{kind}", "Hopper", f"{capability[0]}.{capability[1]}", triton,
                     "3.7.1", "#640", "tilelang"):
            assert part in reason


@pytest.fixture
def fake_gpu(monkeypatch):
    """A Hopper GPU with Triton 3.6.0 and no tilelang, as the lent H200s have."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: HOPPER)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(fla_peers, "_triton_version", lambda: "3.6.0")
    monkeypatch.setattr(fla_peers, "_tilelang_installed", lambda: False)
    fla_peers._hopper_refusal_on.cache_clear()
    yield
    fla_peers._hopper_refusal_on.cache_clear()


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_training_gated_deltanet_on_that_gpu_raises_saying_why(fake_gpu, device):
    with pytest.raises(FlaUnavailable, match="Triton 3.6.0.*fla issue #640"):
        check_runs_here("gated-deltanet", torch.device(device), backward=True)


def test_forward_only_and_ungated_kinds_run_on_that_gpu(fake_gpu):
    check_runs_here("gated-deltanet", torch.device("cuda", 0), backward=False)
    for kind in ("retnet", "gla", "deltanet"):
        check_runs_here(kind, torch.device("cuda", 0), backward=True)


@pytest.mark.parametrize("backward", [False, True])
def test_cpu_is_refused_with_a_reason(backward):
    with pytest.raises(FlaUnavailable, match="need a CUDA device; the input is on cpu"):
        check_runs_here("retnet", torch.device("cpu"), backward=backward)


# ----------------------------------------------------------------- with fla, built on the CPU


@needs_fla
@pytest.mark.parametrize("vocab_size", [50257, 8192])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", PEERS)
def test_matched_transformer_within_ten_percent(name, preset, vocab_size):
    ours = count(name, preset, vocab_size)
    theirs = count(*models.baseline_for(name, preset, vocab_size), vocab_size)
    assert abs(theirs / ours - 1) < 0.10, (name, preset, vocab_size, ours, theirs)


@needs_fla
@pytest.mark.parametrize("name", PEERS)
def test_built_from_flas_layer_with_the_contract_surface(name):
    import fla.layers

    torch.manual_seed(0)
    model = models.build(name, "tiny", vocab_size=97, checkpointing=True)
    layer = getattr(fla.layers, fla_peers.KINDS[model.config.kind][0])
    assert len(model.blocks) == model.config.n_layers
    assert all(isinstance(block.mixer, layer) for block in model.blocks)
    assert model.embed.weight.shape == (97, model.config.d_model)
    # tied head: the embedding is the only vocabulary-sized table
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    rest = model.num_params() - model.embed.weight.numel()
    assert rest == sum(p.numel() for p in model.blocks.parameters()) + 2 * model.config.d_model
    with pytest.raises(FlaUnavailable, match="CUDA"):
        model(torch.zeros(1, 4, dtype=torch.long))


# ------------------------------------------------------------------------- with fla, on CUDA


def _ids(seq, vocab=97, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, seq), generator=gen).cuda()


def _training_refused(kind):
    cap = torch.cuda.get_device_capability()
    return hopper_refusal(kind, cap, fla_peers._triton_version(), fla_peers._tilelang_installed())


@pytest.mark.gpu
@needs_fla
@needs_cuda
@pytest.mark.parametrize("seq", [33, 200])  # fla's recurrent form below 64 tokens, chunks above
@pytest.mark.parametrize("name", PEERS)
def test_cuda_future_tokens_do_not_move_past_logits(name, seq):
    torch.manual_seed(0)
    model = models.build(name, "tiny", vocab_size=97).cuda().eval()
    ids, t = _ids(seq), seq // 2 + 3
    perturbed = ids.clone()
    perturbed[:, t + 1:] = (ids[:, t + 1:] + 1) % 97
    with torch.no_grad():
        before, again, after = model(ids), model(ids), model(perturbed)
    noise = (before - again).abs().max().item()  # a rerun of the same input: 0 when deterministic
    leak = (before[:, : t + 1] - after[:, : t + 1]).abs().max().item()
    assert leak <= noise, (leak, noise)
    assert (before[:, t + 1:] - after[:, t + 1:]).abs().max() > 0  # the perturbation reaches


@pytest.mark.gpu
@needs_fla
@needs_cuda
@pytest.mark.parametrize("name", PEERS)
def test_cuda_training_step_reaches_every_parameter_or_says_why_not(name):
    torch.manual_seed(0)
    model = models.build(name, "tiny", vocab_size=97).cuda().train()
    ids = _ids(200)
    refused = _training_refused(model.config.kind)
    if refused:
        with pytest.raises(FlaUnavailable, match="#640"):
            model(ids)
        return
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    nonfinite = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not nonfinite, f"parameters with a non-finite gradient: {nonfinite}"


def test_a_run_that_names_no_model_leaves_the_fla_peers_out():
    from muse.harness.cases import parse_models

    defaults = {name for name, _ in parse_models(None)}
    assert not any(name.startswith("fla-") for name in defaults)
    assert {"phase1", "phase2", "transformer"} <= defaults
    assert parse_models(["fla-retnet"]) == (("fla-retnet", "small"),)
