"""What a training run does when something goes wrong: a diverged loss, a second training
into the same out_dir, SIGTERM and a double SIGINT."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import muse.training.train as trainer
from muse.cli import main
from muse.training.rundir import LOCK, RunDir
from muse.training.train import TrainConfig, train

TEXT = "the cat sat on the mat and the dog ran to the park . " * 40


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"{split}.txt").write_text(TEXT, encoding="utf-8")
    return folder


def tiny(corpus, out, **kw) -> TrainConfig:
    values = dict(model="transformer:tiny", corpus=str(corpus), tokenizer="bytes", seq_len=16,
                  batch_size=2, steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=1, eval_every=2,
                  eval_tokens=128, out_dir=str(out), device="cpu", progress=False)
    return TrainConfig(**{**values, **kw})


def strict_json(path):
    def reject(constant):
        raise AssertionError(f"{path.name} holds a bare {constant}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def nan_loss_at(monkeypatch, call: int):
    real, calls = trainer.lm_loss, {"n": 0}

    def loss(logits, ids):
        calls["n"] += 1
        value = real(logits, ids)
        return value * float("nan") if calls["n"] >= call else value

    monkeypatch.setattr(trainer, "lm_loss", loss)


def test_a_nan_loss_stops_the_run_and_saves_nothing_as_best(corpus, tmp_path, monkeypatch):
    # the trainer calls lm_loss once per micro-batch; validation does not call it
    nan_loss_at(monkeypatch, call=3)
    out = tmp_path / "run"
    result = train(tiny(corpus, out))
    assert result.step == 3 and result.diverged == "training loss nan at step 3"
    best = torch.load(out / "best.pt", weights_only=False)
    assert best["step"] == 2 and best["best_val_loss"] == result.best_val_loss
    assert all(torch.isfinite(t).all() for t in best["model"].values())
    rows = strict_json(out / "history.json")["transformer:tiny"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["loss"] is None and rows[2]["nonfinite"]["loss"] == "nan"
    assert "nonfinite" not in rows[0]
    run = strict_json(out / "run.json")
    assert run["status"] == "diverged" and run["reason"] == result.diverged and run["step"] == 3
    assert not (out / LOCK).exists()


def test_the_cli_exits_3_on_divergence(corpus, tmp_path, monkeypatch, capsys):
    nan_loss_at(monkeypatch, call=1)
    path = tmp_path / "run.toml"
    path.write_text(f'model = "transformer:tiny"\ncorpus = "{corpus}"\nseq_len = 16\n'
                    'batch_size = 2\nsteps = 4\ndevice = "cpu"\nprogress = false\n'
                    f'out_dir = "{tmp_path / "run"}"\n', encoding="utf-8")
    assert main(["train", str(path)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diverged: training loss nan at step 1" in err
    assert not (tmp_path / "run" / "best.pt").exists()
    assert strict_json(tmp_path / "run" / "run.json")["status"] == "diverged"


def test_a_second_training_into_a_held_out_dir_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    with RunDir(out):
        path = tmp_path / "run.toml"
        path.write_text(f'model = "transformer:tiny"\ncorpus = "{corpus}"\nseq_len = 16\n'
                        f'device = "cpu"\nout_dir = "{out}"\n', encoding="utf-8")
        assert main(["train", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is in use by another training" in err
        assert f"pid {os.getpid()}" in err and LOCK in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK]
    assert not out.exists()  # made for the run that held it, which wrote nothing


def test_a_stale_lock_is_taken_over(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": "here", "started_at": "then"}))
    result = train(tiny(corpus, out, steps=2))
    assert result.step == 2 and not (out / LOCK).exists()


def test_files_follow_the_umask(corpus, tmp_path):
    old = os.umask(0o027)
    try:
        train(tiny(corpus, tmp_path / "run", steps=1))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()}
    assert modes == dict.fromkeys(["best.pt", "final.pt", "history.json", "run.json"], 0o640)


@pytest.mark.parametrize("signum, error", [(signal.SIGTERM, trainer.Terminated),
                                           (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_between_the_update_and_its_bookkeeping_waits_for_them(
        corpus, tmp_path, monkeypatch, signum, error):
    # synchronize runs after the optimizer step and before the step's history row
    straight = train(tiny(corpus, tmp_path / "a", checkpoint_every=3))
    real, calls = trainer.synchronize, {"n": 0}

    def signal_once(device):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signum)
        real(device)

    monkeypatch.setattr(trainer, "synchronize", signal_once)
    with pytest.raises(error):
        train(tiny(corpus, tmp_path / "b"))
    monkeypatch.setattr(trainer, "synchronize", real)
    emergency = torch.load(tmp_path / "b" / "emergency.pt", weights_only=False)
    at_3 = torch.load(tmp_path / "a" / "step-000003.pt", weights_only=False)
    assert emergency["step"] == len(emergency["history"]) == 3
    assert all(torch.equal(emergency["model"][k], at_3["model"][k]) for k in at_3["model"])
    resumed = train(tiny(corpus, tmp_path / "b"), resume=tmp_path / "b" / "emergency.pt")
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]


# ------------------------------------------------------------------- other processes

# The child slows its emergency save down and says when it starts, so a test can signal
# again while the save is under way.
CHILD = textwrap.dedent("""
    import sys, time
    import muse.training.train as trainer
    from muse.cli import main

    real = trainer.atomic_save
    def slow(obj, path):
        if path.name == "emergency.pt":
            print("SAVING", file=sys.stderr, flush=True)
            time.sleep(1.5)
        real(obj, path)
    trainer.atomic_save = slow
    sys.exit(main(sys.argv[1:]))
""")


def start(corpus, tmp_path, out, steps=100000):
    path = tmp_path / f"{out.name}.toml"
    path.write_text(f'model = "transformer:tiny"\ncorpus = "{corpus}"\nseq_len = 16\n'
                    f'batch_size = 2\nsteps = {steps}\neval_every = 0\neval_tokens = 64\n'
                    f'device = "cpu"\nprogress = false\nout_dir = "{out}"\n', encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, "train", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc, out, n, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if len(json.loads((out / "history.json").read_text())["transformer:tiny"]) >= n:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {n} steps in {timeout} s")


def test_sigterm_saves_emergency_once_and_exits_143(corpus, tmp_path):
    out = tmp_path / "run"
    proc = start(corpus, tmp_path, out)
    wait_for_steps(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = err.splitlines()
    assert lines.count("SAVING") == 1
    assert lines[-1] == (f"muse train: interrupted (SIGTERM): state saved to {out}/emergency.pt "
                         f"(resume with --resume {out}/emergency.pt)")
    ckpt = torch.load(out / "emergency.pt", weights_only=False)
    history = json.loads((out / "history.json").read_text())["transformer:tiny"]
    assert ckpt["step"] == len(ckpt["history"]) == len(history) >= 2
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert sorted(p.name for p in out.iterdir()) == ["emergency.pt", "history.json", "run.json"]


def test_a_second_sigint_waits_for_the_save(corpus, tmp_path):
    out = tmp_path / "run"
    proc = start(corpus, tmp_path, out)
    wait_for_steps(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    assert proc.stderr.readline().strip() == "SAVING"
    proc.send_signal(signal.SIGINT)  # during the save
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130, rest
    assert rest.splitlines() == [
        "muse train: SIGINT while saving emergency.pt: exiting when the save is done",
        f"muse train: interrupted (SIGINT): state saved to {out}/emergency.pt "
        f"(resume with --resume {out}/emergency.pt)",
    ]
    assert torch.load(out / "emergency.pt", weights_only=False)["step"] >= 2


def test_two_trainings_at_once_into_one_out_dir(corpus, tmp_path):
    out = tmp_path / "run"
    procs = [start(corpus, tmp_path, out, steps=30) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert refused.count("\n") == 1
    assert "is in use by another training" in refused or "already holds a run" in refused
    history = json.loads((out / "history.json").read_text())["transformer:tiny"]
    assert [r["step"] for r in history] == list(range(1, 31))
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
