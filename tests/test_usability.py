"""The user's first hours: the Python API, resume that keeps the run's config, per-invocation budgets, --version."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import FakeClock
from PIL import Image
from typer.testing import CliRunner

import geca
from geca.cli.main import app
from geca.errors import GecaError

runner = CliRunner()
TINY = ["--nca-steps", "2", "--batch-size", "4", "--sample-every", "0", "--log-every", "1", "--image-size", "8",
        "--no-progress"]


@pytest.fixture
def custom_run(blobs_npz: Path, tmp_path: Path) -> Path:
    """A run trained from a YAML whose values differ from the built-in defaults."""
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "GeCA-T", "hidden_channels": 8}, "train": {
        "lr": 3e-4, "ema_decay": 0.99, "ema_warmup": True, "checkpoint_every": 1}}))
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "-c", str(cfg), "--data", str(blobs_npz), "--out", str(run), "--max-steps",
                              "2", *TINY])
    assert res.exit_code == 0, res.output
    return run


def test_api_samples_the_same_images_as_the_cli(custom_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    res = runner.invoke(app, ["sample", "--run", str(custom_run), "--out", str(out), "--per-class", "2", "--sampler",
                              "ddim", "--steps", "3", "--seed", "4", "--batch-size", "3", "--no-progress"])
    assert res.exit_code == 0, res.output
    cli = np.stack([np.asarray(Image.open(p)) for p in sorted((out / "images").glob("*.png"))])
    run = geca.load_run(custom_run, device="cpu")
    assert run.class_names == ["class 0", "class 1"] and run.step == 2 and "GeCA-T" in repr(run)
    api = run.sample(["class 0", "class 0", 1, 1], sampler="ddim", steps=3, seed=4, batch_size=3)
    assert api.dtype == np.uint8 and np.array_equal(api.reshape(cli.shape), cli)
    pil = run.sample(np.eye(2, dtype=np.float32), sampler="ddim", steps=2, pil=True)
    assert len(pil) == 2 and pil[0].size == (8, 8)
    with pytest.raises(TypeError, match="unknown sampling setting"):
        run.sample([0], cfg=2.0)
    organism = run.grow(1, tmp_path / "grow", t=300, frames=2, steps=3)
    assert organism.label == "class 1" and all(p.is_file() for p in organism.paths.values())
    with pytest.raises(FileExistsError, match="pass overwrite=True or choose another out"):
        run.grow(1, tmp_path / "grow", t=300, frames=2, steps=3)
    assert run.grow(0, tmp_path / "grow", t=300, frames=2, steps=3, overwrite=True).label == "class 0"


@pytest.mark.parametrize(("call", "message"), [
    (lambda run: run.sample([0], precision="bf61"), "precision must be one of"),
    (lambda run: run.sample([0], nca_steps=0), "nca_steps must be in [1, 1024]"),
    (lambda run: run.sample([0], guidance_scale=-1.0), "guidance_scale must be ≥ 0"),
    (lambda run: run.sample([0], steps=10**6), "steps must be at most"),
    (lambda run: run.grow(0, run.loaded.run_dir / "grow", frames=0), "frames must be ≥ 1"),
    (lambda run: geca.load_run(run.loaded.run_dir, weights="x"), "weights must be"),
    (lambda run: geca.load_run(run.loaded.run_dir, vae="sd-vae"), "vae sd-vae: "),
    (lambda run: geca.load_run(run.loaded.run_dir, checkpoint="best"), "(validation.every > 0 or --validate-every)"),
])
def test_api_errors_name_the_parameters_not_the_flags(custom_run: Path, call, message: str) -> None:
    run = geca.load_run(custom_run, device="cpu")
    with pytest.raises(GecaError, match=re.escape(message)) as e:
        call(run)
    assert "--" not in str(e.value).replace("--validate-every", "")  # geca train's flag: no parameter here


def test_api_labels_and_seeds_are_checked_before_sampling(custom_run: Path) -> None:
    """A NaN or 7 in a label vector sampled black images; a float seed sampled as its integer part."""
    run = geca.load_run(custom_run, device="cpu")
    assert run.labels(torch.tensor([1, 0])).tolist() == [[0, 1], [1, 0]]  # indices as a tensor or array, too
    assert run.labels(np.array([1])).tolist() == run.labels([[0, 1]]).tolist() == [[0, 1]]
    for labels, error, message in [
        (np.full((2, 2), np.nan), ValueError, "row 0 is [nan, nan]; label vectors hold 0 or 1 entries"),
        ([[0, 7]], ValueError, "label vectors hold 0 or 1"),
        ([[1, 1]], ValueError, "row 0 marks 2 classes; the run is multi-class"),
        (np.zeros((2, 2, 1)), ValueError, "expected label vectors (N, 2)"),
        (np.array([0.0, 1.0]), ValueError, "got shape (2,)"),
        ([0.5], TypeError, "0.5 is neither a class name nor an index"),
        (None, TypeError, "got NoneType"),
        ((c for c in [0]), TypeError, "got generator"),
    ]:
        with pytest.raises(error, match=re.escape(message)):
            run.sample(labels, sampler="ddim", steps=1)
    for seed in (-1, 1.5, None):
        with pytest.raises(ValueError, match="seed must be an integer"):
            run.sample([0], seed=seed, sampler="ddim", steps=1)
    with pytest.raises(GecaError, match="steps: expected int, got 2.5"):
        run.sample([0], sampler="ddim", steps=2.5)
    for size in (0, 2.0):
        with pytest.raises(ValueError, match="batch_size must be an integer in"):
            run.sample([0], sampler="ddim", steps=1, batch_size=size)
    # numpy's scalars, as a notebook's loop over np.arange gives them
    one = run.sample([0], sampler="ddim", steps=np.int64(1), guidance_scale=np.float32(2.0), seed=np.int64(3),
                     batch_size=np.int64(1))
    assert np.array_equal(one, run.sample([0], sampler="ddim", steps=1, guidance_scale=2.0, seed=3, batch_size=1))
    with pytest.warns(UserWarning, match=r"^ghg out: no training geca offers") as said:
        run.sample([0], sampler="ddim", steps=1, ghg="out")  # warned as `geca sample --ghg out` warns
    assert said[0].filename == __file__


def test_resume_keeps_the_runs_own_config_and_logs_overrides(custom_run: Path, blobs_npz: Path) -> None:
    before = yaml.safe_load((custom_run / "config.yaml").read_text())
    res = runner.invoke(app, ["train", "--out", str(custom_run), "--resume", "--max-steps", "3", "--no-progress",
                              "--grad-checkpointing", "--no-compile"])  # how the model runs may change on resume
    assert res.exit_code == 0, res.output
    after = yaml.safe_load((custom_run / "config.yaml").read_text())
    assert after["train"]["lr"] == 3e-4 and after["train"]["ema_decay"] == 0.99 and after["train"]["ema_warmup"]
    assert after["model"]["hidden_channels"] == 8
    assert {k: v for k, v in after["train"].items() if k != "max_steps"} == \
        {k: v for k, v in before["train"].items() if k != "max_steps"}
    assert "resume: train.max_steps 2 → 3 (--max-steps)" in res.output
    assert "resume: model.checkpointing False → True (--grad-checkpointing)" in res.output
    assert f"resume: model.compile {before['model']['compile']!r} → 'false' (--no-compile)" in res.output


def test_a_resumed_runs_config_value_out_of_bounds_names_the_way_out(custom_run: Path) -> None:
    """A run begun before a bound existed (max_steps ≤ 10⁹ came later) resumes with the flag that overrides it."""
    own = yaml.safe_load((custom_run / "config.yaml").read_text())
    own["train"]["max_steps"] = 2 * 10**9
    (custom_run / "config.yaml").write_text(yaml.safe_dump(own))
    res = runner.invoke(app, ["train", "--out", str(custom_run), "--resume", "--no-progress"])
    assert res.exit_code == 2 and "train.max_steps must be in [1, 1,000,000,000], got 2000000000; --resume reads " \
        "the run's own config.yaml: override the value with its flag or --set KEY=VALUE" in res.output, res.output
    res = runner.invoke(app, ["train", "-c", str(custom_run / "config.yaml"), "--out", str(custom_run)])  # no resume
    assert res.exit_code == 2 and "got 2000000000" in res.output and "--resume" not in res.output, res.output
    res = runner.invoke(app, ["train", "--out", str(custom_run), "--resume", "--max-steps", "3", "--no-progress"])
    assert res.exit_code == 0, res.output


def test_resume_with_a_config_file_says_every_value_it_changes(custom_run: Path, tmp_path: Path) -> None:
    """-c with --resume replaces the run's own config: each value that differs from what the run trained with is
    said, against the run's config.yaml (not against the file given)."""
    other = tmp_path / "other.yaml"
    trained = yaml.safe_load((custom_run / "config.yaml").read_text())
    other.write_text(yaml.safe_dump({**trained, "train": {**trained["train"], "lr": 1e-4, "batch_size": 2}}))
    res = runner.invoke(app, ["train", "-c", str(other), "--out", str(custom_run), "--resume", "--max-steps", "3",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"resume: train.lr 0.0003 → 0.0001 (-c {other})" in res.output
    assert f"resume: train.batch_size 4 → 2 (-c {other})" in res.output
    assert "resume: train.max_steps 2 → 3 (--max-steps)" in res.output
    assert "data.spec" not in res.output and "ema_decay" not in res.output  # unchanged values are not listed
    (custom_run / "config.yaml").write_text("train: [\n")  # damaged: -c CONFIG is how such a run resumes
    res = runner.invoke(app, ["train", "-c", str(other), "--out", str(custom_run), "--resume", "--max-steps", "4",
                              "--no-progress"])
    assert res.exit_code == 0 and "resume: train.max_steps 2 → 4 (--max-steps)" in res.output, res.output


def test_max_minutes_is_a_budget_per_invocation(custom_run: Path) -> None:
    """A resumed run whose earlier sittings took longer than the budget still trains in this one."""
    import json

    ckpt = custom_run / "checkpoints" / "step_0000002" / "state.json"
    state = json.loads(ckpt.read_text())
    state["elapsed_s"] = 3600.0  # an hour in earlier sittings
    files = state.pop("files")
    ckpt.write_text(json.dumps({**state, "files": files}))
    res = runner.invoke(app, ["train", "--out", str(custom_run), "--resume", "--max-steps", "3", "--max-minutes",
                              "5", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "trained to step 3" in res.output
    assert "GeCA-T (" in res.output and "training images" in res.output  # the start-up line
    # a budget no step fits: the resumed run is left as its checkpoint has it, not checkpointed or previewed again
    before = {p: p.stat().st_mtime_ns for p in (custom_run / "checkpoints").rglob("*") if p.is_file()}
    res = runner.invoke(app, ["train", "--out", str(custom_run), "--resume", "--max-steps", "9", "--max-minutes",
                              "0.00001", "--no-progress"])
    assert res.exit_code == 0 and "no step fit --max-minutes 1e-05 beside the final work; the run stays at step 3" \
        in res.output, res.output
    assert {p: p.stat().st_mtime_ns for p in (custom_run / "checkpoints").rglob("*") if p.is_file()} == before
    # a fresh run that no step fits is checkpointed at step 0 (its lr before any step, with no warm-up, divided 0 by
    # 0); resumed with such a budget again, it stays as it is
    fresh = custom_run.parent / "fresh"
    args = ["train", "-c", str(custom_run / "config.yaml"), "--out", str(fresh), "--max-minutes", "0.00001",
            "--set", "train.warmup_steps=0", "--set", "train.checkpoint_every=0", "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "trained to step 0" in res.output, res.output
    before = {p: p.stat().st_mtime_ns for p in (fresh / "checkpoints").rglob("*") if p.is_file()}
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0 and "the run stays at step 0" in res.output, res.output
    assert {p: p.stat().st_mtime_ns for p in (fresh / "checkpoints").rglob("*") if p.is_file()} == before


def test_version_and_python_m() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"geca {geca.__version__}"
    out = subprocess.run([sys.executable, "-m", "geca", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"geca {geca.__version__}"


def test_compile_cache_persists_unless_the_user_chose_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from geca.cli.main import keep_compiled_kernels

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("GECA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    keep_compiled_kernels()
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == tmp_path / "geca" / "torchinductor"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("GECA_CACHE_DIR", str(tmp_path / "mine"))  # with geca's other caches
    keep_compiled_kernels()
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == tmp_path / "mine" / "torchinductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    keep_compiled_kernels()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"


def test_presets_and_kernel_source_ship_in_the_wheel(tmp_path: Path) -> None:
    import zipfile

    from geca.errors import ConfigError
    from geca.presets import presets, resolve_config

    assert resolve_config("smoke", "experiment") == presets("experiment")["smoke"]
    assert resolve_config("retinamnist-28-cpu.yaml", "run") == presets("run")["retinamnist-28-cpu"]
    assert resolve_config("retinamnist-28-cpu", "experiment") != resolve_config("retinamnist-28-cpu", "run")
    with pytest.raises(ConfigError, match="geca configs"):
        resolve_config("no-such-preset", "run")
    res = runner.invoke(app, ["configs", "--json"])
    assert res.exit_code == 0 and "smoke" in res.output
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("geca-*.whl"))).namelist()
    for kind, entries in (("run", presets("run")), ("experiment", presets("experiment"))):
        for name in entries:
            sub = "experiments/" if kind == "experiment" else ""
            assert f"geca/configs/{sub}{name}.yaml" in names
    assert "geca/models/attention_cpu.c" in names  # the CPU attention kernels are built from it on the user's machine


def _images(d: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted((d / "images").glob("*.png"))])


def test_sampling_resumes_to_identical_images_after_sigterm(custom_run: Path, tmp_path: Path) -> None:
    import json
    import signal
    import time

    args = ["sample", "--run", str(custom_run), "--per-class", "3", "--batch-size", "1", "--sampler", "ddim",
            "--steps", "80", "--seed", "2", "--no-progress"]
    whole = tmp_path / "whole"
    assert runner.invoke(app, [*args, "--out", str(whole)]).exit_code == 0
    out = tmp_path / "cut"
    progress = tmp_path / ".cut.unfinished" / "progress.json"
    proc = subprocess.Popen([sys.executable, "-m", "geca", *args, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (progress.exists() and json.loads(progress.read_text())["batches"]) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    finished = json.loads(progress.read_text())["batches"]
    assert proc.returncode != 0 and 1 <= len(finished) < 6 and not out.exists(), (proc.returncode, finished)
    res = runner.invoke(app, [*args, "--out", str(out), "--seed", "3", "--resume"])
    assert res.exit_code == 2 and "sampled with seed 2 (now 3);" in res.output  # it would mix two sets
    fewer = [*args, "--steps", "40", "--per-class", "2"]  # the later flag wins
    res = runner.invoke(app, [*fewer, "--out", str(out), "--resume"])
    assert res.exit_code == 2 and "sampled with sampling.steps 80 (now 40), other label vectors;" in res.output
    res = runner.invoke(app, [*args, "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    assert np.array_equal(_images(out), _images(whole))
    assert (out / "labels.csv").read_text() == (whole / "labels.csv").read_text()
    assert not list(tmp_path.glob(".*unfinished*"))


def test_a_damaged_progress_file_starts_the_set_afresh(custom_run: Path, tmp_path: Path) -> None:
    args = ["sample", "--run", str(custom_run), "--per-class", "1", "--sampler", "ddim", "--steps", "2",
            "--no-progress", "--out", str(tmp_path / "s"), "--resume"]
    work = tmp_path / ".s.unfinished"
    work.mkdir()
    (work / "images").mkdir()
    (work / "images" / "000000.png").write_bytes(b"half")
    for damaged in ("[]", '{"batches": "x"}', "\xff"):
        (work / "progress.json").write_text(damaged)
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert len(_images(tmp_path / "s")) == 2
        shutil.rmtree(tmp_path / "s")
        work.mkdir()
        (work / "images").mkdir()
        (work / "images" / "000000.png").write_bytes(b"half")


def test_a_symlinked_out_is_replaced_where_it_points(custom_run: Path, tmp_path: Path) -> None:
    """A set or report replaced through a link (to a bigger disk, say) lands in the linked folder; the link stays."""
    from geca.utils.io import staged_dir

    args = ["sample", "--run", str(custom_run), "--per-class", "1", "--sampler", "ddim", "--steps", "2",
            "--no-progress", "--overwrite"]
    (tmp_path / "disk").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "disk" / "s", target_is_directory=True)
    for _ in range(2):  # the first writes through the link, the second replaces that set
        res = runner.invoke(app, [*args, "--out", str(tmp_path / "link")])
        assert res.exit_code == 0, res.output
        assert (tmp_path / "link").is_symlink() and len(_images(tmp_path / "disk" / "s")) == 2
    (tmp_path / "report").symlink_to(tmp_path / "disk" / "r", target_is_directory=True)
    for text in ("first", "second"):
        with staged_dir(tmp_path / "report") as tmp:
            (tmp / "table.md").write_text(text)
        assert (tmp_path / "report").is_symlink() and (tmp_path / "disk" / "r" / "table.md").read_text() == text
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or work folder left
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["r", "s"]


def test_overwrite_replaces_a_sample_set_never_the_run_or_other_files(custom_run: Path, tmp_path: Path) -> None:
    base = ["sample", "--run", str(custom_run), "--per-class", "1", "--sampler", "ddim", "--steps", "2",
            "--no-progress", "--overwrite"]
    for out in (custom_run, custom_run.parent):
        res = runner.invoke(app, [*base, "--out", str(out)])
        assert res.exit_code == 2 and "holds the run" in res.output, res.output
    assert (custom_run / "model.json").is_file() and (custom_run / "checkpoints").is_dir()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    res = runner.invoke(app, [*base, "--out", str(mine)])
    assert res.exit_code == 2 and "replaces an earlier sample set" in res.output
    assert (mine / "notes.txt").read_text() == "keep"
    for _ in range(2):  # a sample set is replaced
        res = runner.invoke(app, [*base, "--out", str(tmp_path / "s")])
        assert res.exit_code == 0, res.output
    (mine / "manifest.json").write_text('{"dataset": "x"}')  # a manifest of another kind: still the user's folder
    res = runner.invoke(app, [*base, "--out", str(mine)])
    assert res.exit_code == 2 and "a folder with geca's manifest.json" in res.output, res.output
    from geca.sampling.trace import FIELDS

    (tmp_path / "s" / "trace.csv").write_text(",".join(FIELDS) + "\n")  # a --trace written into the set is its own
    (tmp_path / "s" / "trace.png").write_bytes(b"plot")
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "s")])
    assert res.exit_code == 0 and not (tmp_path / "s" / "trace.csv").exists(), res.output
    for extra in ("notes.txt", "images/scan.dcm"):  # a set with files of the user's beside it: not replaced whole
        (tmp_path / "s" / extra).write_text("keep")
        res = runner.invoke(app, [*base, "--out", str(tmp_path / "s")])
        assert res.exit_code == 2 and f"holds files of yours beside the sample set ({extra})" in res.output
        assert (tmp_path / "s" / extra).read_text() == "keep"
        (tmp_path / "s" / extra).unlink()


def test_expand_limit(custom_run: Path, tmp_path: Path) -> None:
    import json

    res = runner.invoke(app, ["expand", "--run", str(custom_run), "--out", str(tmp_path / "x"), "--ratio", "2",
                              "--limit", "5", "--sampler", "ddim", "--steps", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["num_images"] == 5 and manifest["expansion"]["complete"] is False


def test_set_flip_threads_device_and_lr_schedule(blobs_npz: Path, tmp_path: Path) -> None:
    import csv

    import torch

    from geca.training.trainer import learning_rate

    run = tmp_path / "run"
    base = ["train", "--data", str(blobs_npz), "--out", str(run), "--model", "GeCA-T", "--max-steps", "4", *TINY]
    res = runner.invoke(app, [*base, "--set", "train.lr=1e-3", "--set", "model.hidden_channels=4", "--no-flip",
                              "--warmup-steps", "2", "--lr-schedule", "cosine", "--threads", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["lr"] == 1e-3 and cfg["model"]["hidden_channels"] == 4 and cfg["data"]["flip"] is False
    lrs = [float(r["lr"]) for r in csv.DictReader(open(run / "log.csv"))]
    tc = type("T", (), {"lr": 1e-3, "warmup_steps": 2, "lr_schedule": "cosine", "max_steps": 4})
    assert lrs == pytest.approx([learning_rate(tc, s) for s in range(4)])
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == lrs[2] == pytest.approx(1e-3) and lrs[3] < lrs[2]
    for bad, word in ((["--set", "train.lr=fast"], "--set train.lr"), (["--set", "train.nope=1"], "nope"),
                      (["--set", "model.hidden_channels=0"], "--set model.hidden_channels"),
                      (["--lr-schedule", "linear"], "--lr-schedule"), (["--threads", "0"], "--threads"),
                      (["--lr", "1e-3", "--set", "train.lr=2e-3"], "--set train.lr and --lr both set train.lr"),
                      (["--set", "train.lr=1e-3", "--set", "train.lr=2e-3"], "--set train.lr is given twice")):
        res = runner.invoke(app, [*base[:4], str(tmp_path / "bad"), *base[5:], *bad])
        assert res.exit_code == 2 and word in res.output, (bad, res.output)
    res = runner.invoke(app, ["runs", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    import json

    (row,) = json.loads(res.output)
    assert row["step"] == 4 and row["model"] == "GeCA-T" and row["heredity"] == "gated" and row["loss"]


@pytest.mark.parametrize("sample_every, first_step_s, checkpoint_s", [(25, 2, 0), (1000, 2, 0), (1000, 100, 0),
                                                                      (1000, 2, 120)])
def test_the_budget_keeps_room_for_the_final_preview(blobs_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    sample_every: int, first_step_s: float,
                                                    checkpoint_s: float) -> None:
    """On a fake clock (a step takes 2 s, a preview's 50 denoiser calls 1.2 s each), 5 minutes end with the final
    preview inside them: timed at the previews every 25 steps, or, with none before the final one, estimated from one
    timed call (unmoved by a first step that compiles and warms up, 100 s); and the final checkpoint, never timed
    before, from its size (120 s here)."""
    import geca.training.budget as budget_module
    import geca.training.trainer as trainer_module
    from geca.models.build import count_parameters
    from geca.training.trainer import Trainer

    clock = FakeClock(1000.0)
    monkeypatch.setattr(trainer_module, "time", clock)
    monkeypatch.setattr(budget_module, "time", clock)
    step, preview = Trainer.step, Trainer.preview

    def slow_step(self):
        clock.now += first_step_s if self.step_count == 0 else 2
        return step(self)

    def slow_preview(self, final=False):
        clock.now += 60
        return preview(self, final)

    call = trainer_module.guided_output

    def slow_call(*args, **kwargs):  # what the budget times before the first preview
        clock.now += 1.2
        return call(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "guided_output", slow_call)

    monkeypatch.setattr(Trainer, "step", slow_step)
    monkeypatch.setattr(Trainer, "preview", slow_preview)
    checkpoint = Trainer.checkpoint

    def slow_checkpoint(self):
        clock.now += checkpoint_s
        return checkpoint(self)

    monkeypatch.setattr(Trainer, "checkpoint", slow_checkpoint)
    starts = []
    run = Trainer.run

    def timed_run(self, *args):
        starts.append(clock.now)
        if checkpoint_s:  # a disk at which this model's checkpoint takes checkpoint_s
            disk = 16 * count_parameters(self.ema.model) / checkpoint_s
            monkeypatch.setattr(budget_module, "SLOW_DISK_BYTES_PER_S", disk)
        return run(self, *args)

    monkeypatch.setattr(Trainer, "run", timed_run)
    bars = []
    make_bar = Trainer._bar

    def kept_bar(self):
        bars.append(make_bar(self))
        return bars[-1]

    monkeypatch.setattr(Trainer, "_bar", kept_bar)
    res = runner.invoke(app, ["train", "--data", str(blobs_npz), "--out", str(tmp_path / "run"), "--model", "GeCA-T",
                              "--max-steps", "1000", "--max-minutes", "5", "--nca-steps", "1", "--batch-size", "4",
                              "--sample-every", str(sample_every), "--log-every", "5", "--image-size", "8",
                              "--progress"])
    assert res.exit_code == 0, res.output
    assert clock.now - starts[0] <= 5 * 60, clock.now - starts[0]
    # The bar counts the budget's seconds (its ETA is the end of the run), the steps in its postfix.
    (bar,) = bars
    kept_back = (70 if sample_every == 25 else 65) + checkpoint_s
    if sample_every == 1000:  # no preview until the final one: the steps fill the rest of the budget
        assert int(re.search(r"trained to step (\d+)", res.output)[1]) >= (300 - first_step_s - kept_back) // 2 - 1
    assert bar.total == 300 and 300 - kept_back <= bar.n <= 300 and "5 min budget" in bar.desc
    assert "final preview:" in res.output and re.search(r"step \d+/1000, loss", res.output)
    # it trained, previewed and finished
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) >= (2 if sample_every == 25 else 1)


def test_tensorboard_logger_mirrors_log_csv_and_peak_memory_is_logged(blobs_npz: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    base = ["train", "--data", str(blobs_npz), "--out", str(run), "--model", "GeCA-T", "--max-steps", "3", *TINY]
    bad = runner.invoke(app, [*base, "--logger", "wandb"])
    assert bad.exit_code == 2 and "--logger" in bad.output and not run.exists()
    res = runner.invoke(app, [*base, "--logger", "tensorboard"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and all(float(r["peak_mem_mib"]) > 0 for r in rows)
    (events,) = (run / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert logged == [(int(r["step"]), pytest.approx(float(r["loss"]), rel=1e-6)) for r in rows]
    assert {"lr", "images_per_s", "peak_mem_mib"} <= set(acc.Tags()["scalars"])


def test_ctrl_c_says_what_to_do_next(custom_run: Path, blobs_npz: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import geca.training.trainer

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(geca.training.trainer, "train", interrupted)
    res = runner.invoke(app, ["train", "--out", str(custom_run), "--resume", "--max-steps", "4", "--no-progress"])
    assert res.exit_code == 130 and "Traceback" not in res.output, res.output
    assert res.output.strip() == f"interrupted: `geca train --out {custom_run} --resume` continues from the last " \
                                 "checkpoint"
    res = runner.invoke(app, ["train", "--data", str(blobs_npz), "--out", str(tmp_path / "new"), *TINY])
    assert (res.exit_code, res.output.strip()) == (130, "interrupted: before the first checkpoint; there is nothing "
                                                        "to resume")
    import geca.sampling.generate

    monkeypatch.setattr(geca.sampling.generate, "write_sample_dir", interrupted)
    res = runner.invoke(app, ["sample", "--run", str(custom_run), "--out", str(tmp_path / "s"), "--per-class", "1"])
    assert (res.exit_code, res.output.strip()) == (130, "interrupted: the same command with --resume continues from "
                                                        "the batches already written")
    import geca.data.groups

    monkeypatch.setattr(geca.data.groups, "make_folds", interrupted)  # a command with nothing to resume
    res = runner.invoke(app, ["folds", "--data", "synthetic-oct@patients=9,size=8", "--out", str(tmp_path / "f.csv")])
    assert (res.exit_code, res.output.strip()) == (130, "interrupted")


def test_sample_says_which_label_flag_is_missing(custom_run: Path, tmp_path: Path) -> None:
    base = ["sample", "--run", str(custom_run), "--out", str(tmp_path / "s")]
    res = runner.invoke(app, [*base, "--ratio", "5"])
    assert res.exit_code == 2 and "--ratio replicates the label vectors of --labels-from SPLIT" in res.output
    res = runner.invoke(app, base)
    assert res.exit_code == 2 and "give exactly one of --per-class N or --labels-from SPLIT" in res.output
    assert not (tmp_path / "s").exists()


def test_every_train_flag_that_sets_a_config_field_is_a_parameter_of_the_command() -> None:
    """`geca train` collects the flags that set a field from its own parameters by FLAG_FIELDS' names: a name that
    is no parameter would be dropped without a word."""
    import inspect

    from geca.cli.train import FLAG_FIELDS, train

    parameters = set(inspect.signature(train).parameters)
    assert set(FLAG_FIELDS) <= parameters, set(FLAG_FIELDS) - parameters
