"""`muse generate CKPT --prompt TEXT`: the prompt, then the continuation streamed to stdout; the
greedy continuation is the model's own argmax; a user's mistake is one line and exit 2."""

import pytest
import torch

from muse.cli import main
from muse.training.evaluate import load_model

from .cli_checks import tiny_checkpoint, usage_error


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("generate"), "phase2:tiny", steps=2)


def test_greedy_generation_prints_the_prompt_and_the_models_argmax(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "the cat", "--max-new-tokens", "6",
                 "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    model, _ = load_model(checkpoint, torch.device("cpu"))
    ids = torch.tensor([list(b"the cat")])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat((ids, model.eval()(ids)[:, -1:].argmax(-1)), dim=1)
    assert out == bytes(ids[0].tolist()).decode("utf-8", errors="replace") + "\n"


def test_a_seed_reproduces_the_sampled_text(checkpoint, capsys):
    args = ["generate", str(checkpoint), "--prompt", "the", "--max-new-tokens", "12",
            "--top-k", "5", "--top-p", "0.9", "--seed", "4", "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("the")


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "-1"], "--temperature must be ≥ 0 (0: greedy), got -1.0"),
    (["--top-p", "0"], "--top-p must be in (0, 1] (1: off), got 0.0"),
    (["--top-k", "-3"], "--top-k must be an integer ≥ 0 (0: off), got -3"),
    (["--prompt", ""], "--prompt encodes to no tokens"),
])
def test_bad_settings_are_one_line_and_exit_2(checkpoint, capsys, extra, message):
    usage_error(capsys, ["generate", checkpoint, "--prompt", "the", "--device", "cpu", *extra],
                message)


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    usage_error(capsys, ["generate", tmp_path / "none.pt", "--prompt", "x", "--device", "cpu"],
                "none.pt")
