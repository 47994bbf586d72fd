"""`muse eval` on a file that is not a checkpoint, or on a device that is not there: exit
status 2, one line on stderr naming the file and the fault, no traceback."""

import pytest
import torch

from .cli_checks import tiny_checkpoint, usage_error


@pytest.fixture(scope="module")
def final(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("eval"))


def corrupt(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside a tensor: torch.load alone would not notice
    return bytes(flipped)


@pytest.mark.parametrize("name, make, words", [
    ("truncated.pt", lambda d: d[: len(d) // 3], ["not a complete checkpoint"]),
    ("flipped.pt", corrupt, ["is corrupted", "checksum"]),
    ("empty.pt", lambda d: b"", ["not a complete checkpoint"]),
    ("notes.pt", lambda d: b"some text\n", ["not a complete checkpoint"]),
    ("run.toml", lambda d: b'model = "phase1"\n', ["not a complete checkpoint"]),
    ("results.json", lambda d: b'{"schema_version": 1}', ["not a complete checkpoint"]),
])
def test_a_file_that_is_not_a_checkpoint(final, tmp_path, capsys, name, make, words):
    path = tmp_path / name
    path.write_bytes(make(final.read_bytes()))
    usage_error(capsys, ["eval", path, "--device", "cpu"], name, *words, "written by muse train")


def test_other_programs_files_and_folders(final, tmp_path, capsys):
    torch.save({"a": 1}, tmp_path / "dict.pt")
    usage_error(capsys, ["eval", tmp_path / "dict.pt", "--device", "cpu"],
                "not a muse training checkpoint", "another program's file", "lacks model")
    torch.save(torch.load(final, weights_only=False)["model"], tmp_path / "weights.pt")
    usage_error(capsys, ["eval", tmp_path / "weights.pt", "--device", "cpu"], "a bare state_dict")
    usage_error(capsys, ["eval", tmp_path, "--device", "cpu"], "is a directory")
    usage_error(capsys, ["eval", tmp_path / "none.pt", "--device", "cpu"],
                "none.pt' does not exist")


def test_weights_that_do_not_fit_the_model(final, tmp_path, capsys):
    ckpt = torch.load(final, weights_only=False)
    ckpt["model"] = {k: v[:1] for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "cut.pt")
    usage_error(capsys, ["eval", tmp_path / "cut.pt", "--device", "cpu"],
                "cut.pt", "its weights do not fit 'transformer:tiny'", "size mismatch")
    ckpt["config"]["model"] = "gpt5"
    torch.save(ckpt, tmp_path / "gpt5.pt")
    usage_error(capsys, ["eval", tmp_path / "gpt5.pt", "--device", "cpu"], "unknown model 'gpt5'")


def test_bad_windows_and_splits(final, capsys):
    usage_error(capsys, ["eval", final, "--device", "cpu", "--context", "1"],
                "--context must be ≥ 2")
    usage_error(capsys, ["eval", final, "--device", "cpu", "--context", "8", "--stride", "9"],
                "--stride must be in [1, --context=8], got 9")
    usage_error(capsys, ["eval", final, "--device", "cpu", "--split", "dev"], "unknown split 'dev'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")
def test_cuda_without_cuda(final, capsys):
    usage_error(capsys, ["eval", final, "--device", "cuda"], "device 'cuda'",
                "CUDA is not available")
