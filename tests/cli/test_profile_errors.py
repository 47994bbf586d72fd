"""`muse profile` at a size that does not fit: one line naming the size, exit status 2."""

import pytest
import torch

import muse.measure.profile as profile
from muse.cli import main


def check_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


def test_a_size_beyond_host_memory(capsys):
    # 10¹³ token ids (80 TB): the CPU allocator refuses at once, before any work
    code = main(["profile", "phase1:tiny", "--seq", "10000000", "--batch", "1000000",
                 "--device", "cpu", "--dtype", "fp32"])
    assert code == 2
    check_line(capsys, "muse profile: phase1:tiny at --seq 10000000 --batch 1000000",
               "does not fit in cpu memory", "one allocation asked for 80000000000000 bytes",
               "try a shorter --seq")


def test_a_size_beyond_gpu_memory(capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            "79.19 GiB of which 1.06 GiB is free. Of the allocated memory ...")

    monkeypatch.setattr(profile, "profile_step", out_of_memory)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["profile", "transformer", "--seq", "10000000"]) == 2
    check_line(capsys, "transformer at --seq 10000000 --batch 1 (fp16, train) does not fit in "
               "cuda memory: one allocation asked for 2.00 GiB of 79.19 GiB in all")


def test_a_bug_is_not_called_a_size(monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(profile, "profile_step", bug)
    with pytest.raises(RuntimeError, match="shapes"):  # a bug keeps its traceback
        main(["profile", "phase1:tiny", "--seq", "8", "--device", "cpu"])
