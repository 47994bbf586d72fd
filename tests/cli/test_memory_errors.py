"""`muse memory`: a user's mistake is one line and exit status 2, before any CUDA work."""

import pytest
import torch

from .cli_checks import usage_error


@pytest.mark.parametrize("argv, words", [
    (["memory", "phase7:tiny", "--seq", "64", "--device", "cpu"], ["--device cpu", "CUDA"]),
    (["memory", "nope:tiny", "--seq", "64", "--device", "cpu"], ["--device cpu"]),
])
def test_off_cuda_it_says_it_needs_cuda(capsys, argv, words):
    usage_error(capsys, argv, *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_asked_for_without_cuda_names_the_option(capsys):
    usage_error(capsys, ["memory", "phase7:tiny", "--seq", "64"], "--device")


def test_a_seq_that_is_not_a_positive_integer_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        from muse.cli import main

        main(["memory", "phase7:tiny", "--seq", "0"])
    assert exc.value.code == 2
    assert "--seq" in capsys.readouterr().err
