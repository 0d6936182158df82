"""The command line on tiny settings, including what it does with bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from geca.cli.main import app
from geca.utils.hardware import resolve_precision

runner = CliRunner()
TINY = ["--model", "GeCA-T", "--nca-steps", "2", "--batch-size", "4", "--sample-every", "0", "--log-every", "1",
        "--no-progress"]
FAST_SAMPLING = ["--sampler", "ddim", "--steps", "3", "--no-progress"]


@pytest.fixture
def trained_run(tmp_path: Path, blobs_npz: Path) -> Path:
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--data", str(blobs_npz), "--out", str(run), "--max-steps", "2", *TINY])
    assert res.exit_code == 0, res.output
    return run


def test_every_command_and_flag_has_help() -> None:
    for cmd in ("train", "sample", "grow", "models", "folds", "encode", "expand", "classify", "evaluate",
                "experiment", "demo"):
        res = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0
        assert "<bool>" not in res.output, f"geca {cmd} --help labels an on/off flag as taking a value"
        from geca.cli import main

        info = next(c for c in main.app.registered_commands if c.name == cmd)
        import inspect

        for name, param in inspect.signature(info.callback).parameters.items():
            assert getattr(param.default, "help", None), f"geca {cmd}: option {name} has no help text"


def test_grow_offers_only_the_samplers_it_can_replay() -> None:
    """grow shares sample's flags but refuses DPM-Solver++; its help must not offer it."""
    assert "dpm++" in runner.invoke(app, ["sample", "--help"], env={"COLUMNS": "200"}).output
    assert "dpm++" not in runner.invoke(app, ["grow", "--help"], env={"COLUMNS": "200"}).output


def test_help_labels_value_options_only() -> None:
    out = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert re.search(r"--max-steps\s+<int>", out) and re.search(r"--no-flip\s+Random", out)


def test_train_writes_a_complete_run(trained_run: Path) -> None:
    for name in ("config.yaml", "model.json", "log.csv", "loss.png", "checkpoints/latest.json",
                 "checkpoints/step_0000002/model.safetensors", "checkpoints/step_0000002/ema.safetensors",
                 "checkpoints/step_0000002/optimizer.pt", "checkpoints/step_0000002/state.json"):
        assert (trained_run / name).exists(), name
    rows = list(csv.DictReader(open(trained_run / "log.csv")))
    assert [r["step"] for r in rows] == ["1", "2"] and all(float(r["loss"]) > 0 for r in rows)


def test_sample_per_class_writes_images_labels_and_manifest(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    res = runner.invoke(app, ["sample", "--run", str(trained_run), "--out", str(out), "--per-class", "2",
                              "--cfg", "2.0", "--ghg", "both", "--m", "3", "--seed", "5", *FAST_SAMPLING])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert len(rows) == 4 and list(rows[0]) == ["filename", "class 0", "class 1"]
    assert [(r["class 0"], r["class 1"]) for r in rows] == [("1", "0"), ("1", "0"), ("0", "1"), ("0", "1")]
    for r in rows:
        img = Image.open(out / r["filename"])
        assert img.size == (8, 8) and img.mode == "RGB"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampling"] == {"sampler": "ddim", "steps": 3, "guidance_scale": 2.0, "ghg": "both",
                                    "nca_steps": 3, "eta": 0.0, "clip_x0": True, "schedule": "uniform",
                                    "precision": "fp32"}
    assert manifest["seed"] == 5 and manifest["checkpoint_step"] == 2
    weights = Path(manifest["checkpoint"]) / "ema.safetensors"
    assert manifest["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_sample_steps_beyond_the_runs_diffusion_are_refused(trained_run: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["sample", "--run", str(trained_run), "--out", str(tmp_path / "s"), "--per-class", "1",
                              "--sampler", "ddim", "--steps", "1001", "--no-progress"])
    assert res.exit_code == 2 and "--steps must be at most the 1000 diffusion steps, got 1001" in res.output
    assert not (tmp_path / "s").exists()


def test_sample_precision_is_recorded_as_it_ran_and_checked_first(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "auto"
    res = runner.invoke(app, ["sample", "--run", str(trained_run), "--out", str(out), "--per-class", "1",
                              "--precision", "auto", "--device", "cpu", *FAST_SAMPLING])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["sampling"]["precision"] == resolve_precision(
        "auto", cuda=False)
    for value, message in (("half", "--precision must be one of fp32, bf16, fp16, auto"),
                           ("fp16", "CUDA GPU")):  # on a CPU-only machine when checked, else when run on the CPU
        res = runner.invoke(app, ["sample", "--run", str(trained_run), "--out", str(tmp_path / value),
                                  "--per-class", "1", "--precision", value, "--device", "cpu", *FAST_SAMPLING])
        assert res.exit_code == 2 and "--precision" in res.output and message in res.output, res.output
        assert not (tmp_path / value).exists()


def test_sampling_is_reproducible_under_a_seed(trained_run: Path, tmp_path: Path) -> None:
    arrays = []
    for name in ("a", "b"):
        runner.invoke(app, ["sample", "--run", str(trained_run), "--out", str(tmp_path / name), "--per-class", "1",
                            *FAST_SAMPLING])
        arrays.append(np.array(Image.open(tmp_path / name / "images/000001.png")))
    assert np.array_equal(*arrays)


def test_labels_from_split_replicates_each_vector(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "x3"
    res = runner.invoke(app, ["sample", "--run", str(trained_run), "--out", str(out), "--labels-from", "val",
                              "--ratio", "3", *FAST_SAMPLING])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert len(rows) == 24
    assert sum(r["class 1"] == "1" for r in rows) == 3 * 4


def test_failed_sampling_leaves_nothing_half_written(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "samples"
    out.mkdir()
    (out / "labels.csv").write_text("earlier work")  # an earlier sample set: what --overwrite may replace
    (out / "manifest.json").write_text('{"num_images": 0}')
    import geca.sampling.generate as gen

    calls = {"n": 0}
    real = gen.pil_image

    def failing(arr):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(arr)

    monkeypatch.setattr(gen, "pil_image", failing)
    gen_args = ["sample", "--run", str(trained_run), "--out", str(out), "--per-class", "2", "--overwrite",
                *FAST_SAMPLING]
    res = runner.invoke(app, gen_args, catch_exceptions=False)
    assert res.exit_code == 2 and "error: No space left on device" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == ["labels.csv", "manifest.json"]
    assert (out / "labels.csv").read_text() == "earlier work"
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_outputs_get_the_permissions_of_the_umask(blobs_npz: Path, tmp_path: Path) -> None:
    """Temporary-then-rename writing must not leave runs and sample sets readable by their owner only."""
    run, out = tmp_path / "run", tmp_path / "shared"
    old = os.umask(0o022)
    try:
        res = runner.invoke(app, ["train", "--data", str(blobs_npz), "--out", str(run), "--max-steps", "1", *TINY])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["sample", "--run", str(run), "--out", str(out), "--per-class", "1",
                                  *FAST_SAMPLING])
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    checkpoint = next((run / "checkpoints").glob("step_*"))
    for d in (out, checkpoint):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
    for f in (out / "manifest.json", checkpoint / "model.safetensors", run / "checkpoints" / "latest.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_sample_refuses_to_overwrite_without_flag(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    out.mkdir()
    (out / "x").write_text("x")
    res = runner.invoke(app, ["sample", "--run", str(trained_run), "--out", str(out), "--per-class", "1",
                              *FAST_SAMPLING])
    assert res.exit_code == 2 and "--overwrite" in res.output


def test_grow_writes_gifs_and_strips(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "grow"
    res = runner.invoke(app, ["grow", "--run", str(trained_run), "--out", str(out), "--label", "class 1",
                              "--steps", "4", "--m", "5", "--t", "400"])
    assert res.exit_code == 0, res.output
    assert "(the reverse step nearest --t 400 with 4 steps)" in res.output  # 4 steps cannot land on 400
    gif = Image.open(out / "growth.gif")
    assert gif.n_frames == 5
    assert Image.open(out / "denoise.gif").n_frames == 4
    strip = Image.open(out / "growth.png")
    assert strip.size[0] > strip.size[1]
    # Each GIF frame carries its caption ("NCA step m/5, t=…") in a band above the images: text, differing per frame.
    bands = []
    for i in range(gif.n_frames):
        gif.seek(i)
        bands.append(np.asarray(gif.convert("L"))[:12])
    assert all(b.max() > 128 for b in bands) and not np.array_equal(bands[0], bands[-1])


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "/nonexistent/x.npz", "--out", "{tmp}/r", "--max-steps", "1"], "x.npz"),
        (["train", "--data", "synthetic-fundus", "--out", "{tmp}/r", "--precision", "fp8"], "precision"),
        (["train", "--data", "synthetic-fundus", "--out", "{tmp}/r", "--model", "GeCA-XL"], "GeCA-XL"),
        (["train", "--config", "{tmp}/missing.yaml", "--out", "{tmp}/r"], "missing.yaml"),
        (["sample", "--run", "{tmp}/norun", "--out", "{tmp}/s", "--per-class", "1"], "model.json"),
        # an empty value was the current folder: `encode --out ""` wrote its caches there
        (["encode", "--vae", "{tmp}/vae", "--data", "synthetic-fundus", "--out", ""], "error: --out: empty value"),
        (["train", "--data=", "--out", "{tmp}/r"], "error: --data: empty value"),
        (["runs", ""], 'error: an empty argument ("")'),
        (["runs", "--json", ""], 'error: an empty argument ("")'),  # --json takes no value: "" is the FOLDER
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path: Path, args: list[str], message: str) -> None:
    res = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and message in res.output
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_unknown_label_and_corrupt_weights(trained_run: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["grow", "--run", str(trained_run), "--out", str(tmp_path / "g"), "--label", "class 7"])
    assert res.exit_code == 2 and "unknown label 'class 7'" in res.output
    (trained_run / "checkpoints/step_0000002/ema.safetensors").write_bytes(b"not a tensor file")
    res = runner.invoke(app, ["sample", "--run", str(trained_run), "--out", str(tmp_path / "s"), "--per-class", "1"])
    assert res.exit_code == 2 and "ema.safetensors" in res.output and "safetensors" in res.output


def test_config_file_with_unknown_key_is_rejected(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_stepz: 3\n")
    res = runner.invoke(app, ["train", "--config", str(cfg), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "max_stepz" in res.output


def test_models_json_reports_published_sizes() -> None:
    res = runner.invoke(app, ["models", "--json"])
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert abs(rows["GeCA-S"]["parameters"] - 13.3e6) <= 0.05e6
    assert abs(rows["GeCA-XS"]["parameters"] - 2.26e6) <= 0.05e6
    assert rows["GeCA-S"]["input"] == [4, 32, 32] and rows["GeCA-S"]["classes"] == 11


def test_models_at_a_size_this_machine_cannot_run_is_a_row_not_a_traceback(monkeypatch) -> None:
    import geca.models.build as build

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1099511627776 bytes.")

    monkeypatch.setattr(build, "count_macs", out_of_memory)
    res = runner.invoke(app, ["models", "--json", "--resolution", "8"])
    assert res.exit_code == 0, res.output
    assert {r["error"] for r in json.loads(res.output)} == {"cannot run at this size here (RuntimeError)"}
    res = runner.invoke(app, ["models", "--resolution", "2048"])  # a pixel size for a latent grid: minutes of work
    assert res.exit_code == 2 and "--resolution" in res.output


def test_demo_refuses_fp16_on_a_cpu_before_replacing_the_last_demo(tmp_path: Path, monkeypatch) -> None:
    """On a machine with a GPU, fp16 passes the settings' check; `--device cpu` must still refuse it up front."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "demo"
    out.mkdir()
    (out / ".geca-demo").write_text("")
    (out / "model.json").write_text("{}")
    res = runner.invoke(app, ["demo", "--out", str(out), "--data", "synthetic-fundus@n=20", "--precision", "fp16",
                              "--device", "cpu"])
    assert res.exit_code == 2 and "--precision: fp16 mixed precision needs a CUDA GPU" in res.output, res.output
    assert (out / "model.json").read_text() == "{}"


def test_demo_replaces_an_earlier_demo_only(trained_run: Path, tmp_path: Path) -> None:
    """A training run has a model.json as a demo does; the demo must not take it for its own and delete it."""
    run = tmp_path / "victim"
    shutil.copytree(trained_run, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    res = runner.invoke(app, ["demo", "--out", str(run), "--data", "synthetic-fundus@n=20", "--minutes", "0.01"])
    assert res.exit_code == 2 and f"--out {run}: exists and is not a demo" in res.output, res.output
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    a_file = tmp_path / "file"
    a_file.write_text("x")
    res = runner.invoke(app, ["demo", "--out", str(a_file), "--data", "synthetic-fundus@n=20", "--minutes", "0.01"])
    assert res.exit_code == 2 and "is a file" in res.output and a_file.read_text() == "x", res.output


def test_an_earlier_demo_is_kept_when_the_demo_cannot_run(blobs_npz: Path, tmp_path: Path, monkeypatch) -> None:
    """Whatever keeps the demo from running is found before the earlier demo is removed: a dataset that is not there
    or lies inside --out, an --out holding the current folder; and a demo's folder takes no training run."""
    demo = tmp_path / "demo"
    (demo / "data").mkdir(parents=True)
    (demo / ".geca-demo").write_text("")
    shutil.copy(blobs_npz, demo / "data" / "blobs.npz")
    rows = ["filename,a,b"]  # a CSV outside --out whose images lie inside it
    for i in range(4):
        Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(demo / "data" / f"{i}.png")
        rows.append(f"demo/data/{i}.png,{i % 2},{1 - i % 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    before = sorted(p.relative_to(demo) for p in demo.rglob("*"))
    clean = tmp_path / "clean"  # an earlier demo and nothing else
    clean.mkdir()
    (clean / ".geca-demo").write_text("")
    res = runner.invoke(app, ["demo", "--out", str(clean), "--data", str(tmp_path / "nowhere.npz"), "--minutes",
                              "0.01"])
    assert res.exit_code == 2 and "nowhere.npz" in res.output and (clean / ".geca-demo").exists(), res.output
    for args, message in ((["--data", str(demo / "data" / "blobs.npz")], "lies inside --out"),
                          (["--data", str(tmp_path / "labels.csv")], f"{demo / 'data' / '0.png'} lies inside --out")):
        res = runner.invoke(app, ["demo", "--out", str(demo), *args, "--minutes", "0.01"])
        assert res.exit_code == 2 and message in res.output, res.output
    monkeypatch.chdir(demo / "data")
    for out in (".", ".."):
        res = runner.invoke(app, ["demo", "--out", out, "--data", str(blobs_npz), "--minutes", "0.01"])
        assert res.exit_code == 2 and f"--out {out}: holds the current folder" in res.output, res.output
    empty = demo / "data" / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)  # an empty current folder is a place to write, with nothing to replace
    from geca.cli.demo import check_replaceable

    check_replaceable(Path("."), str(blobs_npz))
    empty.rmdir()
    res = runner.invoke(app, ["train", "--out", str(demo), "--data", str(blobs_npz), "--max-steps", "1"])
    assert res.exit_code == 2 and "a `geca demo` folder" in res.output, res.output
    assert sorted(p.relative_to(demo) for p in demo.rglob("*")) == before


def test_an_earlier_demo_comes_back_when_the_next_is_interrupted(blobs_npz: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The earlier demo waits in --out/.earlier-demo while the next trains: Ctrl-C (or a failure) brings it back, as
    does the next demo after a killed one, unless that one was whole; other files in a demo's folder are refused,
    not deleted."""
    import geca.training.trainer as trainer

    demo = tmp_path / "demo"
    (demo / "generated").mkdir(parents=True)
    for name in (".geca-demo", ".geca-demo-done", "model.json", "samples_per_grade.png", "generated/labels.csv"):
        (demo / name).write_text("earlier")
    (demo / ".generated.unfinished").mkdir()  # what an interrupted demo's sampling leaves is the demo's own
    before = sorted(p.relative_to(demo) for p in demo.rglob("*"))

    def interrupted(config: object, out: Path, **kwargs: object) -> None:
        assert not (out / "samples_per_grade.png").exists()  # the next demo trains in an emptied folder
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    res = runner.invoke(app, ["demo", "--out", str(demo), "--data", str(blobs_npz), "--minutes", "0.01"])
    assert res.exit_code == 130, res.output
    assert sorted(p.relative_to(demo) for p in demo.rglob("*")) == before
    # killed in its growth GIFs: its grid drawn, but not whole; the earlier demo still waiting
    (demo / ".earlier-demo").mkdir()
    for entry in [p for p in demo.iterdir() if p.name != ".earlier-demo"]:
        entry.rename(demo / ".earlier-demo" / entry.name)
    (demo / ".earlier-demo" / ".complete").write_text("")
    for name in (".geca-demo", "samples_per_grade.png"):
        (demo / name).write_text("killed")
    res = runner.invoke(app, ["demo", "--out", str(demo), "--data", str(blobs_npz), "--minutes", "0.01"])
    assert res.exit_code == 130 and sorted(p.relative_to(demo) for p in demo.rglob("*")) == before, res.output
    assert (demo / "samples_per_grade.png").read_text() == "earlier"
    # stopped while moving the earlier demo aside, two entries moved: it all comes back
    import geca.cli.demo as demo_cli

    replace, moved = os.replace, []

    def stopped_after_two(src: object, dst: object) -> None:
        if len(moved) == 2:
            raise KeyboardInterrupt
        moved.append(src)
        replace(src, dst)

    monkeypatch.setattr(demo_cli.os, "replace", stopped_after_two)
    with pytest.raises(KeyboardInterrupt):
        with demo_cli.replacing(demo):
            pass
    monkeypatch.setattr(demo_cli.os, "replace", replace)
    assert (demo / ".earlier-demo").is_dir()  # half moved: put right by the next demo
    res = runner.invoke(app, ["demo", "--out", str(demo), "--data", str(blobs_npz), "--minutes", "0.01"])
    assert res.exit_code == 130 and sorted(p.relative_to(demo) for p in demo.rglob("*")) == before, res.output
    (demo / ".notes").mkdir()  # hidden, but the user's
    res = runner.invoke(app, ["demo", "--out", str(demo), "--data", str(blobs_npz), "--minutes", "0.01"])
    assert res.exit_code == 2 and "also holds .notes" in res.output and (demo / ".notes").is_dir(), res.output
    (demo / ".notes").rmdir()
    (demo / "my-notes.txt").write_text("mine")
    res = runner.invoke(app, ["demo", "--out", str(demo), "--data", str(blobs_npz), "--minutes", "0.01"])
    assert res.exit_code == 2 and "also holds my-notes.txt" in res.output, res.output
    assert (demo / "my-notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)  # an empty current folder takes a demo
    res = runner.invoke(app, ["demo", "--out", ".", "--data", str(blobs_npz), "--minutes", "0.01"])
    assert res.exit_code == 130, res.output


def test_demo_writes_every_output(tmp_path: Path, blobs_npz: Path) -> None:
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--out", str(out), "--data", str(blobs_npz), "--minutes", "0.02",
                              "--per-class", "2", "--steps", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for name in ("samples_per_grade.png", "growth/growth.gif", "growth/denoise.gif", "loss.png", "log.csv",
                 "generated/labels.csv"):
        assert (out / name).exists(), name
        assert str(out / name) in res.output.replace("\n", "") or name.startswith("generated")
    assert (out / ".geca-demo").is_file() and (out / ".geca-demo-done").is_file()  # the next demo may replace it
    sampling = json.loads((out / "generated/manifest.json").read_text())["sampling"]
    assert sampling["sampler"] == "dpm++sde" and sampling["precision"] == resolve_precision("auto", cuda=False)
    rerun = runner.invoke(app, ["demo", "--out", str(out), "--data", str(blobs_npz), "--minutes", "0.01",
                                "--per-class", "1", "--steps", "2", "--sampler", "ddim", "--precision", "fp32"])
    assert rerun.exit_code == 0, rerun.output
    assert len(list((out / "generated/images").iterdir())) == 2 and not (out / ".earlier-demo").exists()
    sampling = json.loads((out / "generated/manifest.json").read_text())["sampling"]
    assert sampling["sampler"] == "ddim" and sampling["precision"] == "fp32"
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["precision"] == "fp32"
    refusals = [(["--sampler", "euler"], "--sampler must be one of"),
                (["--steps", "1001"], "--steps must be at most the 1000"),
                (["--schedule", "karras"], "--schedule must be uniform for ddpm and ddim"),
                (["--precision", "half"], "--precision must be one of")]
    if not torch.cuda.is_available():
        refusals.append((["--precision", "fp16"], "--precision must be fp32, bf16 or auto without a CUDA GPU"))
    for flags, message in refusals:
        bad = runner.invoke(app, ["demo", "--out", str(out), "--data", str(blobs_npz), "--sampler", "ddim", *flags])
        assert bad.exit_code == 2 and message in bad.output, flags
        assert (out / "generated/manifest.json").exists()  # refused before the earlier demo was replaced


def test_an_error_starts_its_own_line_after_a_progress_bar() -> None:
    """An error raised while a bar is open (tqdm ends its line only when closed) must not be glued to the bar."""
    import sys

    import typer
    from tqdm import tqdm

    from geca.cli.common import guarded
    from geca.errors import ConfigError

    def fails(bar: bool = typer.Option(True, "--bar/--no-bar")) -> None:
        progress = tqdm(total=3, desc="classifiers", file=sys.stderr, disable=not bar)
        progress.update()
        raise ConfigError("--thing is wrong")

    one = typer.Typer()
    one.command()(guarded(fails))
    for left in list(tqdm._instances):  # bars earlier tests left open in this process
        left.close()
    for flag in ("--no-bar", "--bar"):
        res = runner.invoke(one, [flag])
        assert res.exit_code == 2
        lines = res.output.splitlines()
        assert "error: --thing is wrong" in lines and sum("error:" in line for line in lines) == 1, res.output
        assert res.output.startswith("error:") == (flag == "--no-bar")  # no blank line without a bar
