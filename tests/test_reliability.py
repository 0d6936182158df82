"""Bad input, corrupt files, crashes and divergence: one `error:` line naming the file or flag, exit 2, nothing
created or lost, no stale leftovers (the reliability sweep's cases)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from geca.cli.main import app

runner = CliRunner()
TINY = ["--model", "GeCA-T", "--nca-steps", "2", "--batch-size", "4", "--sample-every", "0", "--log-every", "1",
        "--image-size", "8", "--no-progress"]
FAST = ["--sampler", "ddim", "--steps", "2", "--no-progress"]


def refused(res, *words: str) -> None:
    """Exit 2, one `error:` line containing every word, no traceback."""
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import blob_images

    parts = {}
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        s = blob_images(n=8, seed=seed)
        parts[f"{split}_images"], parts[f"{split}_labels"] = s.images, s.labels.argmax(1)[:, None].astype(np.uint8)
    path = tmp_path_factory.mktemp("data") / "blobs.npz"
    np.savez(path, **parts)
    return path


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(out), "--max-steps", "2",
                              "--checkpoint-every", "1", *TINY])
    assert res.exit_code == 0, res.output
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize("flags, flag", [
    (["--max-steps", "0"], "--max-steps"), (["--max-steps", "-5"], "--max-steps"),
    (["--max-steps", str(10**20)], "--max-steps"), (["--nca-steps", "100000"], "--nca-steps"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-4"], "--batch-size"),
    (["--batch-size", str(10**20)], "--batch-size"), (["--set", "train.batch_size=1e20"], "--set train.batch_size"),
    (["--log-every", "0"], "--log-every"), (["--ema-decay", "2"], "--ema-decay"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"), (["--lr", "-1"], "--lr"),
    (["--precision", "fp64"], "--precision"), (["--max-minutes", "inf"], "--max-minutes"),
    (["--set", "train.max_minutes=.inf"], "--set train.max_minutes"), (["--seed", "-1"], "--seed"),
    (["--set", "preview.sampler.steps=0"], "--set preview.sampler.steps"),
    (["--batch-size", "abc"], "--batch-size"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_train_refuses_bad_values_before_creating_anything(data: Path, tmp_path: Path, flags: list[str],
                                                           flag: str) -> None:
    out = tmp_path / "run"
    refused(runner.invoke(app, ["train", "--data", str(data), "--out", str(out), *TINY, *flags]), flag)
    assert not out.exists()


def test_train_refuses_a_folder_of_other_files_and_a_trained_run_without_resume(run: Path, data: Path,
                                                                               tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("notes.txt", "scan.png", "b.csv", "c.csv"):
        (out / name).write_text("mine")
    refused(runner.invoke(app, ["train", "--data", str(data), "--out", str(out), *TINY]),
            f"--out {out}", "holds other files (b.csv, c.csv, notes.txt, …)")
    assert sorted(p.name for p in out.iterdir()) == ["b.csv", "c.csv", "notes.txt", "scan.png"]
    refused(runner.invoke(app, ["train", "--data", str(data), "--out", str(run), *TINY]), "pass --resume")
    hidden = tmp_path / "hidden"  # a notebook's or a file browser's hidden files are no other's run
    (hidden / ".ipynb_checkpoints").mkdir(parents=True)
    (hidden / ".DS_Store").write_bytes(b"")
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(hidden), "--max-steps", "1", *TINY])
    assert res.exit_code == 0 and (hidden / "checkpoints" / "latest.json").exists(), res.output
    left = tmp_path / "left"  # a run interrupted before its first checkpoint: nothing to resume, its log starts over
    (left / "samples").mkdir(parents=True)
    for name in ("samples/step_0000060.png", "samples/mine.png", "model.json"):
        (left / name).write_bytes(b"")
    (left / "log.csv").write_text("step,loss\n20,1.0\n40,0.9\n60,0.8\n")
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(left), "--max-steps", "1", *TINY])
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in csv.DictReader(open(left / "log.csv"))] == ["1"]
    assert sorted(p.name for p in (left / "samples").iterdir()) == ["mine.png"]  # only what that run drew goes
    fresh = tmp_path / "fresh"  # no run began here: a folder named samples/ is the user's
    (fresh / "samples").mkdir(parents=True)
    (fresh / "samples" / "step_0000001.png").write_bytes(b"mine")
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(fresh), "--max-steps", "1", *TINY])
    assert res.exit_code == 0 and (fresh / "samples" / "step_0000001.png").read_bytes() == b"mine", res.output


def test_a_run_resumes_from_its_npz_moved_elsewhere_but_not_from_other_data(run: Path, data: Path,
                                                                          tmp_path: Path) -> None:
    import shutil

    copy = copy_run(run, tmp_path)
    moved = tmp_path / "moved.npz"
    shutil.copy(data, moved)  # the same arrays at another path
    res = runner.invoke(app, ["train", "--out", str(copy), "--resume", "--data", str(moved), "--max-steps", "3",
                              "--no-progress"])
    assert res.exit_code == 0 and f"resume: data.spec {str(data)!r} → {str(moved)!r} (--data)" in res.output, \
        res.output
    assert json.loads((copy / "model.json").read_text())["data"]["spec"] == str(moved)
    again = tmp_path / "again.npz"  # moved once more after the run finished: repointed without training a step
    shutil.copy(data, again)
    log = (copy / "log.csv").read_text()
    res = runner.invoke(app, ["train", "--out", str(copy), "--resume", "--data", str(again), "--no-progress"])
    assert res.exit_code == 0 and "nothing to train" in res.output, res.output
    assert f"resume: the run's data is recorded as {again} now (it was {moved})" in res.output
    assert json.loads((copy / "model.json").read_text())["data"]["spec"] == str(again)
    assert yaml.safe_load((copy / "config.yaml").read_text())["data"]["spec"] == str(again)
    assert (copy / "log.csv").read_text() == log
    other = dict(np.load(moved))
    other["train_images"] = other["train_images"][::-1].copy()  # the same shapes, other images, another file
    np.savez(tmp_path / "other.npz", **other)
    refused(runner.invoke(app, ["train", "--out", str(copy), "--resume", "--data", str(tmp_path / "other.npz"),
                                "--max-steps", "4", "--no-progress"]), "model.json differs", "data.spec")


def test_ctrl_c_in_training_checkpoints_the_step_it_ends(data: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first Ctrl-C stops training after the step it came in, which is checkpointed: --resume loses nothing."""
    import os
    import signal

    from geca.training.trainer import Trainer

    step = Trainer.step

    def interrupted_in_step_3(self: Trainer) -> dict:
        terms = step(self)
        if self.step_count == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, in the middle of the work
        return terms

    monkeypatch.setattr(Trainer, "step", interrupted_in_step_3)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(out), "--max-steps", "9",
                              "--checkpoint-every", "100", *TINY, "--log-every", "10"])
    assert res.exit_code == 130 and "stopped after step 3, checkpointed" in res.output, res.output
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["path"] == "step_0000003"
    assert [r["step"] for r in csv.DictReader(open(out / "log.csv"))][-1] == "3"  # its steps since the last row too
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is itself again
    last = tmp_path / "last"  # in the last step: the run ends as it would have, its final work done
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(last), "--max-steps", "3", *TINY])
    assert res.exit_code == 0 and (last / "loss.png").is_file() and "trained to step 3" in res.output, res.output


def test_a_full_disk_while_checkpointing_is_one_error_and_keeps_the_last_checkpoint(
        run: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = copy_run(run, tmp_path)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(copy), "--max-steps", "3", "--resume",
                              "--checkpoint-every", "1", *TINY])
    refused(res, "optimizer.pt", "could not be written")
    assert json.loads((copy / "checkpoints" / "latest.json").read_text())["path"] == "step_0000002"
    assert not [p for p in (copy / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_config_file_value_is_named_with_its_file(data: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  lr: -1\n")
    refused(runner.invoke(app, ["train", "-c", str(cfg), "--data", str(data), "--out", str(tmp_path / "r"), *TINY]),
            str(cfg), "train.lr")
    for text, words in (("model:\n  nmae: GeCA-T\n", f"{cfg}: model: unknown key(s) nmae"),
                        ("model:\n  heads: x\n", f"{cfg}: model.heads: expected int"),
                        ("model:\n  family: foo\n", f"{cfg}: model.family: unknown model family")):
        cfg.write_text(text)  # the file, then the key's path in it
        refused(runner.invoke(app, ["train", "-c", str(cfg), "--out", str(tmp_path / "r")]), words)
    refused(runner.invoke(app, ["train", "--data", str(data), "--set", "data.folds_file=gone.csv", "--out",
                                str(tmp_path / "r"), *TINY]), "--set data.folds_file gone.csv: not found")
    # a preset's folds file is its dataset's: --data alone leaves a placeholder path, said as such
    refused(runner.invoke(app, ["train", "-c", "deepdrid-256-geca-s", "--data", str(data), "--out",
                                str(tmp_path / "r")]), "deepdrid-256-geca-s.yaml: data.folds_file", "--folds-file")
    assert not (tmp_path / "r").exists()
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    refused(runner.invoke(app, ["train", "-c", str(binary), "--out", str(tmp_path / "r")]), str(binary))
    listed = tmp_path / "listed.yaml"
    listed.write_text("model:\n  name: [1]\n")
    refused(runner.invoke(app, ["train", "-c", str(listed), "--data", str(data), "--out", str(tmp_path / "r")]),
            f"{listed}: model.name: expected a model name, got [1]")
    assert not (tmp_path / "r").exists()


def test_bad_data_files(tmp_path: Path, data: Path) -> None:
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    refused(runner.invoke(app, ["train", "--data", str(truncated), "--out", str(tmp_path / "r"), *TINY]),
            str(truncated))
    wide = tmp_path / "wide.npz"
    arrays = dict(np.load(data))
    for s in ("train", "val", "test"):
        arrays[f"{s}_images"] = np.zeros((8, 12, 8, 3), np.uint8)
    np.savez(wide, **arrays)
    refused(runner.invoke(app, ["train", "--data", str(wide), "--out", str(tmp_path / "r"), "--model", "GeCA-T",
                                "--no-progress"]), str(wide), "square")
    empty = tmp_path / "empty.npz"
    arrays = dict(np.load(data))
    arrays["train_images"], arrays["train_labels"] = arrays["train_images"][:0], arrays["train_labels"][:0]
    np.savez(empty, **arrays)
    refused(runner.invoke(app, ["train", "--data", str(empty), "--out", str(tmp_path / "r"), *TINY]), "empty")
    huge_label = tmp_path / "huge_label.npz"  # the class count is read as the largest label + 1
    arrays = dict(np.load(data))
    arrays["train_labels"] = arrays["train_labels"].astype(np.int64)
    arrays["train_labels"][0] = 2**40
    np.savez(huge_label, **arrays)
    refused(runner.invoke(app, ["train", "--data", str(huge_label), "--out", str(tmp_path / "r"), *TINY]),
            "huge_label.npz: the largest label, 1099511627776")
    huge_shape = tmp_path / "huge_shape.npz"  # a member whose header claims petabytes
    with zipfile.ZipFile(huge_shape, "w") as z:
        for key, array in np.load(data).items():
            with z.open(f"{key}.npy", "w") as f:
                if key == "train_images":
                    np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                             "shape": (10**12, 8, 8, 3)})
                    f.write(b"\0" * 64)
                else:
                    np.save(f, array)
    refused(runner.invoke(app, ["train", "--data", str(huge_shape), "--out", str(tmp_path / "r"), *TINY]),
            "huge_shape.npz: an npz member too large to load")
    assert not (tmp_path / "r").exists()


def test_outputs_and_inputs_of_the_other_commands_are_checked_before_any_work(data: Path, tmp_path: Path) -> None:
    """features train, folds, encode and experiment: an output path of the wrong kind, an unknown split, a folder
    given as a config and a file that is no npz are refused up front, each naming its flag or file."""
    a_file, folder = tmp_path / "file", tmp_path / "folder"
    a_file.write_text("x")
    folder.mkdir()
    for out in (folder, tmp_path / "w.pt", a_file / "w.safetensors"):
        refused(runner.invoke(app, ["features", "train", "--data", str(data), "--out", str(out)]), "--out", str(out))
    for out, words in ((folder, "a folder; give a .csv file name"), (tmp_path / "folds.txt", "expected a .csv")):
        refused(runner.invoke(app, ["folds", "--data", "synthetic-oct", "--out", str(out)]), "--out", words)
    refused(runner.invoke(app, ["folds", "--data", str(data), "--out", str(tmp_path / "f.csv")]), str(data), "'all'")
    encode = ["encode", "--vae", str(tmp_path / "no-vae"), "--data", str(data)]
    refused(runner.invoke(app, [*encode, "--out", str(tmp_path / "e"), "--splits", "train,bogus"]), "--splits", "bogus")
    refused(runner.invoke(app, [*encode, "--out", str(a_file)]), "--out", "is a file")
    refused(runner.invoke(app, ["classify", "--data", str(data), "--out", str(a_file / "r")]), "--out", "is a file")
    junk_weights = tmp_path / "resnet.pth"
    junk_weights.write_bytes(b"not weights")
    res = runner.invoke(app, ["classify", "--data", str(data), "--out", str(tmp_path / "r"), "--imagenet-weights",
                              str(junk_weights)])
    refused(res, str(junk_weights))
    assert "classifiers" not in res.output  # refused before the first classifier starts
    junk_weights.unlink()
    refused(runner.invoke(app, ["experiment", str(folder)]), str(folder), "is a directory")
    refused(runner.invoke(app, ["train", "-c", str(folder), "--out", str(tmp_path / "r")]), str(folder))
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    res = runner.invoke(app, ["features", "train", "--data", str(text), "--out", str(tmp_path / "w.safetensors")])
    refused(res, str(text), "not an npz file")
    assert "allow_pickle" not in res.output  # numpy's advice to unpickle is never passed on
    mixed = tmp_path / "mixed.npz"  # grey training images, colour validation images
    rng = np.random.default_rng(0)
    np.savez(mixed, **{f"{s}_images": rng.integers(0, 255, (8, 8, 8, 3) if s != "train" else (8, 8, 8), np.uint8)
                       for s in ("train", "val", "test")}, **{f"{s}_labels": np.arange(8)[:, None] % 2
                                                              for s in ("train", "val", "test")})
    res = runner.invoke(app, ["features", "train", "--data", str(mixed), "--out", str(tmp_path / "w.safetensors")])
    refused(res, str(mixed), "validation images (3-channel", "training images (1-channel")
    mixed.unlink()
    refused(runner.invoke(app, ["encode", "--vae", str(a_file), "--data", str(data), "--out", str(tmp_path / "e")]),
            str(a_file), "a file, not a VAE directory")
    refused(runner.invoke(app, ["folds", "--data", "synthetic-oct@patients=9,size=8", "--k", "10", "--out",
                                str(tmp_path / "f.csv")]), "--k 10", "has 9 patients/groups")
    refused(runner.invoke(app, ["experiment", "smoke", "--out", str(a_file)]), "--out", "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder", "text.npz"]


def test_files_are_not_replaced_unasked_and_fold_flags_need_a_folds_file(data: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """features train and folds keep an existing --out without --overwrite; --fold and --cv-val without a folds
    file, or a --cv-val that is none, are refused before the work; a folder that takes no files is found first."""
    out = tmp_path / "folds.csv"
    out.write_text("mine")
    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, weights)  # a run's weights, say
    mine = weights.read_bytes()
    # the command's own kind of file only, not a dataset's CSV or a run's weights: --overwrite is not offered
    for again in ([], ["--overwrite"]):
        res = runner.invoke(app, ["features", "train", "--data", str(data), "--out", str(weights), *again])
        refused(res, "exists and is not a `geca features train` file")
        assert "pass --overwrite" not in res.output
        res = runner.invoke(app, ["folds", "--data", "synthetic-oct@patients=9,size=8", "--out", str(out), *again])
        refused(res, "exists and is not a folds file")
        assert "pass --overwrite" not in res.output
    assert out.read_text() == "mine" and weights.read_bytes() == mine
    out.unlink()
    for again in ([], ["--overwrite"]):
        res = runner.invoke(app, ["folds", "--data", "synthetic-oct@patients=9,size=8", "--out", str(out), "--k",
                                  "3", *again])
        assert res.exit_code == 0 and out.read_text().startswith("filename"), res.output
    refused(runner.invoke(app, ["folds", "--data", "synthetic-oct@patients=9,size=8", "--out", str(out)]),
            "--out", "exists; pass --overwrite")  # an earlier folds file
    new = str(tmp_path / "new.safetensors")
    res = runner.invoke(app, ["features", "train", "--data", "synthetic-oct@patients=9,size=8", "--folds-file",
                              str(out), "--fold", "1", "--epochs", "1", "--out", str(tmp_path / "fold1.safetensors")])
    assert res.exit_code == 0 and "trained domain features" in res.output, res.output
    assert f"train of fold 1 of {out} (--cv-val slice)" in " ".join(res.output.split())
    refused(runner.invoke(app, ["features", "train", "--data", str(data), "--out", new, "--cv-val", "next-fold"]),
            "--cv-val", "needs --folds-file")
    refused(runner.invoke(app, ["features", "train", "--data", str(data), "--out", new, "--folds-file", str(out),
                                "--cv-val", "banana"]), "--cv-val must be one of")
    encode = ["encode", "--vae", str(tmp_path / "no-vae"), "--data", str(data), "--out", str(tmp_path / "e")]
    refused(runner.invoke(app, [*encode, "--fold", "1"]), "--fold", "needs --folds-file")

    def read_only(**kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("geca.utils.io.tempfile.TemporaryFile", read_only)
    refused(runner.invoke(app, ["features", "train", "--data", str(data), "--out", new]), "--out",
            f"cannot write in {tmp_path} (Permission denied)")
    assert not (tmp_path / "e").exists() and not Path(new).exists()


def test_an_empty_validation_split_is_refused_before_training(tmp_path: Path) -> None:
    """Nine patients in three folds leave fold 1 no validation patient under --cv-val slice: each command names the
    fold before it trains."""
    data, folds = "synthetic-oct@patients=9,size=8", tmp_path / "f.csv"
    assert runner.invoke(app, ["folds", "--data", data, "--k", "3", "--out", str(folds)]).exit_code == 0
    refused(runner.invoke(app, ["train", "--data", data, "--folds-file", str(folds), "--fold", "1", "--validate-every",
                                "1", "--out", str(tmp_path / "run"), *TINY]), "fold 1 of", "its val split is empty")
    assert not (tmp_path / "run").exists()
    # the same split is as empty for the domain network and the downstream classifier
    refused(runner.invoke(app, ["features", "train", "--data", data, "--folds-file", str(folds), "--fold", "1",
                                "--split", "val", "--out", str(tmp_path / "w.safetensors")]), "fold 1 of",
            "its val split is empty")
    refused(runner.invoke(app, ["classify", "--data", data, "--folds-file", str(folds), "--arms", "geometric",
                                "--epochs", "1", "--out", str(tmp_path / "table")]), "fold 1 of",
            "its val split is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.csv"]


def test_out_must_be_a_new_or_empty_folder(data: Path, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    refused(runner.invoke(app, ["train", "--data", str(data), "--out", str(busy), *TINY]), str(busy))
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refused(runner.invoke(app, ["train", "--data", str(data), "--out", str(a_file / "run"), *TINY]), str(a_file))


def test_sample_and_grow_refuse_bad_values(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    base = ["sample", "--run", str(run), "--out", str(out), "--per-class", "1", *FAST]
    refused(runner.invoke(app, [*base, "--batch-size", "0"]), "--batch-size")
    refused(runner.invoke(app, [*base, "--weights", "raw"]), "--weights")
    refused(runner.invoke(app, [*base, "--steps", "5000"]), "--steps", "1000")
    refused(runner.invoke(app, [*base, "--device", "bogus"]), "--device")
    refused(runner.invoke(app, [*base, "--cfg", "-1"]), "--cfg")
    refused(runner.invoke(app, [*base, "--schedule", "cosine"]), "--schedule")
    refused(runner.invoke(app, [*base, "--sampler", "ddim", "--schedule", "lambda"]), "--schedule")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refused(runner.invoke(app, ["sample", "--run", str(run), "--out", str(a_file), "--per-class", "1", *FAST]),
            str(a_file))
    assert not out.exists() and a_file.read_text() == "x"
    grow = ["grow", "--run", str(run), "--out", str(tmp_path / "g"), "--steps", "2"]
    refused(runner.invoke(app, [*grow, "--t", "5000"]), "--t")
    refused(runner.invoke(app, [*grow, "--t", "-1"]), "--t")
    refused(runner.invoke(app, [*grow, "--frames", "0"]), "--frames")
    refused(runner.invoke(app, [*grow, "--precision", "half"]), "--precision must be one of")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("args, flag", [
    (["models", "--resolution", "0"], "--resolution"), (["models", "--classes", "0"], "--classes"),
    (["models", "--channels", "-1"], "--channels"),
    (["classify", "--data", "x.npz", "--out", "OUT", "--image-size", "0"], "--image-size"),
    (["classify", "--data", "x.npz", "--out", "OUT", "--epochs", "0"], "--epochs"),
    (["classify", "--data", "x.npz", "--out", "OUT", "--bootstrap", "10"], "--bootstrap"),
    (["classify", "--data", "x.npz", "--out", "OUT", "--batch-size", str(10**20)], "--batch-size"),
    (["classify", "--data", "x.npz", "--out", "OUT", "--bootstrap", str(10**20)], "--bootstrap"),
    (["classify", "--data", "x.npz", "--out", "OUT", "--image-size", str(10**8)], "--image-size"),
    (["classify", "--data", "x.npz", "--out", "OUT", "--threads", str(10**20)], "--threads"),
    (["train", "--data", "synthetic-fundus@n=8", "--out", "OUT", "--image-size", str(10**8)], "--image-size"),
    (["train", "--data", "synthetic-fundus@n=8", "--out", "OUT", "--threads", str(10**20)], "--threads"),
    (["train", "--data", "synthetic-fundus@n=8", "--out", "OUT", "--set", f"model.hidden_size={10**20}"],
     "model.hidden_size"),
    (["train", "--data", f"synthetic-fundus@n={10**12}", "--out", "OUT"], "n must be in [1, 1000000]"),
    (["train", "--data", f"synthetic-fundus@size={10**8}", "--out", "OUT"], "size must be in [8, 8192]"),
    (["encode", "--vae", "V", "--data", "x.npz", "--out", "OUT", "--size", str(10**8)], "--size"),
    (["features", "train", "--data", "x.npz", "--out", "OUT/f.safetensors", "--image-size", str(10**8)],
     "--image-size"),
    (["sample", "--run", "RUN", "--out", "OUT", "--per-class", "1", "--batch-size", str(10**20)], "--batch-size"),
    (["evaluate", "--generated", "g", "--real", "x:test", "--train", "x:train", "--out", "OUT/m.json",
      "--batch-size", "0"], "--batch-size"),
    (["runs", "NOWHERE"], "NOWHERE"),
    (["train", "--data", "synthetic-oct@patients=9,size=8", "--download", "--out", "OUT"], "--download"),
    (["train", "--data", "NOWHERE.npz", "--download", "--out", "OUT"], "--download"),
    (["train", "--data", "synthetic-oct@patients=9,size=8", "--fold", "1", "--out", "OUT"], "--fold"),
    (["train", "--data", "synthetic-oct@patients=9,size=8", "--folds-file", "NOWHERE.csv", "--out", "OUT"],
     "--folds-file"),
])
def test_click_and_range_errors_are_one_line_naming_the_flag(tmp_path: Path, args: list[str], flag: str) -> None:
    out = tmp_path / "out"
    args = [a.replace("OUT", str(out)).replace("NOWHERE", str(tmp_path / "nowhere")) for a in args]
    refused(runner.invoke(app, args), flag.replace("NOWHERE", str(tmp_path / "nowhere")))
    assert not out.exists()


def test_classify_refuses_a_fold_test_without_folds_before_training(data: Path, tmp_path: Path) -> None:
    refused(runner.invoke(app, ["classify", "--data", str(data), "--out", str(tmp_path / "t"), "--test", "ttest",
                                "--epochs", "1", "--seeds", "1", "--no-progress"]), "--test ttest", "--folds-file")
    assert not (tmp_path / "t").exists()


def test_sample_grow_and_resume_refuse_what_they_would_ignore_or_overwrite(run: Path, data: Path,
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "s"
    base = ["sample", "--run", str(run), "--out", str(out), "--per-class", "1", *FAST]
    refused(runner.invoke(app, [*base, "--ratio", "3"]), "--ratio", "--labels-from")
    refused(runner.invoke(app, ["sample", "--run", str(run), "--out", str(out), "--labels-from", "tst", *FAST]),
            "--labels-from must be one of")
    assert not out.exists()
    assert runner.invoke(app, base).exit_code == 0
    refused(runner.invoke(app, [*base, "--resume"]), "--resume", "finished")
    g = tmp_path / "g"
    grow = ["grow", "--run", str(run), "--steps", "2", "--frames", "2"]
    assert runner.invoke(app, [*grow, "--out", str(g)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in g.iterdir()}
    refused(runner.invoke(app, [*grow, "--out", str(g), "--seed", "1"]), str(g), "--overwrite")
    assert {p.name: p.read_bytes() for p in g.iterdir()} == before
    (g / ".growth.gif.k1ll3d.tmp").write_text("")  # what a killed write leaves: no reason to refuse the folder
    assert runner.invoke(app, [*grow, "--out", str(g), "--seed", "1", "--overwrite", "--precision", "bf16"]
                         ).exit_code == 0
    refused(runner.invoke(app, [*grow, "--out", str(data)]), str(data))
    refused(runner.invoke(app, [*grow, "--out", str(out), "--overwrite"]), f"--out {out} holds other files")
    assert (out / "manifest.json").is_file() and not (out / "growth.gif").exists()
    # A finished run resumed to its own step trains nothing and rewrites nothing (not even the preview).
    copy = copy_run(run, tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    res = runner.invoke(app, ["train", "--out", str(copy), "--resume", "--max-steps", "2", "--no-progress"])
    assert res.exit_code == 0 and "nothing to train" in res.output, res.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # What a resume changes is said only once the resume checked out
    res = runner.invoke(app, ["train", "--out", str(copy), "--resume", "--max-steps", "3", "--image-size", "16",
                              "--no-progress"])
    refused(res, "model.json")
    assert "resume:" not in res.output


def test_evaluate_refuses_what_it_cannot_score_before_any_network_runs(run: Path, data: Path,
                                                                       tmp_path: Path) -> None:
    samples = tmp_path / "s"
    assert runner.invoke(app, ["sample", "--run", str(run), "--out", str(samples), "--per-class", "2",
                               *FAST]).exit_code == 0
    out = tmp_path / "m.json"
    base = ["evaluate", "--generated", str(samples), "--out", str(out), "--features", "random", "--gg-features",
            "random", "--no-lpips"]
    real, train = ["--real", f"{data}:test"], ["--train", f"{data}:train"]
    refused(runner.invoke(app, [*base, *real, "--train", f"{data}:test"]), "--real", "--train")
    refused(runner.invoke(app, [*base, "--real", f"{data}:tset", *train]), "--real", "unknown split 'tset'")
    refused(runner.invoke(app, [*base, *real, *train, "--fold", "1"]), "--fold", "--folds-file")
    refused(runner.invoke(app, [*base, *real, *train, "--cv-val", "next-fold"]), "--cv-val", "--folds-file")
    # 4 images: KID subsets of 4 // 4 = 1 under the paper's protocol
    refused(runner.invoke(app, [*base, *real, *train, "--protocol", "paper"]), "4 generated", "paper")
    assert not out.exists()


def test_the_api_takes_a_step_number_and_refuses_labels_it_would_misread(run: Path) -> None:
    import geca

    loaded = geca.load_run(run, checkpoint=1, device="cpu")
    assert loaded.step == 1
    with pytest.raises(TypeError, match=r"pass \['class 0'\]"):
        loaded.sample("class 0", sampler="ddim", steps=2)
    with pytest.raises(ValueError, match="no labels"):
        loaded.sample([], sampler="ddim", steps=2)


def test_evaluate_refuses_a_directory_as_out_and_writes_nothing(run: Path, data: Path, tmp_path: Path) -> None:
    samples = tmp_path / "s"
    assert runner.invoke(app, ["sample", "--run", str(run), "--out", str(samples), "--per-class", "2",
                               *FAST]).exit_code == 0
    out = tmp_path / "metrics"
    out.mkdir()
    refused(runner.invoke(app, ["evaluate", "--generated", str(samples), "--real", f"{data}:test", "--train",
                                f"{data}:train", "--out", str(out), "--features", "random", "--no-lpips"]), str(out))
    assert not list(tmp_path.glob("*grid*")) and not list(out.iterdir())


def test_flipped_bytes_in_weights_are_found(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path)
    weights = copy / "checkpoints" / "step_0000002" / "ema.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF  # inside the tensor data: the file still parses
    weights.write_bytes(bytes(raw))
    res = runner.invoke(app, ["sample", "--run", str(copy), "--out", str(tmp_path / "s"), "--per-class", "1", *FAST])
    refused(res, str(weights), "SHA-256")
    assert "do not fit" not in res.output  # corrupt, not the wrong model's
    assert not (tmp_path / "s").exists()


def test_weights_of_another_shape_name_the_first_tensor_that_does_not_fit(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path)
    spec = json.loads((copy / "model.json").read_text())
    spec["model"]["hidden_channels"] += 4
    (copy / "model.json").write_text(json.dumps(spec))
    refused(runner.invoke(app, ["sample", "--run", str(copy), "--out", str(tmp_path / "s"), "--per-class", "1",
                                *FAST]), "ema.safetensors: weights do not fit the model (size mismatch for ")
    spec["model"]["hidden_channels"] -= 4
    edited = [({**spec, "model": {**spec["model"], "heads": 0}}, "model.heads must be ≥ 1, got 0"),
              ({**spec, "resolution": -8}, "resolution must be ≥ 1, got -8"),
              ({**spec, "format": 99}, "format must be ≤ 2 (a newer geca wrote it), got 99")]
    for text, words in (("[]", "expected a mapping of keys to values, got list"),
                        (json.dumps({"model": spec["model"]}), "missing key(s) diffusion, data, in_channels"),
                        *((json.dumps(d), w) for d, w in edited)):
        (copy / "model.json").write_text(text)
        refused(runner.invoke(app, ["sample", "--run", str(copy), "--out", str(tmp_path / "s"), "--per-class", "1",
                                    *FAST]), "model.json: invalid", words)


def test_runs_says_which_runs_would_not_load(run: Path, tmp_path: Path) -> None:
    """A damaged or missing weights file, a damaged model.json and a run without a checkpoint are listed as such."""
    root = tmp_path / "all"
    for name in ("good", "flipped", "no-ema", "bad-spec", "untrained", "bad-state", "bad-best", "new-folds",
                 "no-folds", "no-state", "emptied", "bad-files", "cut", "gone", "bad-latest", "other-model",
                 "no-model", "lost-spec"):
        shutil.copytree(run, root / name)
    (root / "lost-spec/model.json").unlink()  # still a run: its checkpoints say so
    (root / "emptied/checkpoints/step_0000002/ema.safetensors").write_bytes(b"")
    cut = root / "cut/checkpoints/step_0000002/ema.safetensors"
    cut.write_bytes(cut.read_bytes()[:-100])
    (root / "no-state/checkpoints/step_0000002/state.json").unlink()
    shutil.copytree(root / "bad-best/checkpoints/step_0000002", root / "bad-best/checkpoints/best")
    (root / "bad-best/checkpoints/best/ema.safetensors").write_bytes(b"not the saved weights")
    folds = tmp_path / "folds.csv"
    folds.write_text("filename,patient_id,fold\n")
    for name, recorded in (("new-folds", "0" * 64), ("no-folds", None)):
        spec = json.loads((root / name / "model.json").read_text())
        spec["data"].update(folds_file=str(folds if recorded else tmp_path / "gone.csv"), fold=3)
        spec["folds_sha256"] = recorded or "0" * 64
        (root / name / "model.json").write_text(json.dumps(spec))
    weights = root / "flipped/checkpoints/step_0000002/model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    (root / "no-ema/checkpoints/step_0000002/ema.safetensors").unlink()
    (root / "bad-spec/model.json").write_text("{")
    shutil.rmtree(root / "untrained/checkpoints")
    (root / "bad-state/checkpoints/step_0000002/state.json").write_text("{")
    (root / "bad-files/checkpoints/step_0000002/state.json").write_text('{"step": 2, "files": "x"}')
    shutil.rmtree(root / "gone/checkpoints/step_0000002")
    (root / "bad-latest/checkpoints/latest.json").write_text("{")
    other = json.loads((root / "other-model/model.json").read_text())  # another run's model.json, as it were
    other["model"]["hidden_size"] *= 2
    (root / "other-model/model.json").write_text(json.dumps(other))
    from dataclasses import asdict

    from geca.models.config import named_model

    other.update(model=asdict(named_model("DiT-T")), resolution=7)  # patches of 2 do not tile 7: no model is built
    (root / "no-model/model.json").write_text(json.dumps(other))
    res = runner.invoke(app, ["runs", str(root), "--json"])
    assert res.exit_code == 0, res.output
    rows = {Path(r["run"]).name: r for r in json.loads(res.output)}
    assert {name: r["status"] for name, r in rows.items()} == {
        "good": "ok", "flipped": "damaged model.safetensors", "no-ema": "missing ema.safetensors",
        "bad-spec": "damaged model.json", "untrained": "no checkpoint", "bad-state": "damaged state.json",
        "bad-best": "best: damaged ema.safetensors", "new-folds": "folds file changed",
        "no-folds": "folds file missing", "no-state": "missing state.json", "emptied": "empty ema.safetensors",
        "bad-files": "damaged state.json", "cut": "truncated ema.safetensors", "gone": "missing checkpoint folder",
        "bad-latest": "damaged latest.json", "other-model": "model.safetensors does not fit model.json",
        "no-model": rows["no-model"]["status"], "lost-spec": "missing model.json"}
    assert rows["no-model"]["status"].startswith("model.json describes no model"), rows["no-model"]
    assert isinstance(rows["good"]["loss"], float) and rows["good"]["loss"] > 0
    res = runner.invoke(app, ["runs", str(root), "--json", "--quick"])  # files there, not hashed
    quick = {Path(r["run"]).name: r["status"] for r in json.loads(res.output)}
    assert quick["flipped"] == quick["good"] == "ok" and quick["no-ema"] == "missing ema.safetensors"
    assert quick["emptied"] == "empty ema.safetensors" and quick["cut"] == "truncated ema.safetensors"
    assert (rows["new-folds"]["folds_file"], rows["new-folds"]["fold"]) == (str(folds), 3)
    assert rows["good"]["folds_file"] is None
    res = runner.invoke(app, ["runs", str(root)])
    assert res.exit_code == 0 and "fold 3 of folds.csv" in res.output, res.output
    refused(runner.invoke(app, ["runs", str(weights)]), "a file, not a folder")
    # Another run's checkpoint would pass as this run's (its model.json, its folds for expand's leakage check)
    refused(runner.invoke(app, ["sample", "--run", str(root / "no-ema"), "--checkpoint",
                                str(root / "good/checkpoints/step_0000002"), "--out", str(tmp_path / "s"),
                                "--per-class", "1", *FAST]), "not a checkpoint of --run")


def test_non_finite_weights_are_refused(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path)
    ckpt = copy / "checkpoints" / "step_0000002"
    tensors = load_file(ckpt / "ema.safetensors")
    key = next(iter(tensors))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, ckpt / "ema.safetensors")
    state = json.loads((ckpt / "state.json").read_text())
    state.pop("files")  # as a checkpoint written before hashes were recorded
    (ckpt / "state.json").write_text(json.dumps(state))
    refused(runner.invoke(app, ["sample", "--run", str(copy), "--out", str(tmp_path / "s"), "--per-class", "1",
                                *FAST]), "NaN", "ema.safetensors")


def test_integer_weights_are_refused(run: Path, tmp_path: Path) -> None:
    """torch's load_state_dict would cast them into the float model without a word."""
    copy = copy_run(run, tmp_path)
    ckpt = copy / "checkpoints" / "step_0000002"
    save_file({k: v.to(torch.int32) for k, v in load_file(ckpt / "ema.safetensors").items()}, ckpt / "ema.safetensors")
    state = json.loads((ckpt / "state.json").read_text())
    state.pop("files")  # as a checkpoint written before hashes were recorded
    (ckpt / "state.json").write_text(json.dumps(state))
    refused(runner.invoke(app, ["sample", "--run", str(copy), "--out", str(tmp_path / "s"), "--per-class", "1",
                                *FAST]), "ema.safetensors: weights do not fit the model", "holds torch.int32")


@pytest.mark.parametrize("damage, name", [
    (lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:100]), "optimizer.pt"),
    (lambda c: (c / "optimizer.pt").write_bytes(os.urandom(4000)), "optimizer.pt"),
    (lambda c: (c / "optimizer.pt").write_bytes(b""), "optimizer.pt"),
    (lambda c: (c / "optimizer.pt").write_bytes(b"hello world"), "optimizer.pt"),
    (lambda c: torch.save(torch.zeros(3), c / "optimizer.pt"), "optimizer.pt"),
    (lambda c: torch.save([1, 2], c / "optimizer.pt"), "optimizer.pt"),
    (lambda c: torch.save({"state": {}, "param_groups": [{"params": [0]}]}, c / "optimizer.pt"), "optimizer.pt"),
    (lambda c: (c / "state.json").write_text("{not json"), "state.json"),
    (lambda c: (c / "state.json").write_text('{"step": 2, "files": [1, 2]}'), "state.json: corrupt"),
    (lambda c: (c / "state.json").write_text('{"step": 2, "elapsed_s": 1.0}'), "state.json: missing, or holds no "
                                                                               "valid images_seen"),
    (lambda c: (c.parent.parent / "log.csv").write_bytes(b"\xff\xfe garbage\n1,2\n"), "log.csv"),
    (lambda c: (c.parent.parent / "config.yaml").unlink(), "config.yaml: missing"),
    (lambda c: (c.parent.parent / "config.yaml").write_text(""), "config.yaml: empty"),
])
def test_resume_from_damaged_files_names_the_file(run: Path, data: Path, tmp_path: Path, damage, name: str) -> None:
    """Also where no hash was recorded to catch the damage first (torch's own reader sees the file)."""
    copy = copy_run(run, tmp_path)
    ckpt = copy / "checkpoints" / "step_0000002"
    damage(ckpt)
    state = json.loads((ckpt / "state.json").read_text()) if "state.json" not in name else None
    if state is not None:
        state.pop("files")
        (ckpt / "state.json").write_text(json.dumps(state))
    refused(runner.invoke(app, ["train", "--data", str(data), "--out", str(copy), "--max-steps", "3", "--resume",
                                "--checkpoint-every", "1", *TINY]), name)


class Payload:
    """Stands for a crafted object: unpickling it would run its module's code."""


def test_an_optimizer_state_that_would_unpickle_code_is_refused_without_advice_to(run: Path, data: Path,
                                                                                  tmp_path: Path) -> None:
    """With no recorded hash to catch it, torch's own message would suggest weights_only=False: never passed on."""
    copy = copy_run(run, tmp_path)
    ckpt = copy / "checkpoints" / "step_0000002"
    torch.save({"state": Payload()}, ckpt / "optimizer.pt")
    state = json.loads((ckpt / "state.json").read_text())
    state.pop("files")
    (ckpt / "state.json").write_text(json.dumps(state))
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(copy), "--max-steps", "3", "--resume", *TINY])
    refused(res, "optimizer.pt: corrupt or not an optimizer state written by geca", "Payload")
    assert "weights_only" not in res.output


def test_stale_staging_folders_are_cleaned_on_the_next_write(run: Path, data: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path)
    ckpts = copy / "checkpoints"
    dead = ckpts / ".step_0000003.partial-999999999-abc"  # a pid that cannot be running
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    old_style = ckpts / ".step_0000003.partial-xyz"  # geca ≤ this version named no pid
    old_style.mkdir()
    mine = ckpts / f".step_0000003.partial-{os.getpid()}-live"  # a live writer's folder is left alone
    mine.mkdir()
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(copy), "--max-steps", "3", "--resume",
                              "--checkpoint-every", "1", *TINY])
    assert res.exit_code == 0, res.output
    assert not dead.exists() and not old_style.exists() and mine.exists()
    assert (ckpts / "step_0000003" / "model.safetensors").is_file()


def test_a_killed_writers_temporaries_are_cleaned_on_the_next_write(tmp_path: Path) -> None:
    from geca.utils.io import atomic_write_text

    dead = tmp_path / ".ev.json.999999999-k1ll3d00.tmp"  # a pid that cannot be running
    old_style = tmp_path / ".ev.json.ab_c1234.tmp"  # geca ≤ this version named no pid
    live = tmp_path / f".ev.json.{os.getpid()}-wr1t1ng0.tmp"
    other = tmp_path / ".ev.json.old.999999999-k1ll3d00.tmp"  # another file's, ev.json.old
    for p in (dead, old_style, live, other):
        p.write_text("half")
    atomic_write_text(tmp_path / "ev.json", "{}")
    assert (tmp_path / "ev.json").read_text() == "{}"
    assert not dead.exists() and not old_style.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ev.json", live.name, other.name])


def test_divergence_stops_before_a_checkpoint_and_says_where_the_last_good_one_is(data: Path, tmp_path: Path
                                                                                   ) -> None:
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(out), "--max-steps", "20", "--lr", "1e6",
                              "--checkpoint-every", "1", "--precision", "fp32", *TINY])
    refused(res, "diverged")
    assert "fp32" not in res.output.split("Try", 1)[1]
    latest = out / "checkpoints" / "latest.json"
    if latest.exists():  # every checkpoint it kept holds finite weights, and the message names the latest one
        step = json.loads(latest.read_text())["path"]
        assert step in res.output
        weights = load_file(out / "checkpoints" / step / "ema.safetensors")
        assert all(torch.isfinite(v).all() for v in weights.values())
    else:
        assert "no checkpoint was written" in res.output


@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "two-renames"])
def test_a_replaced_folder_is_whole_and_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             swap: bool) -> None:
    """The atomic swap (renameat2), and the two renames where a file system cannot swap."""
    from geca.utils import io

    if not swap:
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    final, new = tmp_path / "set", tmp_path / ".set.partial"
    final.mkdir()
    (final / "old.png").write_text("old")
    new.mkdir()
    (new / "new.png").write_text("new")
    io.replace_dir(new, final)
    assert [p.name for p in final.iterdir()] == ["new.png"] and sorted(p.name for p in tmp_path.iterdir()) == ["set"]
