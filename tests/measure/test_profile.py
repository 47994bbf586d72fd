"""`muse profile` on the CPU: the sublayer ranges are found and the shares are sane."""

import pytest
import torch

from muse import models
from muse.cli import main
from muse.measure.profile import profile_step


def test_sublayers_of_every_block_are_labelled():
    model = models.build("phase2", "tiny")
    step_s, sublayers, kernels = profile_step(model, 32, phase="forward", device="cpu",
                                              dtype=torch.float32, steps=2, warmup=1)
    names = {r.name: r for r in sublayers}
    kinds = ("muse::NonHermitianBKMixer", "muse::DissipativeHebbian", "muse::MLP")
    assert {f"{k} [kernels]" for k in kinds} <= set(names)  # no [span]: no GPU timeline here
    assert names["muse::MLP [kernels]"].calls == model.config.n_layers
    assert step_s > 0 and kernels and all(r.time_ms > 0 for r in kernels)




def test_bad_phase_is_named():
    with pytest.raises(ValueError, match="'backward'"):
        profile_step(models.build("phase1", "tiny"), 8, phase="backward", device="cpu")


def test_cli_prints_both_tables(capsys):
    assert main(["profile", "phase1:tiny", "--seq", "16", "--device", "cpu", "--dtype", "fp32",
                 "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "muse::BKMixer [kernels]" in out and "self time" in out


def test_the_fixed_tokens_step_is_the_benchs(capsys):
    assert main(["profile", "phase8:tiny", "--seq", "16", "--tokens-per-step", "32",
                 "--loss-chunk", "8", "--device", "cpu", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "fixed-tokens train step seq 16 batch 2 bf16 fused AdamW, loss chunk 8" in out
    assert "muse::CausalLinearAttention [kernels]" in out


def test_a_compiled_step_has_kernels_but_no_sublayer_labels(capsys):
    # the eager backend: torch.compile's path without inductor's C++ build
    torch._dynamo.reset()  # no other test's compiles of this model class counted against it
    assert main(["profile", "transformer:tiny", "--seq", "16", "--compile", "eager",
                 "--device", "cpu", "--dtype", "fp32", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "torch.compile (eager)" in out and "not labelled" in out
    assert "muse::" not in out and "self time" in out
    assert "torch.compile made 1 graph of the model" in out  # no graph break


@pytest.mark.parametrize("extra, named", [
    (["--batch", "2"], "--batch 2"), (["--dtype", "fp16"], "--dtype fp16"),
    (["--phase", "forward"], "--phase forward"), (["--seq", "64"], "--seq 64"),
])
def test_the_fixed_tokens_step_refuses_what_it_fixes(extra, named, capsys):
    args = ["profile", "phase8:tiny", "--seq", "16", "--tokens-per-step", "32",
            "--device", "cpu", *extra]
    assert main(args) == 2
    assert named in capsys.readouterr().err


def test_a_kernel_listed_as_its_launch_and_itself_counts_once():
    from muse.measure.profile import Row, once_by_name

    rows = [Row("triton_red_fused_0", 15, 5.0, 0.1), Row("triton_red_fused_0", 15, 5.0, 0.1),
            Row("aten::mm", 96, 4.0, 0.08)]
    assert once_by_name(rows) == [rows[0], rows[2]]
