"""The trainer on a tiny transformer and a few KB of text, on CPU."""

import json
import math
import random

import pytest
import torch

import muse.training.train as trainer
from muse.cli import main
from muse.training.train import ConfigError, TrainConfig, load_config, lr_at, train

WORDS = ("the cat sat on a mat and the dog ran to the park while rain fell on old stone "
         "roofs of the quiet town by the river").split()


def _text(seed: int, n_lines: int) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(12)) + " .\n"
                   for _ in range(n_lines))


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, (seed, n) in {"train": (0, 80), "valid": (1, 8), "test": (2, 8)}.items():
        (folder / f"{split}.txt").write_text(_text(seed, n), encoding="utf-8")
    return folder


def tiny(corpus, out, **kw) -> TrainConfig:
    values = dict(model="transformer:tiny", model_overrides={"vocab_size": 256},
                  corpus=str(corpus), tokenizer="bytes", seq_len=32, batch_size=2, steps=8,
                  lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=4, eval_tokens=512,
                  out_dir=str(out), device="cpu", progress=False)
    return TrainConfig(**{**values, **kw})


def losses(result) -> torch.Tensor:
    return torch.tensor([row["loss"] for row in result.history], dtype=torch.float64)


def test_lr_schedule_key_steps():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(4, cfg) == pytest.approx(0.5)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)
    steps = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(steps, steps[1:], strict=False))
    no_warmup = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, steps=4)
    assert lr_at(0, no_warmup) == pytest.approx(1.0)
    assert lr_at(2, no_warmup) == pytest.approx(0.5)


def test_toml_config_and_sets(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "transformer:tiny"\nlr = 1\nbetas = [0.9, 0.99]\n'
                    "[model_overrides]\nn_layers = 1\n", encoding="utf-8")
    cfg = load_config(path, ["steps=7", "model=transformer:small", "compile=true",
                             "model_overrides.d_model=32", "min_lr=0"])
    assert (cfg.model, cfg.steps, cfg.compile, cfg.lr, cfg.min_lr) == (
        "transformer:small", 7, True, 1.0, 0.0)
    assert cfg.betas == (0.9, 0.99)
    assert cfg.model_overrides == {"n_layers": 1, "d_model": 32}


def test_unknown_key_in_toml_is_an_error(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "transformer:tiny"\nlearning_rate = 1e-3\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(path)


def test_unknown_key_in_set_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="warmup"):
        load_config(None, ["warmup=10"])
    with pytest.raises(ConfigError, match="steps"):
        load_config(None, ["steps=many"])
    with pytest.raises(ConfigError, match="steps"):
        load_config(None, ["steps=1.5"])


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:7"])
def test_a_device_or_one_gpu_by_index_is_accepted(device):
    # parallel training runs place their jobs on cuda:<index> (training.quality.job_devices)
    assert TrainConfig(model="transformer:tiny", device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cuda:-1", "cpu:0", ""])
def test_other_device_names_are_refused_naming_the_valid_ones(device):
    with pytest.raises(ConfigError, match=r"device must be one of auto, cuda, cpu or cuda:<index>"):
        TrainConfig(model="transformer:tiny", device=device)


def test_cli_reports_unknown_key(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text("stepz = 3\n", encoding="utf-8")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and err.count("\n") == 1


def test_resume_is_bit_exact(corpus, tmp_path):
    straight = train(tiny(corpus, tmp_path / "a", checkpoint_every=4))
    assert (tmp_path / "a" / "step-000004.pt").is_file()
    resumed = train(tiny(corpus, tmp_path / "b", checkpoint_every=4),
                    resume=tmp_path / "a" / "step-000004.pt")
    assert resumed.step == straight.step == 8
    assert torch.equal(losses(straight), losses(resumed))
    final_a = torch.load(tmp_path / "a" / "final.pt", weights_only=False)["model"]
    final_b = torch.load(tmp_path / "b" / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_checkpoints_are_written_atomically(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny(corpus, out, steps=4, eval_every=2, checkpoint_every=2))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["best.pt", "final.pt", "history.json", "run.json",
                     "step-000002.pt", "step-000004.pt"]
    ckpt = torch.load(out / "final.pt", weights_only=False)
    assert ckpt["step"] == 4
    assert ckpt["tokenizer"]["name"] == "bytes" and len(ckpt["tokenizer"]["sha256"]) == 64
    assert {"model", "optimizer", "scaler", "data_generator", "rng", "config"} <= set(ckpt)
    best = torch.load(out / "best.pt", weights_only=False)
    assert best["best_val_loss"] == min(r["val_loss"] for r in ckpt["history"] if "val_loss" in r)


def test_emergency_save_on_exception_resumes(corpus, tmp_path, monkeypatch):
    straight = train(tiny(corpus, tmp_path / "a"))
    calls = {"n": 0}
    real_loss = trainer.lm_loss

    def failing(logits, ids):
        calls["n"] += 1
        if calls["n"] == 6:  # inside step 6
            raise RuntimeError("boom")
        return real_loss(logits, ids)

    monkeypatch.setattr(trainer, "lm_loss", failing)
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny(corpus, tmp_path / "b"))
    monkeypatch.setattr(trainer, "lm_loss", real_loss)
    emergency = tmp_path / "b" / "emergency.pt"
    assert emergency.is_file()
    assert not [p for p in (tmp_path / "b").iterdir() if p.suffix == ".tmp"]
    assert torch.load(emergency, weights_only=False)["step"] == 5
    assert len(json.loads((tmp_path / "b" / "history.json").read_text())["transformer:tiny"]) == 5
    resumed = train(tiny(corpus, tmp_path / "b"), resume=emergency)
    assert torch.equal(losses(straight), losses(resumed))


def test_emergency_save_on_keyboard_interrupt(corpus, tmp_path, monkeypatch):
    real_loss = trainer.lm_loss
    calls = {"n": 0}

    def interrupted(logits, ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_loss(logits, ids)

    monkeypatch.setattr(trainer, "lm_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(corpus, tmp_path / "run", steps=4))
    ckpt = torch.load(tmp_path / "run" / "emergency.pt", weights_only=False)
    assert ckpt["step"] == 2 and len(ckpt["history"]) == 2


def test_best_checkpoint_holds_its_own_row(corpus, tmp_path):
    train(tiny(corpus, tmp_path / "run", steps=4, eval_every=2))
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert best["history"][-1]["step"] == best["step"]
    assert best["history"][-1]["val_loss"] == best["best_val_loss"]


def test_history_fields_and_applied_lr(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", steps=6, eval_every=3)
    train(cfg)
    rows = json.loads((tmp_path / "run" / "history.json").read_text())["transformer:tiny"]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for i, row in enumerate(rows):
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes"} <= set(row)
        assert row["lr"] == pytest.approx(lr_at(i, cfg), rel=0, abs=1e-15)
        assert row["peak_mem_bytes"] is None and row["tokens_per_s"] > 0
        assert math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
    evaluated = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [3, 6]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in evaluated)


def test_model_diagnostics_go_to_history(corpus, tmp_path, monkeypatch):
    from muse.models.transformer import TransformerLM

    monkeypatch.setattr(TransformerLM, "diagnostics",
                        lambda self: {"embed_norm": self.embed.weight.norm()}, raising=False)
    result = train(tiny(corpus, tmp_path / "run", steps=2))
    assert all(isinstance(r["diagnostics"]["embed_norm"], float) for r in result.history)


def test_short_run_lowers_training_loss(corpus, tmp_path):
    result = train(tiny(corpus, tmp_path / "run", steps=60, batch_size=4, eval_every=0,
                        lr=1e-2, min_lr=1e-3, warmup_steps=5))
    first, last = losses(result)[:5].mean(), losses(result)[-5:].mean()
    assert first > 4.5  # about ln 256 ≈ 5.5 at the start
    assert last < 0.6 * first
    assert result.history[-1]["val_loss"] < result.history[0]["loss"]


def test_cli_train_runs(corpus, tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text(f'model = "transformer:tiny"\ncorpus = "{corpus}"\nseq_len = 16\n'
                    "batch_size = 2\nsteps = 2\neval_every = 0\ndevice = \"cpu\"\n"
                    "[model_overrides]\nvocab_size = 256\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["train", str(path), "--set", f"out_dir={out}", "--set", "progress=false"]) == 0
    assert (out / "final.pt").is_file()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_and_accumulation_run(corpus, tmp_path, dtype):
    result = train(tiny(corpus, tmp_path / "run", steps=2, grad_accum=2, dtype=dtype,
                        checkpointing=True))
    ckpt = torch.load(tmp_path / "run" / "final.pt", weights_only=False)
    assert ckpt["model_overrides"]["checkpointing"] is True
    assert all(math.isfinite(r["loss"]) for r in result.history)
    if dtype == "fp16":
        assert ckpt["scaler"]  # loss scaling on: the scaler has state to resume


def test_the_chunked_loss_trains_as_the_full_logits_do(corpus, tmp_path):
    # float32 on the CPU: the two sum the loss in a different order, so ~1e-6 apart per step
    full = losses(train(tiny(corpus, tmp_path / "a", steps=4)))
    chunked = losses(train(tiny(corpus, tmp_path / "b", steps=4, loss_chunk=13)))
    assert torch.allclose(full, chunked, rtol=1e-4, atol=0)


def test_a_negative_loss_chunk_is_refused():
    with pytest.raises(ConfigError, match="loss_chunk must be ≥ 0, got -1"):
        TrainConfig(loss_chunk=-1)


def test_compile_mode_reaches_torch_compile_and_marks_each_step(corpus, tmp_path, monkeypatch):
    # torch.compile itself is stood in for: what is checked is what the trainer asks of it
    modes, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: modes.append(mode) or m)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    train(tiny(corpus, tmp_path / "run", steps=3, grad_accum=2, eval_every=0, compile=True,
               compile_mode="reduce-overhead"))
    assert modes == ["reduce-overhead"]  # one rank: validation runs the same compiled module
    assert len(marks) == 3 * 2  # before each micro-batch's forward


def test_the_history_says_how_many_graphs_compiling_made(corpus, tmp_path, monkeypatch):
    # dynamo's own tracing, without inductor's C++ build: the graph count is dynamo's
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: real(m, backend="eager"))
    torch._dynamo.reset()
    history = train(tiny(corpus, tmp_path / "run", steps=3, eval_every=0, compile=True)).history
    rows = [row for row in history if "loss" in row]
    assert rows[0]["graphs_compiled"] == 1  # the whole training forward, no graph break
    assert all("graphs_compiled" not in row for row in rows[1:])  # nothing compiled again


@pytest.mark.parametrize(("values", "message"), [
    ({"compile": True, "compile_mode": "fast"},
     "compile_mode must be one of default, reduce-overhead, max-autotune, "
     "max-autotune-no-cudagraphs, got 'fast'"),
    ({"compile_mode": "reduce-overhead"}, "compile_mode='reduce-overhead' needs compile=true"),
])
def test_a_bad_compile_mode_is_refused_naming_the_valid_ones(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_tf32_is_a_bool_set_for_the_run_and_restored_after(monkeypatch, corpus, tmp_path):
    with pytest.raises(ConfigError, match="tf32 must be true or false, got 'yes'"):
        TrainConfig(model="transformer:tiny", tf32="yes")
    seen = []
    real_step = trainer.Trainer.train_step

    def step(self):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real_step(self)

    monkeypatch.setattr(trainer.Trainer, "train_step", step)
    before = torch.backends.cuda.matmul.allow_tf32
    train(tiny(corpus, tmp_path / "run", steps=2, tf32=not before))
    assert seen == [not before, not before]
    assert torch.backends.cuda.matmul.allow_tf32 == before
