"""Downstream classification (Table 2): metrics against scikit-learn, significance, expansion, the CLI end to end."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import blob_images
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    multilabel_confusion_matrix,
    recall_score,
    roc_auc_score,
)
from torchvision.models import resnet34
from typer.testing import CliRunner

from geca.cli.downstream import classify, expand
from geca.cli.folds import folds
from geca.cli.sample import sample
from geca.cli.train import train
from geca.data.procedural import OCT_CLASSES
from geca.downstream.classifier import build_resnet34, geometric_augment
from geca.downstream.metrics import binary_ap, binary_auc, eye_level, macro_metric, score
from geca.downstream.protocol import ProtocolResult, UnitResult
from geca.downstream.report import markdown, summarise
from geca.downstream.significance import paired_bootstrap, paired_test, stars
from geca.errors import ConfigError, DataError
from geca.sampling.labels import replicate_labels

runner = CliRunner()
app = typer.Typer(pretty_exceptions_enable=False)
for name, command in (("train", train), ("folds", folds), ("expand", expand), ("classify", classify),
                      ("sample", sample)):
    app.command(name)(command)

TINY_TRAIN = ["--model", "GeCA-T", "--nca-steps", "1", "--max-steps", "1", "--batch-size", "4", "--sample-every", "0",
              "--no-progress"]
FAST_SAMPLING = ["--sampler", "ddim", "--steps", "2", "--no-progress"]
# One thread: tiny convolutions on a busy 2-core machine run several times faster than with two.
TINY_CLASSIFY = ["--epochs", "1", "--batch-size", "4", "--bootstrap", "100", "--threads", "1", "--no-progress"]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def _restore_threads():
    """`geca classify --threads` sets torch's thread count for the process; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------- metrics

def _specificity(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    cm = multilabel_confusion_matrix(y, pred)  # (K, 2, 2): [[tn, fp], [fn, tp]]
    return cm[:, 0, 0] / (cm[:, 0, 0] + cm[:, 0, 1])


def test_multiclass_metrics_match_sklearn() -> None:
    truth = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    probs = np.array([[.7, .2, .1], [.4, .5, .1], [.6, .1, .3], [.2, .7, .1], [.5, .3, .2], [.1, .8, .1],
                      [.1, .2, .7], [.3, .3, .4], [.2, .5, .3], [.1, .1, .8]])
    s = score(np.eye(3)[truth], probs, multilabel=False)
    pred = probs.argmax(1)
    m = s["macro"]
    assert m["acc"] == pytest.approx(accuracy_score(truth, pred))
    assert m["sen"] == pytest.approx(recall_score(truth, pred, average="macro"))
    assert m["f1"] == pytest.approx(f1_score(truth, pred, average="macro"))
    # MedMNIST's getAUC for multi-class: mean one-vs-rest AUC of the softmax scores.
    assert m["auc"] == pytest.approx(roc_auc_score(truth, probs, multi_class="ovr", average="macro"))
    assert m["map"] == pytest.approx(np.mean([average_precision_score(truth == k, probs[:, k]) for k in range(3)]))
    spe = _specificity(np.eye(3)[truth], np.eye(3)[pred])
    np.testing.assert_allclose(s["per_class"]["spe"], spe)
    sen = recall_score(truth, pred, average=None)
    np.testing.assert_allclose(s["per_class"]["f1_sen_spe"], 2 * sen * spe / (sen + spe))


def test_multilabel_metrics_match_sklearn_with_ties() -> None:
    y = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0], [1, 1, 1], [0, 0, 0],
                  [1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    probs = np.array([[.9, .1, .6], [.2, .8, .5], [.5, .4, .2], [.1, .2, .9], [.6, .6, .1], [.3, .7, .4],
                      [.8, .5, .5], [.2, .1, .3], [.5, .3, .7], [.4, .9, .2], [.3, .2, .4], [.5, .2, .1]])
    s = score(y, probs, multilabel=True)
    pred = (probs >= 0.5).astype(int)
    pc = s["per_class"]
    np.testing.assert_allclose(pc["sen"], recall_score(y, pred, average=None))
    np.testing.assert_allclose(pc["spe"], _specificity(y, pred))
    np.testing.assert_allclose(pc["f1"], f1_score(y, pred, average=None))
    np.testing.assert_allclose(pc["auc"], roc_auc_score(y, probs, average=None))
    np.testing.assert_allclose(pc["ap"], average_precision_score(y, probs, average=None))
    assert s["macro"]["map"] == pytest.approx(average_precision_score(y, probs, average="macro"))
    assert s["macro"]["auc"] == pytest.approx(roc_auc_score(y, probs, average="macro"))
    assert "acc" not in s["macro"]
    for name in ("sen", "spe", "auc", "f1", "f1_sen_spe", "map"):
        assert macro_metric(y, probs, True, name) == pytest.approx(s["macro"][name])


def test_fast_auc_and_ap_equal_sklearn_on_random_tied_scores() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(4, 40))
        y = rng.integers(0, 2, n).astype(bool)
        y[:2] = [True, False]
        p = np.round(rng.random(n), 1)  # many ties
        for labels in (y, y.astype(np.int64), y.astype(np.float32)):  # as labels.csv's 0/1 columns are read
            assert binary_auc(labels, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
            assert binary_ap(labels, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_f1_sen_spe_is_the_macro_of_per_class_harmonic_means() -> None:
    # Class 0: sen 1/2, spe 1 → 2/3. Class 1: never predicted → sen 0 → 0 (not NaN).
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
    probs = np.array([[.9, .1], [.1, .1], [.2, .3], [.1, .2]])
    s = score(y, probs, multilabel=True)
    np.testing.assert_allclose(s["per_class"]["f1_sen_spe"], [2 / 3, 0.0])
    assert s["macro"]["f1_sen_spe"] == pytest.approx(1 / 3)
    # The harmonic mean of the macro sen and spe would be another number: the paper's F1_sen/spe is not that.
    assert s["macro"]["f1_sen_spe"] != pytest.approx(2 * s["macro"]["sen"] * s["macro"]["spe"] /
                                                     (s["macro"]["sen"] + s["macro"]["spe"]))


def test_a_class_without_positives_is_left_out_of_the_macro_mean() -> None:
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    probs = np.array([[.8, .6], [.3, .1], [.4, .2], [.1, .3]])
    s = score(y, probs, multilabel=True)
    assert np.isnan(s["per_class"]["sen"][1]) and np.isnan(s["per_class"]["auc"][1])
    assert s["macro"]["sen"] == pytest.approx(0.5) and s["macro"]["auc"] == pytest.approx(1.0)
    assert s["per_class"]["spe"][1] == pytest.approx(0.75)  # one false positive among four negatives
    with pytest.raises(DataError, match="NaN"):
        score(y, np.full((4, 2), np.nan), multilabel=True)


@pytest.mark.parametrize("how", ["max", "mean"])
def test_eye_level_scores_aggregate_each_eyes_scans(how: str) -> None:
    eyes = np.array(["b", "a", "b", "c", "a", "c", "c"])
    y = np.array([[0, 1], [1, 0], [1, 1], [0, 0], [0, 0], [0, 1], [0, 0]])
    probs = np.array([[.2, .9], [.7, .1], [.6, .3], [.1, .2], [.3, .4], [.4, .8], [.2, .1]])
    agg, labels = eye_level(probs, y, eyes, multilabel=True, how=how)
    reduce = np.max if how == "max" else np.mean
    expect = np.array([reduce(probs[eyes == e], axis=0) for e in ("a", "b", "c")])
    np.testing.assert_allclose(agg, expect)
    np.testing.assert_array_equal(labels, [[1, 0], [1, 1], [0, 1]])  # labels OR-ed per eye
    s = score(labels, agg, multilabel=True)
    np.testing.assert_allclose(s["per_class"]["auc"], roc_auc_score(labels, agg, average=None))
    np.testing.assert_allclose(s["per_class"]["sen"], recall_score(labels, (agg >= .5).astype(int), average=None))


def test_eye_level_multiclass_needs_one_class_per_eye() -> None:
    probs = np.array([[.7, .3], [.4, .6], [.2, .8]])
    agg, labels = eye_level(probs, np.eye(2)[[0, 0, 1]], np.array(["a", "a", "b"]), multilabel=False, how="mean")
    np.testing.assert_allclose(agg, [[.55, .45], [.2, .8]])
    with pytest.raises(DataError, match="eye 'a' has scans of different classes"):
        eye_level(probs, np.eye(2)[[0, 1, 1]], np.array(["a", "a", "b"]), multilabel=False)
    # after training, such an eye drops the eye level with a warning: the scan-level scores are kept
    rng = np.random.default_rng(0)
    y = np.eye(2)[rng.integers(0, 2, 40)]
    eyes = np.repeat(np.arange(20).astype(str), 2)
    units = [UnitResult(arm, None, 0, 1, 0.5, 0.0, 40, 0, y, rng.random(y.shape), eyes)
             for arm in ("geometric", "+syn")]
    with pytest.warns(UserWarning, match="eye '.*' has scans of different classes.*only scan level is reported"):
        summary = summarise(ProtocolResult("toy", units, ["a", "b"], False, "fixed split",
                                           [{"fold": None, "train": 10, "val": 5, "test": 40}]),
                            ["geometric", "+syn"], 1, "max", "auto", "auc", 50, {})
    assert summary["levels"] == ["scan"] and summary["bootstrap_resamples"] == "eyes"
    assert "Eye level" not in markdown(summary)


# ----------------------------------------------------------------------------------------------- significance

def test_stars_follow_the_papers_thresholds() -> None:
    assert [stars(p) for p in (0.2, 0.04, 0.009, 0.0009, 0.00009, float("nan"))] == \
        ["ns", "*", "**", "***", "****", "n/a"]


def test_paired_tests_on_constructed_units() -> None:
    rng = np.random.default_rng(1)
    base = 0.6 + 0.05 * rng.standard_normal(15)
    for test in ("ttest", "wilcoxon"):
        same = paired_test(base, base, test)
        assert same.p == 1.0 and same.stars == "ns" and same.n == 15
        noise = paired_test(base + 0.01 * rng.standard_normal(15), base, test)
        assert noise.p > 0.05
        better = paired_test(base + 0.05 + 0.005 * rng.standard_normal(15), base, test)
        assert better.p < 1e-4 and better.stars == "****" and better.mean_diff == pytest.approx(0.05, abs=0.01)
    # NaN units (a metric undefined on a fold) are dropped pairwise.
    assert paired_test([0.7, np.nan, 0.8], [0.6, 0.5, np.nan], "ttest").n == 1


def test_paired_bootstrap_over_test_cases() -> None:
    rng = np.random.default_rng(2)
    y = [np.eye(2)[rng.integers(0, 2, 200)] for _ in range(3)]  # three folds' test cases
    weak = [np.clip(f * 0.1 + rng.random(f.shape) * 0.9, 0, 1) for f in y]
    strong = [np.clip(f * 0.6 + rng.random(f.shape) * 0.4, 0, 1) for f in y]

    def auc(labels: np.ndarray, probs: np.ndarray) -> float:
        return macro_metric(labels, probs, True, "auc")

    same = paired_bootstrap(auc, y, weak, weak, n_boot=200)
    assert same.p == 1.0 and same.mean_diff == 0 and same.n == 600
    # D = Δ / sd(Δ*) (pROC's bootstrap test) is not floored at 1/n_boot: a large effect reaches the paper's p < 1e-4.
    better = paired_bootstrap(auc, y, strong, weak, n_boot=200)
    assert better.p < 1e-4 and better.mean_diff > 0.2 and better.stars == "****"
    slightly = paired_bootstrap(auc, y, [w + 0.002 * rng.random(w.shape) for w in weak], weak, n_boot=200)
    assert slightly.p > 0.05


def test_the_bootstrap_resamples_a_patient_whole() -> None:
    """40 eyes of 10 identical scans each: as scans the bootstrap sees 400 independent cases and finds a difference
    that 40 eyes do not support; resampled by eye it gives the p of the 40 eyes themselves."""
    rng = np.random.default_rng(5)
    y = np.eye(2)[rng.integers(0, 2, 40)]
    a, b = (np.clip(y * s + rng.random(y.shape) * (1 - s), 0, 1) for s in (0.15, 0.1))

    def auc(labels: np.ndarray, probs: np.ndarray) -> float:
        return macro_metric(labels, probs, True, "auc")

    eyes = paired_bootstrap(auc, [y], [a], [b], n_boot=300)
    copies = np.repeat(np.arange(40), 10)
    scans = paired_bootstrap(auc, [y[copies]], [a[copies]], [b[copies]], n_boot=300)
    whole = paired_bootstrap(auc, [y[copies]], [a[copies]], [b[copies]], n_boot=300, groups=[copies.astype(str)])
    assert scans.mean_diff == pytest.approx(eyes.mean_diff) == pytest.approx(whole.mean_diff)
    assert eyes.p > 0.3 and scans.p < 0.01 and (eyes.n, scans.n, whole.n) == (40, 400, 40)
    assert whole.p == pytest.approx(eyes.p, rel=0.35)
    with pytest.raises(ValueError, match="one group id per test case"):
        paired_bootstrap(auc, [y], [a], [b], groups=[copies])


def _unit(arm: str, fold: int, seed: int, labels: np.ndarray, probs: np.ndarray) -> UnitResult:
    return UnitResult(arm, fold, seed, 1, 0.5, 0.0, len(labels), 0, labels, probs, None)


def test_seeds_are_averaged_before_any_test() -> None:
    """Five folds × three seeds with the same gain in every fold: the fold test counts 5 units, not 15, and the
    table says over what it averaged and which test gave the stars."""
    rng = np.random.default_rng(3)
    results = []
    for fold in range(5):
        y = np.eye(2)[rng.integers(0, 2, 60)]
        for seed in range(3):
            noise = rng.random(y.shape)
            results += [_unit("geometric", fold, seed, y, 0.3 * y + 0.7 * noise),
                        _unit("+syn", fold, seed, y, 0.35 * y + 0.65 * noise)]
    protocol = ProtocolResult("toy", results, ["a", "b"], True, "patient-level 5-fold CV",
                              [{"fold": f, "train": 10, "val": 5, "test": 60} for f in range(5)])
    summary = summarise(protocol, ["geometric", "+syn"], 3, "max", "ttest", "auc", 200, {})
    folds = summary["arms"]["+syn"]["significance"]["scan"]["folds"]["auc"]
    assert folds["n"] == 5 and folds["test"] == "paired t-test" and summary["stars_from"] == "folds"
    assert summary["arms"]["+syn"]["summary"]["scan"]["auc"]["n"] == 5
    cases = summary["arms"]["+syn"]["significance"]["scan"]["cases"]["auc"]
    assert cases["n"] == 300 and cases["test"] == "paired bootstrap"
    text = markdown(summary)
    assert "over 5 folds, each fold's value the mean of its 3 seed(s)" in text
    assert "the stars come from p (folds)" in text and "| p (folds) | p (test cases) |" in text
    assert f"| {folds['stars']} ↑ ({folds['p']:.2g}) |" in text  # +syn gains in every fold: significantly above
    fixed = ProtocolResult("toy", [r for r in results if r.fold == 0], ["a", "b"], True, "fixed split",
                           [{"fold": None, "train": 10, "val": 5, "test": 60}])
    for r in fixed.results:
        r.fold = None
    with pytest.raises(ConfigError, match="seeds share their data"):
        summarise(fixed, ["geometric", "+syn"], 3, "max", "ttest", "auc", 200, {})
    one = summarise(fixed, ["geometric", "+syn"], 3, "max", "auto", "auc", 200, {})
    assert one["spread_over"] == "seeds" and one["tests"]["folds"] is None
    assert "over 3 seed(s) on the fixed split" in markdown(one)
    fold_2 = ProtocolResult("toy", [r for r in results if r.fold == 2], ["a", "b"], True, "patient-level 5-fold CV",
                            [{"fold": 2, "train": 10, "val": 5, "test": 60}])  # cross-validation run on one fold
    assert "over 3 seed(s) on fold 2" in markdown(summarise(fold_2, ["geometric", "+syn"], 3, "max", "auto", "auc",
                                                           200, {}))


# --------------------------------------------------------------------------------------------------- classifier

def test_imagenet_weights_load_from_a_local_file_and_fit_grey_input(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = resnet34(weights=None)
    path = tmp_path / "resnet34.pth"
    torch.save(reference.state_dict(), path)
    grey = build_resnet34(4, 1, "imagenet", path)
    torch.testing.assert_close(grey.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    torch.testing.assert_close(grey.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))
    assert grey.fc.out_features == 4
    from geca.errors import ConfigError

    with pytest.raises(ConfigError, match="missing.pth.*resnet34-b627a593.pth"):
        build_resnet34(4, 3, "imagenet", tmp_path / "missing.pth")


def test_geometric_augmentation_is_seeded_and_keeps_the_range() -> None:
    x = torch.rand(6, 3, 16, 16)
    a = geometric_augment(x, torch.Generator().manual_seed(0))
    b = geometric_augment(x, torch.Generator().manual_seed(0))
    c = geometric_augment(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert a.shape == x.shape and not torch.allclose(a, c) and not torch.allclose(a, x)
    assert a.min() >= 0 and a.max() <= 1


# ---------------------------------------------------------------------------------------------------- expansion

def test_replicate_labels_keeps_the_joint_multilabel_distribution() -> None:
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1], [0, 0, 0]], dtype=np.float32)
    out = replicate_labels(labels, 5).numpy()
    assert Counter(map(tuple, out)) == Counter({k: 5 * v for k, v in Counter(map(tuple, labels)).items()})


@pytest.fixture(scope="module")
def blobs_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The blob set as an npz, a 1-step GeCA trained on it, and its 2× expansion."""
    root = tmp_path_factory.mktemp("downstream")
    parts = {}
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        s = blob_images(n=8, seed=seed)
        parts[f"{split}_images"] = s.images
        parts[f"{split}_labels"] = s.labels.argmax(1)[:, None].astype(np.uint8)
    np.savez(root / "blobs.npz", **parts)
    res = invoke("train", "--data", root / "blobs.npz", "--out", root / "run", *TINY_TRAIN)
    assert res.exit_code == 0, res.output
    res = invoke("expand", "--run", root / "run", "--ratio", 2, "--out", root / "syn", *FAST_SAMPLING)
    assert res.exit_code == 0, res.output
    return {"npz": root / "blobs.npz", "run": root / "run", "syn": root / "syn"}


def _label_rows(directory: Path) -> list[tuple[str, ...]]:
    rows = list(csv.DictReader(open(directory / "labels.csv")))
    return [tuple(v for k, v in r.items() if k != "filename") for r in rows]


def test_expand_replicates_every_training_label_vector(blobs_setup: dict[str, Path]) -> None:
    train_labels = np.load(blobs_setup["npz"])["train_labels"][:, 0]
    expect = Counter({(str(int(c == 0)), str(int(c == 1))): 2 * n for c, n in Counter(train_labels).items()})
    assert Counter(_label_rows(blobs_setup["syn"])) == expect
    manifest = json.loads((blobs_setup["syn"] / "manifest.json").read_text())
    assert manifest["expansion"]["ratio"] == 2 and manifest["expansion"]["train_images"] == 8
    assert len(list((blobs_setup["syn"] / "images").glob("*.png"))) == 16


def test_expand_multilabel_oct_fold_preserves_the_joint_label_distribution(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data, folds_csv = "synthetic-oct@patients=9,size=8", tmp_path / "folds.csv"
    assert invoke("folds", "--data", data, "--k", 3, "--out", folds_csv).exit_code == 0
    res = invoke("train", "--data", data, "--folds-file", folds_csv, "--fold", 1, "--out", tmp_path / "run",
                 *TINY_TRAIN)
    assert res.exit_code == 0, res.output
    # The folds file and fold default to the run's own.
    res = invoke("expand", "--run", tmp_path / "run", "--ratio", 3, "--out", tmp_path / "syn", *FAST_SAMPLING)
    assert res.exit_code == 0, res.output
    from geca.data.registry import load_split

    train_rows = [tuple(str(int(v)) for v in row)
                  for row in load_split(data, "train", folds_file=folds_csv, fold=1).labels]
    assert Counter(_label_rows(tmp_path / "syn")) == Counter({k: 3 * v for k, v in Counter(train_rows).items()})
    assert any(sum(map(int, r)) > 1 for r in train_rows)  # the case is really multi-label
    # A generator trained on fold 1 has seen fold 2's test patients.
    res = invoke("expand", "--run", tmp_path / "run", "--fold", 2, "--out", tmp_path / "leak", *FAST_SAMPLING)
    assert res.exit_code == 2 and "leak" in res.output and not (tmp_path / "leak").exists()
    # Nor does the fixed split of the same data: its test images are some of fold 1's training patients.
    res = invoke("expand", "--run", tmp_path / "run", "--data", data, "--out", tmp_path / "leak", *FAST_SAMPLING)
    assert res.exit_code == 2 and "leak the test images of the fixed split" in res.output
    # classify checks where an expanded set came from (its manifest), also from a copy of the folds file.
    from geca.downstream.protocol import check_lineage
    from geca.errors import DataError

    copied = tmp_path / "copy.csv"
    copied.write_bytes(folds_csv.read_bytes())
    check_lineage(tmp_path / "syn", data, copied, 1)
    # labels replicating the held-out cases' (a rare label combination names a test scan) are no training set
    res = invoke("sample", "--run", tmp_path / "run", "--labels-from", "test", "--out", tmp_path / "held",
                 *FAST_SAMPLING)
    assert res.exit_code == 0, res.output
    with pytest.raises(DataError, match="its label vectors replicate the test split of this arm's data"):
        check_lineage(tmp_path / "held", data, folds_csv, 1)
    written = (tmp_path / "held" / "manifest.json").read_text()
    for damaged, why in ((written[:300], "corrupt, not JSON"), ("[1]", "corrupt, a JSON list"),
                         (b"\xff\xfe", "corrupt, not JSON")):  # a damaged manifest would switch the checks off
        path = tmp_path / "held" / "manifest.json"
        path.write_bytes(damaged) if isinstance(damaged, bytes) else path.write_text(damaged)
        with pytest.raises(DataError, match=f"held/manifest.json: {why}"):
            check_lineage(tmp_path / "held", data, folds_csv, 1)
    whole = json.loads(written)
    for hollow in ({}, {**whole, "trained_on": "hello"}, {**whole, "num_images": "many"},
                   {k: v for k, v in whole.items() if k not in ("trained_on", "run")}):  # valid JSON, checks off
        (tmp_path / "held" / "manifest.json").write_text(json.dumps(hollow))
        with pytest.raises(DataError, match="held/manifest.json: not a manifest as geca writes it"):
            check_lineage(tmp_path / "held", data, folds_csv, 1)
    # The generator (cv_val slice) trained on some of the patients that next-fold validates on: model selection leaks.
    with pytest.raises(DataError, match="fold 1 of .*folds.csv with cv_val slice .*this arm uses cv_val next-fold"):
        check_lineage(tmp_path / "syn", data, folds_csv, 1, "next-fold")
    manifest = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    assert manifest["expansion"]["cv_val"] == manifest["trained_on"]["cv_val"] == "slice"
    manifest["trained_on"]["cv_val"] = "next-fold"  # its labels still replicate the slice training split
    (tmp_path / "syn" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="expanded from fold 1 of .*with cv_val slice"):
        check_lineage(tmp_path / "syn", data, folds_csv, 1, "next-fold")
    manifest["trained_on"]["cv_val"] = "slice"
    for folds_file, fold in ((folds_csv, 2), (None, None)):
        with pytest.raises(DataError, match="its generator was trained on fold 1 of .*folds.csv"):
            check_lineage(tmp_path / "syn", data, folds_file, fold)
    check_lineage(tmp_path / "run", data, None, None)  # no manifest: nothing to check
    manifest["expansion"]["complete"] = False  # as `geca expand --limit` writes it
    (tmp_path / "syn" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="a partial expansion"):
        check_lineage(tmp_path / "syn", data, folds_csv, 1)
    # A run from before geca recorded its folds' SHA-256 has its folds file as typed: relative to where it was
    # trained. There, another spelling of the same file is the same split; from elsewhere it cannot be checked, and
    # is refused rather than called a leak.
    spec_file = tmp_path / "run" / "model.json"
    spec = json.loads(spec_file.read_text())
    assert spec["data"]["folds_file"] == str(folds_csv.resolve()) and spec.pop("folds_sha256")
    spec["data"]["folds_file"] = "folds.csv"
    spec_file.write_text(json.dumps(spec))
    monkeypatch.chdir(tmp_path)
    res = invoke("expand", "--run", tmp_path / "run", "--folds-file", folds_csv, "--fold", 1, "--limit", 1, "--out",
                 tmp_path / "same", *FAST_SAMPLING)
    assert res.exit_code == 0, res.output
    res = invoke("train", "--data", data, "--folds-file", "folds.csv", "--fold", 1, "--out", tmp_path / "run",
                 "--resume", *TINY_TRAIN[:5], "2", *TINY_TRAIN[6:])
    assert res.exit_code == 0 and "holds no SHA-256 of its folds file; recording that of" in res.output, res.output
    spec_file.write_text(json.dumps(spec))  # as the older geca left it, for what follows
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    res = invoke("expand", "--run", tmp_path / "run", "--folds-file", folds_csv, "--fold", 1, "--out",
                 tmp_path / "unchecked", *FAST_SAMPLING)
    assert res.exit_code == 2 and "folds file 'folds.csv' (as given when it was trained) is not found" in res.output


def test_a_run_whose_folds_file_was_rewritten_is_not_given_the_new_folds(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A run records its folds file's absolute path and SHA-256: new folds written under that name (folds
    --overwrite) are another split, whose test patients the run may have trained on; a copy of the original, wherever
    it lies, is the same split."""
    data, folds_csv, original = "synthetic-oct@patients=9,size=8", tmp_path / "folds.csv", tmp_path / "kept/orig.csv"
    assert invoke("folds", "--data", data, "--k", 3, "--out", folds_csv).exit_code == 0
    original.parent.mkdir()
    original.write_bytes(folds_csv.read_bytes())
    run = tmp_path / "run"
    assert invoke("train", "--data", data, "--folds-file", folds_csv, "--fold", 1, "--out", run,
                  *TINY_TRAIN).exit_code == 0
    for args in (["expand", "--ratio", 1, "--out", tmp_path / "x1"], ["sample", "--per-class", 1, "--out",
                                                                      tmp_path / "s1"]):
        assert invoke(*args[:1], "--run", run, *args[1:], *FAST_SAMPLING).exit_code == 0
    res = invoke("folds", "--data", data, "--k", 3, "--seed", 7, "--out", folds_csv, "--overwrite")
    assert res.exit_code == 0 and folds_csv.read_bytes() != original.read_bytes()
    # classify: a set made before the rewrite is not for fold 1 of the new folds; nor is any set of the run (sample
    # or expand) for a fold whose test patients it trained on, however the data is spelt
    from geca.downstream.protocol import check_lineage
    from geca.errors import DataError

    with pytest.raises(DataError, match="the file has changed since"):
        check_lineage(tmp_path / "x1", data, folds_csv, 1)
    for other in (data, "synthetic-oct@size=8,patients=9", "synthetic-oct@patients=12,size=16"):
        with pytest.raises(DataError, match="its generator was trained on fold 1 of .*folds.csv"):
            check_lineage(tmp_path / "s1", other, folds_csv, 0)
    check_lineage(tmp_path / "s1", data, original, 1)
    manifest = json.loads((tmp_path / "s1/manifest.json").read_text())
    del manifest["trained_on"]  # as sets were written before manifests recorded it: the run tells
    (tmp_path / "s1/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="its generator was trained on fold 1 of .*folds.csv"):
        check_lineage(tmp_path / "s1", data, folds_csv, 0)
    manifest["weights_sha256"] = "0" * 64  # the run's folder holds other weights now: its model.json is not trusted
    (tmp_path / "s1/manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="used unchecked"):
        check_lineage(tmp_path / "s1", data, folds_csv, 0)
    check_lineage(tmp_path / "s1", "synthetic-oct@seed=3,patients=9", folds_csv, 0)  # other patients altogether
    other = tmp_path / "other.csv"  # the new folds under another name: not the run's file, not its folds
    other.write_bytes(folds_csv.read_bytes())
    res = invoke("expand", "--run", run, "--data", "synthetic-oct@size=8,patients=9", "--folds-file", other,
                 "--fold", 0, "--out", tmp_path / "syn", *FAST_SAMPLING)
    assert res.exit_code == 2 and "would leak the test images of fold 0" in res.output, res.output
    changed = "the run's folds file (model.json data.folds_file) has changed since the run was trained"
    for args in (["expand", "--ratio", 1, "--out", tmp_path / "syn"],
                 ["expand", "--folds-file", folds_csv, "--fold", 1, "--out", tmp_path / "syn"],
                 ["sample", "--labels-from", "train", "--ratio", 1, "--out", tmp_path / "syn"]):
        res = invoke(*args[:1], "--run", run, *args[1:], *FAST_SAMPLING)
        assert res.exit_code == 2 and changed in " ".join(res.output.split()), res.output
        assert not (tmp_path / "syn").exists()
    res = invoke("train", "--data", data, "--folds-file", folds_csv, "--fold", 1, "--out", run, "--resume",
                 *TINY_TRAIN[:5], "2", *TINY_TRAIN[6:])
    assert res.exit_code == 2 and "differs from this config at data.folds_file: " in res.output, res.output
    assert "has changed since the run was trained" in " ".join(res.output.split())
    # the original folds, from another folder and under another name, are the run's split
    monkeypatch.chdir(original.parent)
    res = invoke("expand", "--run", run, "--folds-file", "orig.csv", "--fold", 1, "--limit", 1, "--out",
                 tmp_path / "syn", *FAST_SAMPLING)
    assert res.exit_code == 0, res.output
    expansion = json.loads((tmp_path / "syn/manifest.json").read_text())["expansion"]
    assert expansion["folds_file"] == str(original.resolve()) and expansion["fold"] == 1
    res = invoke("train", "--data", data, "--folds-file", "orig.csv", "--fold", 2, "--out", run, "--resume",
                 *TINY_TRAIN[:5], "2", *TINY_TRAIN[6:])
    assert res.exit_code == 2 and "differs from this config at data.fold: 1 → 2" in res.output, res.output
    res = invoke("train", "--data", data, "--folds-file", "orig.csv", "--fold", 1, "--out", run, "--resume",
                 *TINY_TRAIN[:5], "2", *TINY_TRAIN[6:])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "model.json").read_text())["data"]["folds_file"] == str(original.resolve())
    # config.yaml holds the absolute path too: a resume from any folder finds the folds
    monkeypatch.chdir(tmp_path)
    res = invoke("train", "--out", run, "--resume", "--max-steps", 3, "--no-progress")
    assert res.exit_code == 0 and "trained to step 3" in res.output, res.output


def test_a_run_on_a_relative_data_path_resumes_and_samples_from_any_folder(blobs_npz: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative --data path is recorded absolute (config.yaml, model.json): resume and expand find the data from
    another folder, and the recorded run is still the same data as typed from where it was trained."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert invoke("train", "--data", "blobs.npz", "--out", run, *TINY_TRAIN).exit_code == 0
    assert json.loads((run / "model.json").read_text())["data"]["spec"] == str(blobs_npz.resolve())
    res = invoke("train", "--data", "blobs.npz", "--out", run, "--resume", "--max-steps", 2, "--no-progress")
    assert res.exit_code == 0 and "trained to step 2" in res.output, res.output
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    res = invoke("train", "--out", run, "--resume", "--max-steps", 3, "--no-progress")
    assert res.exit_code == 0 and "trained to step 3" in res.output, res.output
    res = invoke("expand", "--run", run, "--ratio", 1, "--limit", 2, "--out", tmp_path / "syn", *FAST_SAMPLING)
    assert res.exit_code == 0, res.output
    res = invoke("train", "--data", "blobs.npz", "--out", run, "--resume", "--max-steps", 4, "--no-progress")
    assert res.exit_code == 2 and "blobs.npz" in res.output  # another file, from here


def test_expand_refuses_data_with_other_classes(blobs_setup: dict[str, Path], tmp_path: Path) -> None:
    res = invoke("expand", "--run", blobs_setup["run"], "--data", "synthetic-fundus@n=8,size=8",
                 "--out", tmp_path / "x", *FAST_SAMPLING)
    assert res.exit_code == 2 and "the run was trained on" in res.output
    assert not (tmp_path / "x").exists()


def test_expanding_the_runs_own_csv_set_without_its_folds_file_asks_for_one(tmp_path: Path) -> None:
    """Not that the run's images would leak into 'the fixed split', which a folder + CSV set does not have."""
    _write_synthetic(tmp_path / "csv", ["a", "b"], n=12, mode="RGB")
    data = tmp_path / "csv" / "labels.csv"
    assert invoke("folds", "--data", data, "--k", 3, "--out", tmp_path / "folds.csv").exit_code == 0
    res = invoke("train", "--data", data, "--folds-file", tmp_path / "folds.csv", "--fold", 0, "--out",
                 tmp_path / "run", *TINY_TRAIN)
    assert res.exit_code == 0, res.output
    res = invoke("expand", "--run", tmp_path / "run", "--data", data, "--out", tmp_path / "x", *FAST_SAMPLING)
    assert res.exit_code == 2 and "a folder + CSV set has no fixed split" in res.output, res.output
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ classify CLI

def _md_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("Arm",):
            rows[cells[0]] = cells[1:]
    return rows


def test_classify_end_to_end_writes_table_csv_json_and_roc(blobs_setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    res = invoke("classify", "--data", blobs_setup["npz"], "--synthetic", f"syn={blobs_setup['syn']}",
                 "--arms", "none,geometric,+syn", "--seeds", 2, "--out", out, *TINY_CLASSIFY)
    assert res.exit_code == 0, res.output
    for name in ("table.md", "table.csv", "units.csv", "results.json", "roc_none.png", "roc_geometric.png",
                 "roc_plus_syn.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["arms"]) == ["none", "geometric", "+syn"] and summary["test"] == "paired bootstrap"
    assert [u["n_synthetic"] for u in summary["arms"]["+syn"]["units"]] == [16, 16]
    assert [u["seed"] for u in summary["arms"]["none"]["units"]] == [0, 1]
    rows = _md_rows((out / "table.md").read_text())
    metrics = summary["metrics"]
    assert metrics == ["sen", "spe", "auc", "f1", "f1_sen_spe", "map", "acc"]
    for arm, entry in summary["arms"].items():
        unit_values = {m: [u["scan"]["macro"][m] for u in entry["units"]] for m in metrics}
        for m, cell in zip(metrics, rows[arm], strict=False):
            stat = entry["summary"]["scan"][m]
            assert stat["mean"] == pytest.approx(np.mean(unit_values[m]))
            assert cell == f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"
        p_cell = rows[arm][-1]
        if arm == "geometric":
            assert p_cell == "—"
        else:
            sig = entry["significance"]["scan"]["cases"]["map"]
            way = "" if sig["stars"] == "ns" else (" ↑" if sig["mean_diff"] > 0 else " ↓")
            assert p_cell == f"{sig['stars']}{way} ({sig['p']:.2g})" and sig["test"] == "paired bootstrap"
    units = list(csv.DictReader(open(out / "units.csv")))
    assert len(units) == 6
    assert float(units[0]["auc"]) == pytest.approx(summary["arms"]["none"]["units"][0]["scan"]["macro"]["auc"])
    assert Image.open(out / "roc_geometric.png").size[0] > 100


def _write_synthetic(directory: Path, class_names: list[str], n: int = 4, size: int = 8, mode: str = "L") -> None:
    (directory / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(directory / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", *class_names])
        for i in range(n):
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(directory / f"images/{i}.png")
            w.writerow([f"images/{i}.png", *(int(j == i % len(class_names)) for j in range(len(class_names)))])


def test_classify_patient_level_cv_with_one_synthetic_set_per_fold(tmp_path: Path) -> None:
    data = "synthetic-oct@patients=12,size=8"
    res = invoke("folds", "--data", data, "--k", 3, "--out", tmp_path / "folds.csv")
    assert res.exit_code == 0, res.output
    for k in range(3):
        _write_synthetic(tmp_path / f"syn-{k}", OCT_CLASSES)
    cv = ["classify", "--data", data, "--folds-file", tmp_path / "folds.csv", "--folds", 2, "--synthetic",
          f"oct={tmp_path}/syn-{{fold}}", "--arms", "geometric,+oct", "--seeds", 1, "--test", "ttest"]
    damaged = tmp_path / "syn-1" / "images" / "2.png"
    whole = damaged.read_bytes()
    damaged.write_bytes(whole[:40])  # a later fold's set is decoded before the first fold trains
    with pytest.MonkeyPatch.context() as m:
        m.setattr("geca.downstream.protocol.train_classifier", lambda *a, **k: pytest.fail("trained"))
        res = invoke(*cv, "--out", tmp_path / "cv", *TINY_CLASSIFY)
    assert res.exit_code == 2 and f"{damaged}: unreadable image" in res.output, res.output
    damaged.write_bytes(whole)
    res = invoke(*cv, "--out", tmp_path / "cv", *TINY_CLASSIFY)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "cv" / "results.json").read_text())
    assert summary["protocol"] == "patient-level 2-fold CV (validation: a 15 % patient slice of the other folds)"
    assert summary["levels"] == ["scan", "eye"]
    assert [u["fold"] for u in summary["arms"]["+oct"]["units"]] == [0, 1]
    from geca.data.registry import load_split

    patients = eyes = 0
    for s in summary["splits"]:  # test = fold k, val = fold k+1, train = the third fold
        test, val = (load_split(data, split, folds_file=tmp_path / "folds.csv", fold=s["fold"]) for split in
                     ("test", "val"))
        assert (s["test"], s["val"]) == (len(test), len(val))
        assert not set(test.patient_ids) & set(val.patient_ids)
        patients, eyes = patients + len(set(test.patient_ids)), eyes + len(set(test.eye_ids))
    # the bootstrap resamples the test patients, at scan and at eye level
    assert summary["bootstrap_resamples"] == "patients" and patients < eyes < sum(s["test"] for s in summary["splits"])
    for level in ("scan", "eye"):
        assert summary["arms"]["+oct"]["significance"][level]["cases"]["map"]["n"] == patients
    assert "resampling patients whole" in (tmp_path / "cv" / "table.md").read_text()
    eye_table = (tmp_path / "cv" / "table.md").read_text().split("## Eye level")[1]
    assert "| +oct |" in eye_table and "acc" not in summary["metrics"]
    significance = summary["arms"]["+oct"]["significance"]["eye"]["folds"]
    assert set(significance) == set(summary["metrics"]) and significance["map"]["test"] == "paired t-test"
    assert significance["map"]["n"] == 2
    assert summary["arms"]["+oct"]["units"][0]["n_synthetic"] == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--arms", "geometric,rotations"], "unknown arm 'rotations'"),
        (["--arms", "geometric,+gan"], "unknown arm '+gan'"),
        (["--arms", " "], "--arms is empty; give some of none, geometric, or leave it out"),
        (["--synthetic", "syn={tmp}/nowhere", "--arms", "geometric,+syn"], "nowhere: synthetic set not found"),
        (["--synthetic", "syn={tmp}/wrong", "--arms", "geometric,+syn"], "class columns ['a', 'b', 'c']"),
        (["--synthetic", "syn={tmp}/right", "--arms", "geometric"], "no arm uses them"),
        (["--synthetic", "syn={tmp}/right-{fold}"], "no --folds-file"),
        (["--imagenet-weights", "{tmp}/w.pth"], "w.pth: ImageNet weights file not found"),
        (["--eye-agg", "median"], "--eye-agg"),
        (["--stem", "foo"], "--stem must be one of imagenet, cifar, got 'foo'"),
        (["--imagenet-weights", "{tmp}"], "a folder; give the ImageNet weights file itself"),
        (["--p-metric", "kappa"], "--p-metric"),
    ],
)
def test_classify_bad_input_exits_2_before_training(blobs_setup: dict[str, Path], tmp_path: Path,
                                                    extra: list[str], message: str) -> None:
    _write_synthetic(tmp_path / "wrong", ["a", "b", "c"], mode="RGB")
    _write_synthetic(tmp_path / "right", ["class 0", "class 1"], mode="RGB")
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    res = invoke("classify", "--data", blobs_setup["npz"], "--out", tmp_path / "out", *args, *TINY_CLASSIFY)
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and message in res.output
    assert not (tmp_path / "out").exists()


def test_classify_refuses_a_non_empty_out_dir(blobs_setup: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    # the report replaces the whole folder: never one of runs or sets, with or without --overwrite
    for flags in ([], ["--overwrite"]):
        res = invoke("classify", "--data", blobs_setup["npz"], "--out", tmp_path / "out", *flags, *TINY_CLASSIFY)
        assert res.exit_code == 2 and "holds other files (keep.txt)" in res.output, res.output
        assert "--overwrite" not in res.output.replace("--out", "")  # which would not help
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    from geca.downstream.report import check_report_out

    report = tmp_path / "report"
    report.mkdir()
    for name in ("results.json", "table.md", "table.csv", "units.csv", "roc_none.png", "roc_plus_syn.png",
                 ".DS_Store"):
        (report / name).write_text("{}")
    check_report_out(report, overwrite=True)
    with pytest.raises(FileExistsError, match="holds an earlier report; pass --overwrite"):
        check_report_out(report, overwrite=False)
    (report / "results.json").unlink()
    with pytest.raises(FileExistsError, match="holds no results.json"):
        check_report_out(report, overwrite=True)


def test_every_downstream_option_has_help() -> None:
    import inspect

    for fn in (expand, classify):
        for name, param in inspect.signature(fn).parameters.items():
            assert getattr(param.default, "help", None), f"{fn.__name__}: option {name} has no help text"
    assert re.search(r"--ratio", runner.invoke(app, ["expand", "--help"]).output)


def test_a_synthetic_set_cut_short_is_refused(tmp_path: Path) -> None:
    """A labels.csv cut at a line boundary parses; the image count its manifest recorded shows the loss."""
    from geca.downstream.protocol import check_synthetic
    from geca.errors import DataError

    _write_synthetic(tmp_path / "syn", ["a", "b"], n=6)
    (tmp_path / "syn" / "manifest.json").write_text(json.dumps({"num_images": 6}))
    assert check_synthetic(tmp_path / "syn", ["a", "b"]) == tmp_path / "syn" / "labels.csv"
    rows = (tmp_path / "syn" / "labels.csv").read_text().splitlines(keepends=True)
    (tmp_path / "syn" / "labels.csv").write_text("".join(rows[:4]))
    with pytest.raises(DataError, match="labels.csv: 3 rows, but its manifest.json records 6 images"):
        check_synthetic(tmp_path / "syn", ["a", "b"])


def test_a_synthetic_set_of_another_size_is_resized_with_a_warning(tmp_path: Path) -> None:
    """A generator trained at another size (or on other data with the same class names) is easy to pick by mistake."""
    import warnings

    from conftest import blob_images

    from geca.downstream.protocol import load_synthetic

    real = blob_images(n=4, size=12)
    _write_synthetic(tmp_path / "small", real.class_names, size=8, mode="RGB")
    with pytest.warns(UserWarning, match=r"small: its images are 8×8 px and are resized to the real images' 12 px"):
        assert load_synthetic(tmp_path / "small", real).resolution == 12
    _write_synthetic(tmp_path / "same", real.class_names, size=12, mode="RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_synthetic(tmp_path / "same", real)


def test_classify_flag_defaults_are_the_settings_defaults() -> None:
    """The command line and a study's classification section (TableSettings) must not drift apart."""
    import inspect
    from dataclasses import fields

    from geca.cli.downstream import classify as command
    from geca.downstream.classify import TableSettings

    flags = {name: p.default.default for name, p in inspect.signature(command).parameters.items()}
    shared = [f for f in fields(TableSettings) if f.name in flags]
    assert len(shared) == len(fields(TableSettings))  # every setting is a flag
    assert {f.name: flags[f.name] for f in shared} == {f.name: f.default for f in shared}
