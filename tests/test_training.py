"""Training: learning, exact resume, failure modes, and two data-parallel processes."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FakeClock, blob_images, tiny_model_config
from safetensors.torch import load_file

from geca.config import RunConfig, TrainConfig
from geca.data.config import DataConfig
from geca.diffusion.config import DiffusionConfig
from geca.errors import CheckpointError, ConfigError, TrainingError
from geca.models.build import count_macs
from geca.models.config import ModelConfig, named_model
from geca.run import ModelSpec, load_run, read_spec
from geca.training.trainer import train


def tiny_config(steps: int, **train_overrides: object) -> RunConfig:
    cfg = RunConfig()
    cfg.model = tiny_model_config()
    cfg.data.spec = "blobs"
    cfg.train.max_steps = steps
    cfg.train.batch_size = 4
    cfg.train.lr = 1e-3
    cfg.train.log_every = 1
    cfg.train.sample_every = 0
    cfg.train.checkpoint_every = 0
    cfg.train.ema_decay = 0.9
    for k, v in train_overrides.items():
        setattr(cfg.train, k, v)
    return cfg


def _fixed_loss(run_dir: Path, weights: str) -> float:
    """Loss on fixed (t, noise) draws over the training images, so before/after are comparable."""
    loaded = load_run(run_dir, weights=weights)
    x0, y = blob_images(n=8, size=8).tensors()
    g = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.no_grad():
        for _ in range(8):
            t = torch.randint(0, 1000, (8,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            torch.manual_seed(0)
            terms = loaded.diffusion.training_losses(lambda xt, tt: loaded.model(xt, tt, y).output, x0, t, noise)
            total += terms["mse"].mean().item()
    return total / 8


def test_geca_t_overfits_eight_images(tmp_path: Path) -> None:
    cfg = tiny_config(steps=300, batch_size=8, lr=2e-3, checkpoint_every=300)
    cfg.model = named_model("GeCA-T")
    cfg.train.ema_decay = 0.0
    cfg.train.max_steps = 1
    train(cfg, tmp_path / "start", train_set=blob_images(n=8, size=8), progress=False)
    cfg.train.max_steps = 300
    train(cfg, tmp_path / "end", train_set=blob_images(n=8, size=8), progress=False)
    start, end = _fixed_loss(tmp_path / "start", "model"), _fixed_loss(tmp_path / "end", "model")
    assert end < 0.35 * start, (start, end)


@pytest.mark.parametrize("heredity", ["off", "gated"])
def test_resume_is_exact(tmp_path: Path, heredity: str) -> None:
    """Also for heredity-aware training, whose extra draws (which samples inherit, label drops) are seeded too."""
    data = blob_images(n=8, size=8)

    def config(steps: int) -> RunConfig:
        cfg = tiny_config(steps)
        cfg.model.heredity = heredity
        return cfg

    train(config(6), tmp_path / "once", train_set=data, progress=False)
    train(config(3), tmp_path / "twice", train_set=data, progress=False)
    train(config(6), tmp_path / "twice", resume=True, train_set=data, progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "once/checkpoints/step_0000006" / name)
        b = load_file(tmp_path / "twice/checkpoints/step_0000006" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"
    oa = torch.load(tmp_path / "once/checkpoints/step_0000006/optimizer.pt", weights_only=True)
    ob = torch.load(tmp_path / "twice/checkpoints/step_0000006/optimizer.pt", weights_only=True)
    for k in oa["state"]:
        assert torch.equal(oa["state"][k]["exp_avg_sq"], ob["state"][k]["exp_avg_sq"])
    steps = [line.split(",")[0] for line in (tmp_path / "twice/log.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4", "5", "6"]


def test_existing_run_needs_resume_and_resume_needs_the_same_setup(tmp_path: Path) -> None:
    data = blob_images(n=8, size=8)
    train(tiny_config(1), tmp_path / "run", train_set=data, progress=False)
    with pytest.raises(CheckpointError, match="--resume"):
        train(tiny_config(2), tmp_path / "run", train_set=data, progress=False)
    changed = tiny_config(2)
    changed.model.hidden_size = 64
    with pytest.raises(CheckpointError, match="differs"):
        train(changed, tmp_path / "run", resume=True, train_set=data, progress=False)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny_config(2), tmp_path / "empty", resume=True, train_set=data, progress=False)


def test_resume_may_change_how_the_model_runs(tmp_path: Path) -> None:
    """Attention implementation, gradient checkpointing, idle-cell skipping and compilation leave the maths as it is:
    a CPU run moved to a GPU resumes with `--attention triton` (a changed width is refused, above)."""
    data = blob_images(n=8, size=8)
    train(tiny_config(1), tmp_path / "run", train_set=data, progress=False)
    changed = tiny_config(2)
    changed.model.attention, changed.model.checkpointing, changed.model.skip_idle = "sliced", True, False
    changed.model.compile = "false"
    train(changed, tmp_path / "run", resume=True, train_set=data, progress=False)
    assert read_spec(tmp_path / "run").model.attention == "sliced"
    assert (tmp_path / "run/checkpoints/step_0000002/model.safetensors").is_file()
    # where the data comes from and whether it is flipped are not the setup either
    moved = tiny_config(3)
    moved.data.download, moved.data.latent_cache, moved.data.flip = True, str(tmp_path / "cache"), False
    train(moved, tmp_path / "run", resume=True, train_set=data, progress=False)
    assert read_spec(tmp_path / "run").data.flip is False
    moved.data.image_size = 6
    with pytest.raises(CheckpointError, match="differs"):
        train(moved, tmp_path / "run", resume=True, train_set=data, progress=False)


def test_a_resume_that_moves_the_learning_rate_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The cosine schedule ends at max_steps: more steps on resume raise the lr of the step it continues from."""
    data = blob_images(n=8, size=8)
    for schedule in ("constant", "cosine"):
        train(tiny_config(2, lr_schedule=schedule), tmp_path / schedule, train_set=data, progress=False)
        capsys.readouterr()
        train(tiny_config(4, lr_schedule=schedule), tmp_path / schedule, resume=True, train_set=data, progress=False)
        said = [line for line in capsys.readouterr().out.splitlines() if "learning-rate schedule" in line]
        expected = [] if schedule == "constant" else \
            ["resume: the learning-rate schedule moved (it follows train.lr, warmup_steps, lr_schedule and max_steps): "
             "step 2 trained at 0.0005, which the new schedule gives 0.0008536; step 3 trains at 0.0005"]
        assert said == expected


def test_the_time_budget_keeps_back_the_final_work_before_it_was_ever_timed(tmp_path: Path) -> None:
    """Before the first preview the budget keeps back one timed denoiser call (CFG's doubled batch, in the preview's
    precision) per sampler step, and a checkpoint's bytes at a slow disk's speed; then what each kind of work took."""
    from geca.training.trainer import Trainer

    cfg = tiny_config(5, sample_every=100, max_minutes=10)
    trainer = Trainer(cfg, tmp_path / "run", resume=False, progress=False, train_set=blob_images(n=8, size=8))
    shown, sampler = trainer.spec.num_classes * cfg.preview.per_class, cfg.preview.sampler
    assert sampler.guidance_scale != 1 and sampler.precision == "fp32"
    params = sum(p.numel() for p in trainer.ema.model.parameters())
    budget = trainer.budget
    assert budget.checkpoint_guess_s == pytest.approx(16 * params / 100e6)  # fp32 weights, EMA, AdamW's 2 moments
    budget.work_s, budget.calls = {}, {}
    measured = budget.call_s(shown, sampler)
    assert measured > 0 and list(budget.calls) == [(shown, None, True)]
    assert budget.call_s(shown, sampler) == measured  # timed once
    budget.calls[shown, None, True] = 0.25
    assert budget.final_work_s() == pytest.approx(0.25 * sampler.steps + budget.checkpoint_guess_s)
    cfg.preview.sampler.precision = "bf16"  # another precision is another call
    budget.calls[shown, torch.bfloat16, True] = 0.125
    assert budget.final_work_s() == pytest.approx(0.125 * sampler.steps + budget.checkpoint_guess_s)
    budget.work_s = {"checkpoint": 2.0, "preview": 7.0}
    assert budget.final_work_s() == pytest.approx(9.0)
    cfg.train.max_minutes = 0.2  # a budget is for training: a preview of more than half of it is not kept back
    assert budget.final_work_s() == pytest.approx(2.0)
    cfg.train.max_minutes = 10  # decided afresh each time
    assert budget.final_work_s() == pytest.approx(9.0)
    cfg.train.sample_every = 0
    assert budget.final_work_s() == pytest.approx(2.0)


def test_a_final_preview_beyond_half_the_budget_is_skipped_only_where_it_no_longer_fits(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not kept back, the long preview is skipped when the budget ran out; a run that ends by --max-steps long before
    still draws it."""
    from geca.training.budget import Budget
    from geca.training.trainer import Trainer

    monkeypatch.setattr(Budget, "call_s", lambda self, images, sampler: 1.0)  # a 50-step preview: 50 s
    drawn = []
    monkeypatch.setattr(Trainer, "preview", lambda self, final=False: drawn.append(final))
    train(tiny_config(2, sample_every=10_000, max_minutes=1.5), tmp_path / "short", train_set=blob_images(n=8, size=8),
          progress=False)
    assert drawn == [True] and "skipped" not in capsys.readouterr().out
    train(tiny_config(10_000, sample_every=10_000, max_minutes=0.1), tmp_path / "run",
          train_set=blob_images(n=8, size=8), progress=False)
    out = capsys.readouterr().out
    assert drawn == [True] and re.search(r"final preview skipped at step \d+: it would take about 50 s, more than "
                                         r"--max-minutes has left \(`geca sample", out), out
    assert not (tmp_path / "run" / "samples").exists() or not list((tmp_path / "run" / "samples").iterdir())
    # periodic previews too: each would overrun the budget (said once)
    train(tiny_config(10_000, sample_every=1, max_minutes=0.1), tmp_path / "often", train_set=blob_images(n=8, size=8),
          progress=False)
    out = capsys.readouterr().out
    assert drawn == [True] and out.count("preview skipped") == 1 and "preview skipped at step 1:" in out, out


def test_a_periodic_preview_must_fit_with_the_validation_and_checkpoint_after_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fake clock: 60 s budget, 10 s spent, a 40 s preview, a 15 s validation every 10 steps, a 1 s checkpoint.
    The final preview at a step that validated has only itself to fit; a periodic one also has the validation due
    now or at the end, and the final checkpoint."""
    from geca.training import budget as budget_module
    from geca.training.budget import Budget

    clock = FakeClock()
    monkeypatch.setattr(budget_module, "time", clock)
    cfg = tiny_config(100, sample_every=10, max_minutes=1)
    cfg.validation.every = 10
    budget = Budget(cfg, 1000, 2, validating=True, previewing=True, device=torch.device("cpu"),
                    guided_call=lambda *args: None)
    budget.work_s = {"preview": 40.0, "validation": 15.0, "checkpoint": 1.0}
    clock.now = 10.0
    assert not budget.preview_kept_back()  # more than half the budget
    assert not budget.preview_skipped(10, final=True, checkpointed=True)  # 40 s in the 50 s left
    assert budget.preview_skipped(9, final=True, checkpointed=True)  # 40 + the final validation
    for step in (9, 10):  # drawn, each would end past the budget
        assert budget.preview_skipped(step, final=False, checkpointed=False)
    clock.now = 4.0
    assert not budget.preview_skipped(10, final=False, checkpointed=False)  # 40 + 15 + 1 in the 56 s left
    clock.now = 5.0
    assert budget.preview_skipped(10, final=False, checkpointed=False)  # 56 s of work in 55
    assert not budget.preview_skipped(10, final=False, checkpointed=True)  # a run stopping here writes no checkpoint
    assert list(budget.after_preview(10, final=False, checkpointed=False)) == ["a validation", "the final checkpoint"]
    assert budget.after_preview(10, final=True, checkpointed=True) == {}  # step 10 validated: nothing after it


def test_a_preview_precision_the_device_cannot_run_is_refused_before_the_run_is_written(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    """On a GPU machine fp16 passes the settings' check; a run trained on its CPU must refuse it up front, naming the
    key, not at its first preview."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = tiny_config(2, sample_every=1)
    cfg.preview.sampler.precision = "fp16"
    with pytest.raises(ConfigError, match="preview.sampler.precision: fp16 mixed precision needs a CUDA GPU"):
        train(cfg, tmp_path / "run", train_set=blob_images(n=8, size=8), progress=False, cpu=True)
    assert not (tmp_path / "run").exists()
    from geca.training.trainer import check_sampler_precisions

    cfg.train.sample_every = 0  # samplers the run never uses are not its business
    cfg.validation.sampler.precision = "fp16"
    check_sampler_precisions(cfg, torch.device("cpu"))
    cfg.validation.every = 10
    with pytest.raises(ConfigError, match="validation.sampler.precision: fp16"):
        check_sampler_precisions(cfg, torch.device("cpu"))


def _spec(model: ModelConfig) -> ModelSpec:
    return ModelSpec(model=model, diffusion=DiffusionConfig(), data=DataConfig(), in_channels=3, num_classes=5,
                     resolution=28, class_names=list("abcde"), multilabel=False)


def test_a_resume_compares_what_the_data_is_not_how_it_is_spelt() -> None:
    a, b = _spec(named_model("GeCA-T")), _spec(named_model("GeCA-T"))
    a.data = DataConfig(spec="synthetic-oct@size=8,patients=9")
    b.data = DataConfig(spec="synthetic-oct@patients=9,size=8")
    assert a.differences(b) == []
    b.data = DataConfig(spec="synthetic-oct@patients=9,size=8,seed=1")
    assert [d.split(":")[0] for d in a.differences(b)] == ["data.spec"]


def test_compile_auto_compiles_geca_attention_where_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """GeCA-T at 28×28, batch 32: 3,000 steps are ≈ 430 TFLOP of model maths (a cold compile pays after ≈ 7),
    100 steps left ≈ 14 (a resumed run near its end), under the threshold, as are 400 steps of 4 images per process;
    a time budget under 15 minutes, other families, a chosen attention, a dense GeCA, a GPU (unmeasured) and a machine
    without a C++ compiler stay eager. The default attention (`auto`: the C kernels on a CPU) is never compiled."""
    from geca.training import compile as c

    monkeypatch.setattr(c, "cpp_compiler", lambda: "g++")
    cpu, plain = torch.device("cpu"), TrainConfig()
    assert named_model("GeCA-T").attention == "auto"
    assert c.compile_for_run(_spec(named_model("GeCA-T")), plain, cpu, 3000, 32) == (
        False, "attention not compiled (model.compile: auto)")
    assert c.compile_for_run(_spec(named_model("DiT-T")), TrainConfig(), cpu, 3, 1) == (
        False, "blocks not compiled (model.compile: auto)")
    geca = dataclasses.replace(named_model("GeCA-T"), attention="fast")
    assert geca.compile == "auto" and plain.max_minutes is None
    assert c.compile_for_run(_spec(geca), plain, cpu, 3000, 32) == (
        True, "attention compiled (model.compile: auto; the first run on this machine compiles for about a minute)")
    assert c.compile_for_run(_spec(dataclasses.replace(geca, attention="sliced")), plain, cpu, 3000, 32)[0]
    assert not c.compile_for_run(_spec(geca), plain, cpu, 100, 32)[0]
    assert c.compile_for_run(_spec(geca), plain, cpu, 400, 32)[0]  # ≈ 57 TFLOP
    assert not c.compile_for_run(_spec(geca), plain, cpu, 400, 4)[0]  # a process of eight with batch 32: ≈ 7
    assert not c.compile_for_run(_spec(geca), TrainConfig(max_minutes=5), cpu, 3000, 32)[0]  # the demo's budget
    assert c.compile_for_run(_spec(geca), TrainConfig(max_minutes=20), cpu, 3000, 32)[0]
    assert not c.compile_for_run(_spec(geca), plain, torch.device("cuda"), 3000, 32)[0]
    assert not c.compile_for_run(_spec(named_model("DiT-T")), plain, cpu, 3000, 32)[0]
    assert not c.compile_for_run(_spec(dataclasses.replace(geca, attention="reference")), plain, cpu, 3000, 32)[0]
    assert c.compile_for_run(_spec(dataclasses.replace(geca, compile="true")), plain, cpu, 1, 1) == (
        True, "attention compiled (model.compile: true)")
    assert c.compile_for_run(_spec(dataclasses.replace(named_model("DiT-T"), compile="true")), plain, cpu, 1, 1) == (
        True, "blocks compiled (model.compile: true)")
    dense = dataclasses.replace(geca, skip_idle=False)  # the whole step would compile: longer, left to --compile
    assert not c.compile_for_run(_spec(dense), plain, cpu, 3000, 32)[0]
    assert c.compile_for_run(_spec(dataclasses.replace(dense, compile="true")), plain, cpu, 1, 1) == (
        True, "NCA step compiled (model.compile: true)")
    assert not c.compile_for_run(_spec(dataclasses.replace(geca, compile="false")), plain, cpu, 3000, 32)[0]
    monkeypatch.setattr(c, "cpp_compiler", lambda: None)
    compiled, note = c.compile_for_run(_spec(geca), plain, cpu, 3000, 32)
    assert not compiled and "no C++ compiler" in note
    assert c.compile_for_run(_spec(geca), plain, cpu, 100, 32) == (  # would not have compiled anyway
        False, "attention not compiled (model.compile: auto)")
    # the budget is counted on the meta device: the same multiply-accumulates as a real model's
    assert c.dense_macs(_spec(geca)) == count_macs(_spec(geca).build(), 3, 5, 28)


def test_the_compiler_check_agrees_with_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's own search decides (it raises where none is found); without Python's headers nothing compiles."""
    import sysconfig

    from torch._inductor import cpp_builder

    from geca.utils import hardware

    def none_found() -> str:
        raise RuntimeError("no compiler")

    try:
        monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "c++-of-torch")
        hardware.cpp_compiler.cache_clear()
        assert hardware.cpp_compiler() == "c++-of-torch"
        monkeypatch.setattr(cpp_builder, "get_cpp_compiler", none_found)
        hardware.cpp_compiler.cache_clear()
        assert hardware.cpp_compiler() is None and not hardware.can_compile(torch.device("cpu"))
        assert hardware.can_compile(torch.device("cuda"))
        monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "c++-of-torch")
        monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": "/nonexistent"})
        hardware.cpp_compiler.cache_clear()
        assert hardware.cpp_compiler() is None
    finally:
        hardware.cpp_compiler.cache_clear()


def test_a_resumed_run_counts_the_steps_it_has_left(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from geca.training import trainer

    seen = []
    monkeypatch.setattr(trainer, "compile_for_run", lambda spec, tc, device, left, batch: seen.append(left) or
                        (False, ""))
    data = blob_images(n=8, size=8)
    train(tiny_config(2), tmp_path / "run", train_set=data, progress=False)
    train(tiny_config(5), tmp_path / "run", resume=True, train_set=data, progress=False)
    assert seen == [2, 3]


def test_sampling_compiles_only_a_run_that_asks_for_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """load_run: `compile: true` compiles where it can (else eager, the same maths); `auto` samples eager."""
    from geca.run import loaded as run_module

    train(tiny_config(1), tmp_path / "auto", train_set=blob_images(n=8, size=8), progress=False)
    shutil.copytree(tmp_path / "auto", tmp_path / "true")  # as if trained with --compile (which would compile)
    spec = json.loads((tmp_path / "true/model.json").read_text())
    spec["model"]["compile"] = "true"
    (tmp_path / "true/model.json").write_text(json.dumps(spec))

    def attention(name: str) -> str:
        return load_run(tmp_path / name).model.block.attention

    monkeypatch.setattr(run_module, "can_compile", lambda device: True)
    assert (attention("auto"), attention("true")) == ("auto", "compiled")
    monkeypatch.setattr(run_module, "can_compile", lambda device: False)
    assert attention("true") == "auto"


def test_compile_true_without_a_compiler_is_refused_before_the_run_starts(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    from geca.training import compile as c

    monkeypatch.setattr(c, "can_compile", lambda device: False)
    cfg = tiny_config(1)
    cfg.model.compile = "true"
    with pytest.raises(ConfigError, match="--compile .*needs a C\\+\\+ compiler"):
        train(cfg, tmp_path / "run", train_set=blob_images(), progress=False)
    assert not (tmp_path / "run").exists()


def test_cpu_attention_without_a_c_compiler_is_refused_before_the_run_starts(monkeypatch: pytest.MonkeyPatch,
                                                                             tmp_path: Path) -> None:
    """An explicit `--attention cpu` needs its compiler (`auto` would fall back to `fast` with a warning)."""
    from geca.training import compile as c

    monkeypatch.setattr(c, "c_compiler", lambda: None)
    cfg = tiny_config(1)
    cfg.model.attention = "cpu"
    with pytest.raises(ConfigError, match="--attention cpu .*needs a C compiler"):
        train(cfg, tmp_path / "run", train_set=blob_images(), progress=False)
    assert not (tmp_path / "run").exists()
    cfg.model.attention = "auto"
    train(cfg, tmp_path / "run", train_set=blob_images(), progress=False)  # the same machine: auto trains
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_a_run_that_compiles_builds_the_compiled_attention(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What compile_for_run decides reaches the model and the start-up line (no step is taken: nothing compiles)."""
    from geca.training import trainer

    monkeypatch.setattr(trainer, "compile_for_run", lambda *args: (True, "attention compiled (a test)"))
    run = trainer.Trainer(tiny_config(1), tmp_path / "run", resume=False, progress=False, train_set=blob_images())
    assert run.accelerator.unwrap_model(run.model).block.attention == "compiled"
    assert run.describe().endswith("; attention compiled (a test)")
    monkeypatch.setattr(trainer, "compile_for_run", lambda *args: (False, ""))
    run = trainer.Trainer(tiny_config(1), tmp_path / "eager", resume=False, progress=False, train_set=blob_images())
    assert run.accelerator.unwrap_model(run.model).block.attention == "auto"


def test_nan_loss_stops_with_a_clear_error_and_keeps_checkpoints(tmp_path: Path) -> None:
    data = blob_images(n=8, size=8)
    with pytest.raises(TrainingError, match="loss became nan|loss became inf"):
        train(tiny_config(50, lr=1e30, checkpoint_every=1), tmp_path / "run", train_set=data, progress=False)
    first = tmp_path / "run/checkpoints/step_0000001/model.safetensors"
    assert first.exists() and all(torch.isfinite(v).all() for v in load_file(first).values())


def test_fp16_on_cpu_is_refused(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="fp16"):
        train(tiny_config(1, precision="fp16"), tmp_path / "run", train_set=blob_images(), progress=False)


def test_bf16_autocast_trains(tmp_path: Path) -> None:
    train(tiny_config(2, precision="bf16"), tmp_path / "run", train_set=blob_images(n=8, size=8), progress=False)
    weights = load_file(tmp_path / "run/checkpoints/step_0000002/model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


@pytest.mark.slow
def test_two_processes_keep_identical_parameters(tmp_path: Path) -> None:
    """torchrun + gloo: accelerate wraps the model in DDP; the trainer compares the ranks' weights at the end (and the
    folds each rank read with the main process's)."""
    geca, data, folds = str(Path(sys.executable).parent / "geca"), "synthetic-oct@patients=9,size=8", tmp_path / "f.csv"
    subprocess.run([geca, "folds", "--data", data, "--k", "3", "--out", str(folds)], check=True, capture_output=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", geca, "train",
           "--data", data, "--folds-file", str(folds), "--fold", "1", "--out", str(tmp_path / "ddp"),
           "--model", "GeCA-T", "--nca-steps", "2", "--max-steps", "4", "--batch-size", "4", "--sample-every", "0",
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("parameters identical across 2 processes")]
    assert len(lines) == 2 and lines[0] == lines[1], proc.stdout
    assert (tmp_path / "ddp/checkpoints/step_0000004/model.safetensors").exists()


POISONED_RANK = """
import os, sys
from geca.cli.main import main
from geca.diffusion.gaussian import GaussianDiffusion

losses = GaussianDiffusion.training_losses

def poisoned(self, *args, **kwargs):
    terms = losses(self, *args, **kwargs)
    if os.environ["RANK"] == "1":
        terms["loss"] = terms["loss"] * float("nan")
    return terms

GaussianDiffusion.training_losses = poisoned
sys.argv = ["geca", *sys.argv[1:]]
main()
"""


def _two_ranks_without_agent(script: str, tmp_path: Path, blobs_npz: Path, *flags: str) -> list[tuple[int, str]]:
    """(exit code, stderr) of the two ranks of a tiny `geca train` run by `script`, without torchrun's agent (which
    would kill the survivor of a failed rank)."""
    path = tmp_path / "rank.py"
    path.write_text(script)
    args = [sys.executable, str(path), "train", "--data", str(blobs_npz), "--out", str(tmp_path / "ddp"),
            "--model", "GeCA-T", "--nca-steps", "1", "--max-steps", "3", "--batch-size", "4", "--sample-every", "0",
            "--no-progress", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, err) for p, (_, err) in zip(procs, results, strict=True)]


@pytest.mark.slow
def test_one_diverging_process_stops_every_process(tmp_path: Path, blobs_npz: Path) -> None:
    """The NaN of rank 1 stops rank 0 too, with the same error, instead of leaving it waiting for rank 1's
    gradients."""
    for code, err in _two_ranks_without_agent(POISONED_RANK, tmp_path, blobs_npz):
        assert code == 2 and "error: loss became nan at step 0" in err, err[-2000:]


UNREADABLE_ON_RANK_0 = """
import os, sys
from geca.cli.main import main
from geca.errors import DataError
from geca.training import data

load_split = data.load_split

def unreadable(*args, **kwargs):
    if os.environ["RANK"] == "0":
        raise DataError("blobs.npz: unreadable on rank 0")
    return load_split(*args, **kwargs)

data.load_split = unreadable
sys.argv = ["geca", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_data_the_main_process_cannot_load_stops_every_process(tmp_path: Path, blobs_npz: Path) -> None:
    """The main process loads (and downloads) first; where it fails, the others stop at once with a pointer to its
    error instead of waiting for it at accelerate's barrier until the collective timeout."""
    (main_code, main_err), (other_code, other_err) = _two_ranks_without_agent(UNREADABLE_ON_RANK_0, tmp_path,
                                                                              blobs_npz)
    assert main_code == 2 and "error: blobs.npz: unreadable on rank 0" in main_err, main_err[-2000:]
    assert other_code == 2 and "error: another process failed loading the training data" in other_err, \
        other_err[-2000:]


def test_auto_precision_follows_the_hardware(monkeypatch) -> None:
    from geca.utils import hardware

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert hardware.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert hardware.resolve_precision("auto") == "fp32"
    with pytest.warns(UserWarning, match="no native bf16"):
        assert hardware.resolve_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="one of"):
        hardware.resolve_precision("fp8")
    # on a GPU machine told to train on its CPU (--device cpu), the CPU decides
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert hardware.resolve_precision("auto") == "bf16" and hardware.resolve_precision("fp16") == "fp16"
    # a GPU that only emulates bf16 (a V100, a T4): auto is fp32 there
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert hardware.resolve_precision("auto") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert hardware.resolve_precision("auto", cuda=False) == "fp32"
    with pytest.raises(ValueError, match="fp16 mixed precision needs a CUDA GPU"):
        hardware.resolve_precision("fp16", cuda=False)


def test_keep_checkpoints_deletes_older_step_checkpoints_only(tmp_path: Path) -> None:
    from geca.run import find_checkpoint, step_checkpoints

    data, run = blob_images(n=8, size=8), tmp_path / "run"
    train(tiny_config(4, checkpoint_every=1, keep_checkpoints=2), run, train_set=data, progress=False)
    assert list(step_checkpoints(run)) == [3, 4]
    (run / "checkpoints" / ".step_0000003.pruned").mkdir()  # what a pruning interrupted mid-delete leaves
    train(tiny_config(5, checkpoint_every=1, keep_checkpoints=2), run, resume=True, train_set=data, progress=False)
    assert list(step_checkpoints(run)) == [4, 5] and find_checkpoint(run).name == "step_0000005"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", "step_0000004", "step_0000005"]
    train(tiny_config(7, checkpoint_every=1), run, resume=True, train_set=data, progress=False)
    assert list(step_checkpoints(run)) == [4, 5, 6, 7]  # unset: every checkpoint stays
    with pytest.raises(ConfigError, match="train.keep_checkpoints"):
        tiny_config(8, keep_checkpoints=0).validate()


def test_an_attention_this_device_cannot_run_is_said_to_fall_back(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--attention triton on a CPU trains with `fast` (the same maths: the run resumes on a GPU with triton): said."""
    from geca.models import attention
    from geca.training.trainer import Trainer

    monkeypatch.setattr(attention, "interpreting", lambda: False)  # the tests run triton's kernels interpreted
    cfg = tiny_config(1)
    cfg.model.attention = "triton"
    run = Trainer(cfg, tmp_path / "run", resume=False, progress=False, train_set=blob_images())
    assert "model.attention triton runs as fast on cpu (the same maths; triton's kernels are for CUDA)" in run.notes
    cfg.model.attention = "fast"
    assert not Trainer(cfg, tmp_path / "fast", resume=False, progress=False, train_set=blob_images()).notes
