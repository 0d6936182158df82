"""`geca evaluate` and `geca features train` end to end on tiny data, and their errors."""

from __future__ import annotations

import inspect
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import blob_images
from PIL import Image
from typer.testing import CliRunner

from geca.cli.evaluate import evaluate, features_app, features_train
from geca.sampling.generate import labels_csv

runner = CliRunner()
app = typer.Typer()  # the lead wires these into geca.cli.main; test them on their own
app.command("evaluate")(evaluate)
app.add_typer(features_app, name="features")
FAST = ["--features", "random", "--gg-features", "random", "--lpips-weights", "random"]
NAMES = ["class 0", "class 1"]  # what the npz loader calls the classes of an unknown MedMNIST-format file


def write_sample_dir(path: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> Path:
    """What `geca sample` writes: images/*.png, labels.csv and manifest.json."""
    (path / "images").mkdir(parents=True)
    names = []
    for i, img in enumerate(images):
        names.append(f"images/{i:06d}.png")
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path / names[-1])
    (path / "labels.csv").write_text(labels_csv(names, labels, class_names))
    (path / "manifest.json").write_text(json.dumps({"class_names": class_names, "multilabel": False}))
    return path


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    """A 2-class npz (120 test images, 60 per class) and two generated sets of 100 (50 per class)."""
    parts = {}
    for split, n, seed in (("train", 80, 0), ("val", 16, 1), ("test", 120, 2)):
        s = blob_images(n=n, size=12, seed=seed)
        parts[f"{split}_images"], parts[f"{split}_labels"] = s.images, s.labels.argmax(1)[:, None]
    np.savez(tmp_path / "blobs.npz", **parts)
    like = blob_images(n=100, size=12, seed=7)
    noise = np.random.default_rng(0).integers(0, 256, like.images.shape, dtype=np.uint8)
    return {"npz": tmp_path / "blobs.npz",
            "good": write_sample_dir(tmp_path / "good", like.images, like.labels, NAMES),
            "noise": write_sample_dir(tmp_path / "noise", noise, like.labels, NAMES)}


def test_every_option_has_help() -> None:
    for fn in (evaluate, features_train):
        for name, param in inspect.signature(fn).parameters.items():
            assert getattr(param.default, "help", None), f"{fn.__name__}: option {name} has no help text"


def test_evaluate_end_to_end(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "eval" / "metrics.json"
    npz = str(data["npz"])
    with pytest.warns(UserWarning, match="like: KID over subsets of 25 images is noisy"):
        res = runner.invoke(app, ["evaluate", "--generated", f"like={data['good']}", str(data["noise"]), "--real",
                                  f"{npz}:test", "--train", f"{npz}:train", "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    for text in ("KID×10³", "s.e.", "LPIPS", "GG", "FLD", "like", "noise", "per-class"):
        assert text in res.output
    report = json.loads(out.read_text())
    assert report["protocol"] == "paper" and report["features"]["name"] == "random"
    assert {k: report["real"][k] for k in ("spec", "split", "n")} == {"spec": npz, "split": "test", "n": 120}
    assert report["train"]["n"] == 80
    like, noise = report["results"]
    assert (like["name"], noise["name"]) == ("like", "noise")
    for r in (like, noise):
        assert set(r) >= {"name", "dir", "n", "kid", "kid_per_class", "lpips", "fld", "grid"}
        assert r["kid"]["subset_size"] == 25 and r["kid"]["subsets"] == 100  # n_generated // 4
        assert set(r["kid_per_class"]) == set(NAMES) and r["kid_per_class"]["class 0"]["subset_size"] == 12
        assert r["lpips"]["pairs"] == 99 and r["lpips"]["mean"] > 0
        assert set(r["fld"]) >= {"fld", "gg", "nll_train", "nll_test", "nll_baseline"}
        assert (out.parent / r["grid"]).stat().st_size > 0
    assert like["kid"]["mean"] < noise["kid"]["mean"]
    # The two sets differ by far more than another draw of either would move KID.
    assert noise["kid"]["mean"] - like["kid"]["mean"] > 5 * max(like["kid"]["se"], noise["kid"]["se"]) > 0
    for f in (like["faithfulness"], noise["faithfulness"], report["real"]["faithfulness"]):
        assert f["metric"] == "accuracy" and 0 <= f["value"] <= 1 and set(f["per_class"]) <= set(NAMES)
    assert "faithful" in res.output
    assert like["faithfulness"]["value"] > 0.95 and report["real"]["faithfulness"]["value"] > 0.95
    assert abs(noise["faithfulness"]["value"] - noise["faithfulness"]["chance"]) < 0.1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = runner.invoke(app, ["evaluate", "--generated", str(data["good"]), "--real", f"{npz}:test", "--train",
                                  f"{npz}:train", "--out", str(tmp_path / "std.json"), "--protocol", "standard",
                                  "--no-lpips", *FAST])
    assert res.exit_code == 0, res.output
    assert not [w for w in caught if "KID over subsets" in str(w.message)]  # subsets of 100
    standard = json.loads((tmp_path / "std.json").read_text())["results"][0]
    assert standard["kid"]["subset_size"] == 100 and standard["lpips"] is None
    assert standard["kid_per_class"]["class 1"]["subset_size"] == 50


def test_evaluate_errors(data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npz = str(data["npz"])
    base = ["evaluate", "--train", f"{npz}:train", "--out", str(tmp_path / "m.json"), "--features", "random",
            "--gg-features", "random"]
    other = blob_images(n=4, size=12, classes=3)
    wrong = write_sample_dir(tmp_path / "wrong", other.images, other.labels, [*NAMES, "class 2"])
    like = blob_images(n=100, size=12, seed=7)
    like.labels[3] = 0  # an image of no class
    unlabelled = write_sample_dir(tmp_path / "unlabelled", like.images, like.labels, NAMES)
    listed = shutil.copytree(data["good"], tmp_path / "listed")
    (listed / "manifest.json").write_text("[1]")
    cut = shutil.copytree(data["good"], tmp_path / "cut")  # a labels.csv cut at a line boundary still parses
    rows = (cut / "labels.csv").read_text().splitlines(keepends=True)
    (cut / "labels.csv").write_text("".join(rows[:51]))
    (cut / "manifest.json").write_text(json.dumps({"class_names": NAMES, "num_images": len(rows) - 1}))
    cases = {
        "cut/labels.csv: 50 rows, but its manifest.json records 100 images": [
            "--generated", str(cut), "--real", f"{npz}:test", "--no-lpips"],
        "listed/manifest.json: corrupt, a JSON list": ["--generated", str(listed), "--real", f"{npz}:test",
                                                       "--no-lpips"],
        "every one of its 80 images is in --train": ["--generated", str(data["good"]), "--real",
                                                     f"{tmp_path}/../{tmp_path.name}/blobs.npz:train", "--no-lpips"],
        "give the same grid file name": ["--generated", f"x y={data['good']}", f"x_y={data['noise']}", "--real",
                                         f"{npz}:test", "--no-lpips"],
        "['Like', 'like'] give the same grid file name": ["--generated", f"Like={data['good']}",
                                                          f"like={data['noise']}", "--real", f"{npz}:test",
                                                          "--no-lpips"],
        "image images/000003.png has 0 labels; the real data is multi-class": [
            "--generated", str(unlabelled), "--real", f"{npz}:test", "--no-lpips"],
        "differ from real classes": ["--generated", str(wrong), "--real", f"{npz}:test", "--no-lpips"],
        "expected SPEC:SPLIT": ["--generated", str(data["good"]), "--real", npz, "--no-lpips"],
        "not found": ["--generated", str(tmp_path / "missing"), "--real", f"{npz}:test", "--no-lpips"],
        "--protocol must be one of paper, standard, got 'foo'": ["--generated", str(data["good"]), "--real",
                                                                 f"{npz}:test", "--protocol", "foo"],
        "--gg-features must be one of domain, inception, dinov2, random, got 'foo'": [
            "--generated", str(data["good"]), "--real", f"{npz}:test", "--gg-features", "foo"],
        "--train is the split the generator trained on": ["--generated", str(data["good"]), "--real", f"{npz}:train",
                                                          "--no-lpips"],
        "alexnet-owt-7be5be79.pth": ["--generated", str(data["good"]), "--real", f"{npz}:test"],
        f"{tmp_path}: a folder; give the .safetensors file": ["--generated", str(data["good"]), "--real",
                                                              f"{npz}:test", "--features", "domain",
                                                              "--features-file", str(tmp_path)],
        f"--features-file {tmp_path}: a folder; give the Inception-v3 (FID) weights file itself": [
            "--generated", str(data["good"]), "--real", f"{npz}:test", "--features", "inception", "--features-file",
            str(tmp_path)],
    }
    monkeypatch.delenv("GECA_WEIGHTS_DIR", raising=False)
    for message, args in cases.items():
        res = runner.invoke(app, [*base, *args])
        assert res.exit_code == 2, (message, res.output)
        assert "error:" in res.output and message in res.output
    assert not (tmp_path / "m.json").exists()


def test_an_existing_report_is_replaced_only_with_overwrite(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    npz = str(data["npz"])
    args = ["evaluate", "--real", f"{npz}:test", "--train", f"{npz}:train", "--out", str(out), "--no-lpips",
            "--protocol", "standard", "--features", "random", "--gg-features", "random"]
    res = runner.invoke(app, [*args, "--generated", f"like={data['good']}", str(data["noise"])])
    assert res.exit_code == 0, res.output
    first = out.read_text()
    assert {p.name for p in tmp_path.glob("m_grid_*.png")} == {"m_grid_like.png", "m_grid_noise.png"}
    # without --overwrite the earlier report stays as it was
    res = runner.invoke(app, [*args, "--generated", f"like={data['good']}"])
    assert res.exit_code == 2 and "exists" in res.output and "--overwrite" in res.output, res.output
    assert out.read_text() == first
    photo = tmp_path / "r_grid_like.png"  # where a new report r.json would draw the grid of `like`
    photo.write_bytes(b"mine")
    res = runner.invoke(app, [str(tmp_path / "r.json") if a == str(out) else a for a in args] +
                        ["--generated", f"like={data['good']}"])
    assert res.exit_code == 2 and f"the grid of like would replace {photo}" in res.output, res.output
    assert photo.read_bytes() == b"mine" and not (tmp_path / "r.json").exists()
    spec = tmp_path / "model.json"  # --overwrite replaces an earlier report, not any JSON file
    spec.write_text('{"model": "GeCA-T"}')
    res = runner.invoke(app, [*args, "--generated", f"like={data['good']}", "--overwrite", "--out", str(spec)])
    assert res.exit_code == 2 and "exists and is not an earlier `geca evaluate` report" in res.output, res.output
    assert spec.read_text() == '{"model": "GeCA-T"}'
    # a rerun that fails leaves the earlier report and its grids
    other = blob_images(n=4, size=12, classes=3)
    wrong = write_sample_dir(tmp_path / "wrong", other.images, other.labels, [*NAMES, "class 2"])
    res = runner.invoke(app, [*args, "--overwrite", "--generated", str(data["good"]), str(wrong)])
    assert res.exit_code == 2 and "differ from real classes" in res.output, res.output
    assert out.read_text() == first and (tmp_path / "m_grid_noise.png").exists()
    # replacing it removes the grid of the set the new report no longer lists, and nothing else
    keep = tmp_path / "m_grid_mine.png"
    keep.write_bytes(b"the user's own file")
    res = runner.invoke(app, [*args, "--overwrite", "--generated", f"like={data['good']}"])
    assert res.exit_code == 0, res.output
    assert [r["name"] for r in json.loads(out.read_text())["results"]] == ["like"]
    assert {p.name for p in tmp_path.glob("m_grid_*.png")} == {"m_grid_like.png", "m_grid_mine.png"}


def test_gg_and_fld_use_dinov2_under_the_paper_protocol(data: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GECA_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("GECA_CACHE_DIR", str(tmp_path / "cache"))
    npz = str(data["npz"])
    args = ["evaluate", "--generated", str(data["good"]), "--real", f"{npz}:test", "--train", f"{npz}:train",
            "--no-lpips", "--features", "random"]
    # The paper computes GG/FLD on DINOv2: without its weights the default fails before any work, naming them.
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "paper.json")])
    assert res.exit_code == 2 and "dinov2_vitb14_pretrain.pth" in res.output and "--gg-features-file" in res.output
    assert not (tmp_path / "paper.json").exists()
    # Under the standard protocol GG/FLD share the KID network; both are recorded.
    res = runner.invoke(app, [*args, "--protocol", "standard", "--out", str(tmp_path / "std.json")])
    assert res.exit_code == 0, res.output
    std = json.loads((tmp_path / "std.json").read_text())
    assert std["features"]["name"] == std["gg_features"]["name"] == "random"
    # A GG network of its own gives other GG/FLD values and the same KID.
    res = runner.invoke(app, [*args, "--protocol", "standard", "--gg-features", "domain", "--out",
                              str(tmp_path / "dom.json")])
    assert res.exit_code == 0, res.output
    dom = json.loads((tmp_path / "dom.json").read_text())
    assert dom["gg_features"]["name"] == "domain" and dom["features"]["name"] == "random"
    assert dom["results"][0]["kid"] == std["results"][0]["kid"]
    assert dom["results"][0]["fld"]["gg"] != std["results"][0]["fld"]["gg"]
    assert "GG and FLD on domain" in " ".join(res.output.split())


def test_evaluate_refuses_a_crafted_inception_file(data: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    crafted = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _Touch(marker)}, crafted)  # torch.load(weights_only=False) runs it
    npz = str(data["npz"])
    res = runner.invoke(app, ["evaluate", "--generated", str(data["good"]), "--real", f"{npz}:test", "--train",
                              f"{npz}:train", "--out", str(tmp_path / "m.json"), "--features", "inception",
                              "--features-file", str(crafted), "--gg-features", "random", "--no-lpips"])
    assert res.exit_code == 2 and "error:" in res.output and "weights-inception" in res.output, res.output
    assert not marker.exists() and not (tmp_path / "m.json").exists()


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_domain_features_trained_once_cached_or_from_a_file(data: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GECA_CACHE_DIR", str(tmp_path / "cache"))
    npz = str(data["npz"])
    args = ["evaluate", "--generated", str(data["good"]), "--real", f"{npz}:test", "--train", f"{npz}:train",
            "--no-lpips", "--gg-features", "domain"]
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "a.json")])
    assert first.exit_code == 0, first.output
    assert "training on" in first.output
    second = runner.invoke(app, [*args, "--out", str(tmp_path / "b.json")])
    assert "cached network" in second.output
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["results"][0]["kid"] == b["results"][0]["kid"]
    assert Path(a["features"]["source"]).parent == tmp_path / "cache" / "features"

    res = runner.invoke(app, ["features", "train", "--data", npz, "--out", str(tmp_path / "dom.safetensors"),
                              "--epochs", "3"])
    assert res.exit_code == 0, res.output
    assert "val accuracy" in res.output
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "c.json"), "--features-file",
                              str(tmp_path / "dom.safetensors")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c.json").read_text())["features"]["source"] == str(tmp_path / "dom.safetensors")


def test_features_trained_on_the_held_out_images_are_flagged(data: dict[str, Path], tmp_path: Path) -> None:
    npz = str(data["npz"])
    files = {}
    for split, size in (("train", None), ("test", None), ("test", 16)):  # an npz has no split `all`
        key = split if size is None else f"{split}{size}"
        files[key] = tmp_path / f"{key}.safetensors"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = runner.invoke(app, ["features", "train", "--data", npz, "--split", split, "--out", str(files[key]),
                                      "--epochs", "1", *([] if size is None else ["--image-size", str(size)])])
        assert res.exit_code == 0, res.output
        held_out = [w for w in caught if "held-out images" in str(w.message)]
        assert bool(held_out) == (split != "train"), (split, [str(w.message) for w in caught])
    # test16 saw the test images at 16 px: they are compared at that size, not at the generated 12 px
    for split, shared in (("train", 0), ("test", 120), ("test16", 120)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = runner.invoke(app, ["evaluate", "--generated", str(data["good"]), "--real", f"{npz}:test",
                                      "--train", f"{npz}:train", "--no-lpips", "--protocol", "standard",
                                      "--features", "domain", "--features-file", str(files[split]),
                                      "--out", str(tmp_path / f"{split}.json")])
        assert res.exit_code == 0, res.output
        flagged = [str(w.message) for w in caught if "were trained on" in str(w.message)]
        assert flagged == ([f"{files[split]}: the domain features were trained on {shared} of the 120 --real "
                            f"images ({npz}:test); KID, FLD/GG and class-faithfulness against them are "
                            "optimistic. Train them on the generator's training split (`geca features train "
                            "--split train`)"] if shared else []), split


def test_the_held_out_check_never_stops_an_evaluation(data: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from geca.data.registry import load_split
    from geca.metrics.domain import load_domain_net, save_domain_net

    monkeypatch.setenv("GECA_CACHE_DIR", str(tmp_path / "cache"))
    # features that saw the test images at 20 px, a spec that fixes its own size of 16: not comparable, a warning
    spec = "synthetic-fundus@n=40,size=16"
    res = runner.invoke(app, ["features", "train", "--data", "synthetic-fundus@n=40", "--split", "test",
                              "--image-size", "20", "--epochs", "1", "--out", str(tmp_path / "f20.safetensors")])
    assert res.exit_code == 0, res.output
    val = load_split(spec, "val")
    gen = write_sample_dir(tmp_path / "gen", val.images, val.labels, val.class_names)
    args = ["evaluate", "--generated", str(gen), "--real", f"{spec}:test", "--train", f"{spec}:train", "--no-lpips",
            "--protocol", "standard", "--gg-features", "random", "--features", "domain"]
    with pytest.warns(UserWarning, match="its training images were 20 px; --real could not be loaded at that size"):
        res = runner.invoke(app, [*args, "--features-file", str(tmp_path / "f20.safetensors"), "--out",
                                  str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    # a file from before fingerprints says it cannot be checked
    old = load_domain_net(tmp_path / "f20.safetensors")
    old.trained_on = None
    save_domain_net(old, tmp_path / "old.safetensors")
    res = runner.invoke(app, [*args, "--features-file", str(tmp_path / "old.safetensors"), "--out",
                              str(tmp_path / "b.json")])
    assert res.exit_code == 0 and "written before domain features recorded their training images" in \
        " ".join(res.output.split()), res.output
    # images shared by --real and --train are said once: the network trained here on --train is not asked again
    parts = dict(np.load(data["npz"]))
    parts["test_images"][:5] = parts["train_images"][:5]
    np.savez(tmp_path / "dup.npz", **parts)
    dup = str(tmp_path / "dup.npz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = runner.invoke(app, ["evaluate", "--generated", str(data["good"]), "--real", f"{dup}:test", "--train",
                                  f"{dup}:train", "--no-lpips", "--protocol", "standard", "--features", "domain",
                                  "--gg-features", "random", "--out", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    said = [str(w.message) for w in caught if "images are also in --train" in str(w.message)
            or "were trained on" in str(w.message)]
    assert len(said) == 1 and "5 of its 120 images are also in --train" in said[0], said


def test_evaluate_takes_its_splits_from_a_folds_file(tmp_path: Path) -> None:
    from geca.cli.folds import folds
    from geca.data.registry import load_split

    spec = "synthetic-oct@patients=20,size=16"
    folds_csv = tmp_path / "folds.csv"
    fapp = typer.Typer()
    fapp.command()(folds)
    assert runner.invoke(fapp, ["--data", spec, "--k", "4", "--out", str(folds_csv)]).exit_code == 0
    test = load_split(spec, "test", folds_file=folds_csv, fold=1)
    train = load_split(spec, "train", folds_file=folds_csv, fold=1)
    gen = write_sample_dir(tmp_path / "gen", test.images, test.labels, test.class_names)
    (gen / "manifest.json").write_text(json.dumps({"class_names": test.class_names, "multilabel": True}))
    out = tmp_path / "m.json"
    res = runner.invoke(app, ["evaluate", "--generated", str(gen), "--real", f"{spec}:test", "--train",
                              f"{spec}:train", "--folds-file", str(folds_csv), "--fold", "1", "--no-lpips",
                              "--features", "random", "--gg-features", "random", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["real"]["n"] == len(test) and report["train"]["n"] == len(train)
    assert len(test) < len(load_split(spec, "all"))


def test_features_train_names_a_bad_split_and_warns_only_of_one_it_trains_on(data: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    out = str(tmp_path / "f.safetensors")
    res = runner.invoke(app, ["features", "train", "--data", str(data["npz"]), "--split", "foo", "--out", out])
    assert res.exit_code == 2 and "error: --split must be one of train, val, test, all, got 'foo'" in res.output
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an npz has no split `all`: refused, with no warning about training on it
        res = runner.invoke(app, ["features", "train", "--data", str(data["npz"]), "--split", "all", "--out", out])
    assert res.exit_code == 2 and "has no split 'all'" in res.output, res.output
    assert not Path(out).exists()


def test_an_interrupted_evaluation_leaves_no_grid_and_can_be_rerun(data: dict[str, Path], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Grids are put in place with the report: one drawn before an interruption would later be taken for a file
    no report wrote, and block the rerun."""
    out = tmp_path / "m.json"
    npz = str(data["npz"])
    args = ["evaluate", "--real", f"{npz}:test", "--train", f"{npz}:train", "--out", str(out), "--no-lpips",
            "--protocol", "standard", "--features", "random", "--gg-features", "random", "--generated",
            f"like={data['good']}"]

    def interrupted(path: Path, obj: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("geca.metrics.evaluate.atomic_write_json", interrupted)
        assert runner.invoke(app, args).exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".png", ".json", ".tmp")) == []
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m_grid_like.png").is_file() and not list(tmp_path.glob(".*.tmp"))


def _warnings_of(settings: object) -> list[str]:
    from geca.metrics.evaluate import load_inputs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_inputs(settings)  # type: ignore[arg-type]
    return [str(w.message) for w in caught]


def test_unlike_comparisons_are_warned_before_scoring(data: dict[str, Path], tmp_path: Path) -> None:
    from geca.data.registry import source_key
    from geca.metrics.evaluate import EvalSettings

    npz = str(data["npz"])

    def settings(*dirs: Path, protocol: str = "paper") -> EvalSettings:
        return EvalSettings(generated=[(d.name, d) for d in dirs], real=f"{npz}:test", train=f"{npz}:train",
                            protocol=protocol)

    assert _warnings_of(settings(data["good"], data["noise"])) == []  # like with like: nothing to say

    big = blob_images(n=100, size=16, seed=3)  # another tool's set at 16 px, the real data 12 px
    big_dir = write_sample_dir(tmp_path / "big", big.images, big.labels, NAMES)
    upsampled = _warnings_of(settings(big_dir))
    assert any("--real" in w and "12 px, upsampled to the generated 16 px, and big did not" in w for w in upsampled)
    assert any("--train" in w and "upsampled" in w for w in upsampled)
    same = {"data": npz, "data_key": source_key(npz), "folds_file": None, "fold": None}
    (big_dir / "manifest.json").write_text(json.dumps({"class_names": NAMES, "trained_on": same}))
    assert _warnings_of(settings(big_dir)) == []  # its generator learned the data upsampled so

    fewer = blob_images(n=80, size=12, seed=4)
    fewer_dir = write_sample_dir(tmp_path / "fewer", fewer.images, fewer.labels, NAMES)
    assert any("good: 100, fewer: 80" in w for w in _warnings_of(settings(data["good"], fewer_dir)))
    assert _warnings_of(settings(data["good"], fewer_dir, protocol="standard")) == []

    manifest = data["good"] / "manifest.json"
    record = json.loads(manifest.read_text())
    for trained_on, expected in (
            (same, None),
            ({"data": "elsewhere.npz", "data_key": "npz:0123", "folds_file": None, "fold": None},
             "trained on elsewhere.npz (its manifest.json), not on --train"),
            ({"data": npz, "data_key": source_key(npz), "folds_file": "folds.csv", "fold": 1},
             "train split of fold 1 of folds.csv (its manifest.json), but --train")):
        manifest.write_text(json.dumps({**record, "trained_on": trained_on}))
        said = _warnings_of(settings(data["good"]))
        assert said == [] if expected is None else any(expected in w for w in said), said
    said = _warnings_of(EvalSettings(generated=[("good", data["good"])], real=f"{npz}:test", train=f"{npz}:val"))
    assert any("--train " + f"{npz}:val is the val split" in w for w in said), said


def test_a_domain_file_of_other_classes_is_not_the_judge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its features may serve KID, but its class head would score each image against another list of classes."""
    from geca.metrics.domain import train_domain_net
    from geca.metrics.faithfulness import judge
    from geca.metrics.features import DomainFeatures

    monkeypatch.setenv("GECA_CACHE_DIR", str(tmp_path / "cache"))
    train = blob_images(n=24, size=12, classes=2)
    for classes, reused in ((2, True), (3, False)):
        net = train_domain_net(blob_images(n=24, size=12, classes=classes), epochs=1)
        said: list[str] = []
        chosen = judge(DomainFeatures(net, "domain", "dom.safetensors"), train, 0, said.append, "cpu")
        assert (chosen is net) is reused
        assert chosen.meta.class_names == train.class_names
        assert reused or "dom.safetensors: its classes (['c0', 'c1', 'c2']) are not the data's" in said[0], said


def test_a_wrong_published_weights_file_is_refused_before_any_training(data: dict[str, Path], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Domain features train for minutes on a large --train split: an AlexNet or Inception file that is not the
    published one is found first."""
    monkeypatch.setenv("GECA_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached: domain features would train
    npz = str(data["npz"])
    base = ["evaluate", "--generated", str(data["good"]), "--real", f"{npz}:test", "--train", f"{npz}:train",
            "--out", str(tmp_path / "m.json"), "--gg-features", "domain"]
    for name, flags in (("alexnet-owt-7be5be79.pth", ["--lpips-weights"]),
                        ("weights-inception-2015-12-05-6726825d.pth", ["--no-lpips", "--gg-features", "inception",
                                                                       "--gg-features-file"])):
        junk = tmp_path / name
        junk.write_bytes(b"not the published file")
        res = runner.invoke(app, [*base, *flags, str(junk)])
        assert res.exit_code == 2 and f"error: {junk}: SHA-256" in res.output, res.output
        assert "training on" not in res.output and not (tmp_path / "cache").exists()


def test_copies_of_a_multi_label_split_are_scored_as_multi_label_when_told(tmp_path: Path) -> None:
    """All-one-hot rows of multi-label data read as multi-class: a multi-hot generated row was then refused."""
    from geca.errors import DataError
    from geca.metrics.evaluate import EvalSettings, load_inputs
    from geca.sampling.generate import write_images

    rng = np.random.default_rng(0)
    one_hot = np.eye(2, dtype=np.float32)[[0, 1] * 20]
    for split in ("test", "train"):
        write_images(tmp_path / split, rng.integers(0, 256, (40, 12, 12, 1), dtype=np.uint8), one_hot, NAMES)
    hot = one_hot.copy()
    hot[0] = 1
    gen = write_sample_dir(tmp_path / "gen", rng.integers(0, 256, (40, 12, 12, 1), dtype=np.uint8), hot, NAMES)
    settings = EvalSettings([("g", gen)], f"{tmp_path / 'test' / 'labels.csv'}:all",
                            f"{tmp_path / 'train' / 'labels.csv'}:all")
    with pytest.raises(DataError, match="has 2 labels; the real data is multi-class"):
        load_inputs(settings)
    settings.multilabel = True
    inputs = load_inputs(settings)
    assert inputs.real.multilabel and inputs.train.multilabel
    hot = one_hot.copy()
    hot[5] = 1  # a multi-hot row in --train
    write_images(tmp_path / "train", rng.integers(0, 256, (40, 12, 12, 1), dtype=np.uint8), hot, NAMES)
    settings.multilabel = False
    with pytest.raises(DataError, match="--multiclass: .*train/labels.csv:all: images/000005.png has 2 labels"):
        load_inputs(settings)
