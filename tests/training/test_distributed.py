"""Two CPU ranks (gloo, started by `muse train --nproc 2` through torchrun on 127.0.0.1) against
one process on the same global batch; resuming across rank counts and strategies; the launcher's
refusals and exit statuses.

Every process of a comparison trains in float64 (torch's default dtype, set in the ranks by a
sitecustomize on PYTHONPATH): in float32 the rounding noise of gradients that are zero in exact
arithmetic (the key bias: softmax ignores a shift shared by a row) is as large as Adam's eps,
so such weights walk apart at random. In float64 the ranks add the same numbers in another
order (a mean per rank, then over ranks): weights, Adam moments and gradient norms agree to
1e-12 (measured: 6e-15); the loss, which `lm_loss` takes in float32, to 1e-6 relative."""

import contextlib
import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.distributed.run
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from muse.cli import main
from muse.training import distributed
from muse.training.checkpoint import load_checkpoint
from muse.training.train import TrainConfig, make_optimizer, sample_batch, train

WEIGHT_TOL, NORM_RTOL, LOSS_RTOL = 1e-12, 1e-12, 1e-6
WORDS = "the cat sat on a mat and the dog ran to the park while rain fell on old roofs".split()
RECIPE = dict(model="transformer:tiny", tokenizer="bytes", seq_len=32, batch_size=4, grad_accum=2,
              steps=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=2, eval_tokens=512,
              checkpoint_every=2, device="cpu", progress=False)


def _text(seed: int, n_lines: int) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(12)) + " .\n" for _ in range(n_lines))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for split, (seed, n) in {"train": (0, 80), "valid": (1, 8), "test": (2, 8)}.items():
        (folder / f"{split}.txt").write_text(_text(seed, n), encoding="utf-8")
    return folder


def config(corpus, out, **kw) -> TrainConfig:
    return TrainConfig(**{**RECIPE, "corpus": str(corpus), "out_dir": str(out),
                          "model_overrides": {"vocab_size": 256}, **kw})


def toml_file(path, corpus, **kw):
    lines = [f"{k} = {json.dumps(v)}" for k, v in {**RECIPE, "corpus": str(corpus), **kw}.items()]
    path.write_text("\n".join(lines + ["[model_overrides]", "vocab_size = 256", ""]), "utf-8")
    return path


def launch_two(config_path, out, site, *args):
    """`muse train --nproc 2` in a fresh interpreter, as a user runs it, in float64."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "muse.cli", "train", str(config_path),
                           "--nproc", "2", "--set", f"out_dir={out}", *args],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@contextlib.contextmanager
def float64():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A sitecustomize that makes float64 torch's default dtype in every process of a run."""
    folder = tmp_path_factory.mktemp("site")
    (folder / "sitecustomize.py").write_text(
        "import torch\n\ntorch.set_default_dtype(torch.float64)\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def one(corpus, tmp_path_factory):
    """The reference: one process, 4 steps (step-000002.pt on the way), float64."""
    out = tmp_path_factory.mktemp("one")
    with float64():
        train(config(corpus, out))
    return out


def final(run_dir) -> dict:
    return load_checkpoint(run_dir / "final.pt")


def column(ckpt: dict, key: str) -> torch.Tensor:
    return torch.tensor([r[key] for r in ckpt["history"]], dtype=torch.float64)


def assert_same_training(a: dict, b: dict) -> None:
    torch.testing.assert_close(column(b, "loss"), column(a, "loss"), rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(column(b, "grad_norm"), column(a, "grad_norm"), rtol=NORM_RTOL,
                               atol=0)
    assert a["model"].keys() == b["model"].keys()
    for key, weight in a["model"].items():
        assert weight.dtype == b["model"][key].dtype == torch.float64
        assert not hasattr(b["model"][key], "device_mesh")  # a plain tensor, not FSDP's DTensor
        torch.testing.assert_close(b["model"][key], weight, rtol=0, atol=WEIGHT_TOL)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, moments in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(b["optimizer"]["state"][index][name], moments[name],
                                       rtol=0, atol=WEIGHT_TOL)
        assert float(b["optimizer"]["state"][index]["step"]) == float(moments["step"]) == 4
    assert torch.equal(a["data_generator"], b["data_generator"])
    val = [r["val_loss"] for r in a["history"] if "val_loss" in r]
    assert [r["val_loss"] for r in b["history"] if "val_loss" in r] == pytest.approx(
        val, rel=LOSS_RTOL)


@pytest.mark.slow  # a torchrun launch of two ranks: about 8 s on 2 cores
def test_two_ranks_train_as_one_process_and_resume_on_one(corpus, one, site, tmp_path):
    launch_two(toml_file(tmp_path / "run.toml", corpus), tmp_path / "ddp", site)
    ddp = final(tmp_path / "ddp")
    assert_same_training(final(one), ddp)
    assert [r["ranks"] for r in ddp["history"]] == [2, 2, 2, 2]
    assert [r["ranks"] for r in final(one)["history"]] == [1, 1, 1, 1]
    doc = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert doc["status"] == "complete"
    assert doc["distributed"] == ddp["distributed"] == {
        "ranks": 2, "parallel": "ddp", "backend": "gloo"}
    rows = json.loads((tmp_path / "ddp" / "history.json").read_text())["transformer:tiny"]
    assert [r["ranks"] for r in rows] == [2, 2, 2, 2]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "best.pt", "final.pt", "history.json", "run.json", "step-000002.pt", "step-000004.pt"]

    with float64():  # the 2-rank checkpoint of step 2, continued on one rank
        train(config(corpus, tmp_path / "back"), resume=tmp_path / "ddp" / "step-000002.pt")
    back = final(tmp_path / "back")
    assert_same_training(final(one), back)
    assert [r["ranks"] for r in back["history"]] == [2, 2, 1, 1]
    assert back["distributed"]["ranks"] == 1


@pytest.mark.slow  # a torchrun launch of two ranks: about 8 s on 2 cores
def test_fsdp_continues_a_one_rank_checkpoint_on_two(corpus, one, site, tmp_path):
    launch_two(toml_file(tmp_path / "run.toml", corpus), tmp_path / "fsdp", site,
               "--set", "parallel=fsdp", "--resume", str(one / "step-000002.pt"))
    fsdp = final(tmp_path / "fsdp")
    assert_same_training(final(one), fsdp)
    assert [r["ranks"] for r in fsdp["history"]] == [1, 1, 2, 2]
    assert fsdp["distributed"] == {"ranks": 2, "parallel": "fsdp", "backend": "gloo"}


def test_each_rank_takes_its_slice_of_the_one_process_batch():
    ids = torch.arange(1000)
    whole_gen = torch.Generator().manual_seed(3)
    whole = sample_batch(ids, 6, 5, whole_gen)
    slices = []
    for rank in range(3):
        gen = torch.Generator().manual_seed(3)
        slices.append(sample_batch(ids, 6, 5, gen, distributed.Ranks(rank, 3)))
        assert torch.equal(gen.get_state(), whole_gen.get_state())
    assert torch.equal(torch.cat(slices), whole)


def test_optimizer_state_by_name_and_back():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    names = distributed._names(model)
    state = optimizer.state_dict()
    by_name = distributed._by_name(state, optimizer, names)
    assert set(by_name["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert by_name["param_groups"][0]["params"] == ["0.weight"]
    back = distributed._by_index(by_name, optimizer, names)
    assert back["param_groups"] == state["param_groups"]
    assert back["state"].keys() == state["state"].keys()


@pytest.mark.parametrize("nproc", ["0", "-1", "two"])
def test_launcher_refuses_a_bad_nproc(corpus, tmp_path, capsys, nproc):
    path = toml_file(tmp_path / "run.toml", corpus, out_dir=str(tmp_path / "out"))
    with pytest.raises(SystemExit) as exc:
        main(["train", str(path), "--nproc", nproc])
    assert exc.value.code == 2
    assert "--nproc" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("sets", "cuda", "said"), [
    (["device=cuda"], 0, "device 'cuda' asked for, but no CUDA device is visible here"),
    (["device=auto"], 1, "--nproc 2: this host has 1 CUDA device(s) and each rank needs one"),
    (["device=cuda"], 1, "--nproc 2: this host has 1 CUDA device(s) and each rank needs one"),
    (["batch_size=3"], 0, "batch_size 3 does not split evenly over 2 ranks"),
    (["parallel=fsdp", "dtype=fp16"], 0, "parallel = fsdp trains in fp32 or bf16"),
    (["parallel=zero"], 0, "parallel must be one of ddp, fsdp, got 'zero'"),
])
def test_launcher_refuses_what_cannot_run(corpus, tmp_path, capsys, monkeypatch, sets, cuda,
                                          said):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("launched"))
    path = toml_file(tmp_path / "run.toml", corpus, out_dir=str(tmp_path / "out"))
    args = [a for s in sets for a in ("--set", s)]
    assert main(["train", str(path), "--nproc", "2", *args]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_nproc_inside_torchrun_is_refused(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = toml_file(tmp_path / "run.toml", corpus, out_dir=str(tmp_path / "out"))
    assert main(["train", str(path), "--nproc", "2"]) == 2
    assert "--nproc inside torchrun" in capsys.readouterr().err


@pytest.mark.parametrize(("failures", "status", "said"), [
    ({0: 3, 1: 3}, 3, ""),  # a divergence: every rank exits 3
    ({0: 2}, 2, ""),  # a user's mistake found on rank 0
    ({1: -9}, 137, "rank 1 of 2 was ended by SIGKILL"),
])
def test_launch_exit_status_is_the_failed_rank_s(monkeypatch, capsys, failures, status, said):
    def failing(args):
        assert os.environ["NCCL_NVLS_ENABLE"] == "0"
        assert args.rdzv_endpoint == "127.0.0.1:0" and args.nproc_per_node == "2"
        raise ChildFailedError("muse.cli", {
            rank: ProcessFailure(rank, 100 + rank, code, "/nonexistent/error.json")
            for rank, code in failures.items()})

    monkeypatch.setattr(torch.distributed.run, "run", failing)
    before = dict(os.environ)
    assert distributed.launch(2, ["train", "x.toml"], cuda=False) == status
    assert said in capsys.readouterr().err
    assert dict(os.environ) == before  # the launcher's settings were for the ranks only
