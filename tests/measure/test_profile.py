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
