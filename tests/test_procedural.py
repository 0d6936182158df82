"""Procedural fundus and OCT sets: determinism, shapes, label statistics, patient splits and lesions."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest

from geca.data.imageset import ImageSet
from geca.data.procedural import OCT_CLASSES, PROCEDURAL, fundus, synthetic_fundus, synthetic_oct
from geca.errors import DataError


@pytest.fixture(scope="module")
def oct_small() -> dict[str, ImageSet]:
    return {split: synthetic_oct(split, size=16, patients=30) for split in ("train", "val", "test", "all")}


@pytest.fixture(scope="module")
def oct_default_pool() -> ImageSet:
    # The default 200 patients at the smallest size: the label statistics do not depend on the size.
    return synthetic_oct("all", size=8)


def test_registry_names() -> None:
    assert PROCEDURAL == {"synthetic-fundus": synthetic_fundus, "synthetic-oct": synthetic_oct}


@pytest.mark.parametrize("size", [16, 40])
def test_fundus_shapes(size: int) -> None:
    data = synthetic_fundus("val", size=size, n=6)
    assert data.images.shape == (6, size, size, 3) and data.images.dtype == np.uint8
    assert data.labels.shape == (6, 5) and data.labels.dtype == np.float32
    assert np.all(data.labels.sum(1) == 1) and not data.multilabel
    assert data.class_names == [f"grade {g}" for g in range(5)]
    assert len(set(data.ids)) == 6
    # Black corners, lit fundus in the middle.
    assert data.images[:, 0, 0].max() < 10 and data.images[:, size // 2, size // 2, 0].min() > 40


def test_fundus_determinism() -> None:
    a = synthetic_fundus("val", size=16, n=8, seed=0)
    b = synthetic_fundus("val", size=16, n=8, seed=0)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, synthetic_fundus("val", size=16, n=8, seed=1).images)
    assert not np.array_equal(a.images, synthetic_fundus("test", size=16, n=8, seed=0).images)


def test_fundus_image_depends_only_on_seed_split_index() -> None:
    short = synthetic_fundus("test", size=16, n=5, seed=3)
    long = synthetic_fundus("test", size=16, n=50, seed=3)
    np.testing.assert_array_equal(short.images, long.images[:5])
    np.testing.assert_array_equal(short.labels, long.labels[:5])


def test_fundus_default_class_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rendering is irrelevant to the label allocation, so skip it.
    monkeypatch.setattr(fundus, "_fundus_image", lambda grade, size, rng: np.zeros((size, size, 3), "u1"))
    counts = {s: synthetic_fundus(s).labels.sum(0).astype(int).tolist() for s in ("train", "val", "test")}
    assert counts == {
        "train": [486, 128, 206, 194, 66],  # RetinaMNIST's train counts, exactly
        "val": [54, 14, 23, 22, 7],
        "test": [180, 47, 76, 72, 25],
    }
    grades = synthetic_fundus("train").class_indices()
    assert not np.all(np.diff(grades) >= 0), "grades should be shuffled, not sorted"


def test_fundus_lesion_load_grows_with_grade() -> None:
    data = synthetic_fundus("val", size=64, n=200)
    grades = data.class_indices()
    img = data.images.astype(np.float32)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    disc = r > 30
    med_r = np.array([np.median(r[i][disc[i]]) for i in range(len(img))])[:, None, None]
    med_g = np.array([np.median(g[i][disc[i]]) for i in range(len(img))])[:, None, None]
    ratio = g / np.maximum(r, 1)
    med_ratio = np.array([np.median(ratio[i][disc[i]]) for i in range(len(img))])[:, None, None]
    # Red lesions are far redder (lower green/red) than the background or the vessels; exudates and
    # cotton-wool spots are much more yellow-green than the background.
    red = disc & (ratio < 0.55 * med_ratio)
    yellow = disc & (g > 1.6 * med_g) & (b < 0.6 * g) & (r > 0.9 * med_r)
    red_load = [red[grades == k].sum((1, 2)).mean() for k in range(5)]
    yellow_load = [yellow[grades == k].sum((1, 2)).mean() for k in range(5)]
    assert red_load[0] < 0.5 and all(np.diff(red_load) > 0), red_load
    assert yellow_load[2] > 1.5 * yellow_load[1] and yellow_load[4] > yellow_load[2], yellow_load


@pytest.mark.parametrize("size", [16, 24])
def test_oct_shapes(size: int) -> None:
    data = synthetic_oct("val", size=size, patients=10)
    assert data.images.dtype == np.uint8 and data.images.shape[1:] == (size, size, 1)
    assert data.labels.dtype == np.float32 and data.labels.shape == (len(data), 11)
    assert data.multilabel and data.class_names == OCT_CLASSES
    assert data.patient_ids is not None and data.eye_ids is not None
    assert len(data.patient_ids) == len(data.eye_ids) == len(data.ids) == len(data)


def test_oct_determinism(oct_small: dict[str, ImageSet]) -> None:
    again = synthetic_oct("all", size=16, patients=30)
    np.testing.assert_array_equal(oct_small["all"].images, again.images)
    np.testing.assert_array_equal(oct_small["all"].labels, again.labels)
    assert again.ids == oct_small["all"].ids
    other = synthetic_oct("all", size=16, patients=30, seed=1)
    assert other.ids != again.ids or not np.array_equal(other.images, again.images)


def test_oct_label_rules(oct_default_pool: ImageSet) -> None:
    labels = oct_default_pool.labels
    normal = labels[:, OCT_CLASSES.index("Normal")] == 1
    assert np.all(labels.sum(1) >= 1)
    assert np.all(labels[normal].sum(1) == 1), "Normal must exclude every other label"
    counts = labels.sum(0)
    order = [OCT_CLASSES[i] for i in np.argsort(-counts)]
    assert {"FLD", "DR"} <= set(order[:3]), order
    assert order[-1] == "RVO", order
    assert 1200 < len(labels) < 1600


def test_oct_correlations(oct_default_pool: ImageSet) -> None:
    lab = oct_default_pool.labels.astype(bool)
    col = {c: lab[:, i] for i, c in enumerate(OCT_CLASSES)}
    assert col["CNV"][col["wAMD"]].mean() > 3 * col["CNV"][~col["wAMD"]].mean()
    assert col["FLD"][col["DR"]].mean() > col["FLD"][~col["DR"]].mean()
    amd = col["dAMD"] | col["wAMD"]
    assert col["PED"][amd].mean() > 2 * col["PED"][~amd].mean()


def test_oct_eye_and_patient_structure(oct_small: dict[str, ImageSet]) -> None:
    data = oct_small["all"]
    for scan_id, patient, eye in zip(data.ids, data.patient_ids, data.eye_ids, strict=True):
        assert eye.startswith(patient + "-") and eye[-2:] in ("OD", "OS")
        assert scan_id.startswith(eye + "-s")
    for eye in set(data.eye_ids):
        rows = data.labels[data.eye_ids == eye]
        assert len(rows) <= 7 and np.all(rows == rows[0]), f"scans of {eye} disagree on labels"
    eyes_per_patient = {p: len(set(data.eye_ids[data.patient_ids == p])) for p in set(data.patient_ids)}
    assert len(eyes_per_patient) == 30 and set(eyes_per_patient.values()) <= {1, 2}


def test_oct_patient_splits(oct_small: dict[str, ImageSet]) -> None:
    patients = {split: set(oct_small[split].patient_ids) for split in ("train", "val", "test")}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert [len(patients[s]) for s in ("train", "val", "test")] == [21, 3, 6]
    everything = oct_small["all"]
    union = sorted(i for split in ("train", "val", "test") for i in oct_small[split].ids)
    assert union == sorted(everything.ids)
    # A scan is the same image whichever split it is loaded through.
    where = {scan_id: k for k, scan_id in enumerate(everything.ids)}
    for split in ("train", "val", "test"):
        rows = [where[i] for i in oct_small[split].ids]
        np.testing.assert_array_equal(oct_small[split].images, everything.images[rows])


def test_oct_scans_show_layers(oct_small: dict[str, ImageSet]) -> None:
    img = oct_small["all"].images[..., 0].astype(np.float32)
    profile = img.mean(axis=(0, 2))  # mean brightness per depth row
    # Dark vitreous on top, bright retina in the middle band.
    assert profile[:3].mean() < 25 and profile.max() > 3 * profile[:3].mean()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: synthetic_fundus("all"), "has no split 'all'.*synthetic-oct has it"),
        (lambda: synthetic_fundus("holdout"), "unknown split"),
        (lambda: synthetic_fundus("train", size=7), "size"),
        (lambda: synthetic_fundus("train", n=0), "n must"),
        (lambda: synthetic_oct("holdout"), "unknown split"),
        (lambda: synthetic_oct("train", size=4), "size"),
        (lambda: synthetic_oct("train", patients=4), "patients"),
    ],
)
def test_bad_arguments(call: Callable[[], object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        call()


def test_a_large_seed_is_a_seed_and_absurd_sizes_are_refused() -> None:
    """Any non-negative seed draws a set (runs trained on one must load it again); sizes and counts have bounds."""
    from geca.data.registry import load_split
    from geca.errors import DataError

    assert len(load_split("synthetic-fundus@n=8,size=8,seed=4294967296", "train")) > 0
    for spec, message in (("synthetic-fundus@size=100000000", "size must be in [8, 8192]"),
                          ("synthetic-oct@patients=100000000", "patients must be in [5, 1000000]"),
                          ("synthetic-fundus@seed=-1", "seed must be non-negative")):
        with pytest.raises(DataError, match=re.escape(message)):
            load_split(spec, "train")
