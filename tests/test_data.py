"""Data layer: MedMNIST npz, folder + CSV, patient folds, the registry and the `geca folds` command."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from geca.cli.folds import folds as folds_command
from geca.data import medmnist_npz, registry
from geca.data.folder_csv import load_folder_csv, read_table
from geca.data.folds import patient_folds, read_folds, write_folds
from geca.data.imageset import ImageSet
from geca.data.registry import load_split, parse_spec
from geca.errors import DataError

RETINA = Path(__file__).resolve().parents[1].parent / "shared/data/retinamnist.npz"
needs_retina = pytest.mark.skipif(not RETINA.is_file(), reason=f"RetinaMNIST not found at {RETINA}")


@pytest.fixture(autouse=True)
def _isolated_data_dirs(tmp_path, monkeypatch):
    """Name lookup must never see the developer's real ~/.medmnist or GECA_DATA_DIR."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GECA_DATA_DIR", raising=False)


# ---------------------------------------------------------------- MedMNIST npz


def _arrays(n=(6, 3, 4), size=5, channels=3, max_label=2, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        shape = (count, size, size) + ((channels,) if channels == 3 else ())
        out[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        out[f"{split}_labels"] = (np.arange(count) % (max_label + 1)).astype(np.uint8)[:, None]
    return out


def _npz(path: Path, **overrides) -> Path:
    arrays = _arrays()
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@needs_retina
def test_retinamnist_shapes_and_grade_counts():
    train = load_split(str(RETINA), "train")
    assert train.images.shape == (1080, 28, 28, 3) and train.images.dtype == np.uint8
    assert train.labels.shape == (1080, 5) and not train.multilabel
    assert np.all(train.labels.sum(1) == 1)
    assert train.class_names == [f"grade {i}" for i in range(5)]
    assert np.bincount(train.class_indices(), minlength=5).tolist() == [486, 128, 206, 194, 66]
    assert len(load_split(str(RETINA), "val")) == 120
    test = load_split(str(RETINA), "test", image_size=32)
    assert test.images.shape == (400, 32, 32, 3)


@needs_retina
def test_retinamnist_by_name_through_geca_data_dir(monkeypatch):
    monkeypatch.setenv("GECA_DATA_DIR", str(RETINA.parent))
    val = load_split("retinamnist", "val")
    assert val.source == str(RETINA) and val.images.shape == (120, 28, 28, 3)


def test_name_lookup_prefers_geca_data_dir_over_home(tmp_path, monkeypatch):
    (tmp_path / "home/.medmnist").mkdir(parents=True)
    _npz(tmp_path / "home/.medmnist/toyset.npz", test_labels=np.full((4, 1), 5, np.uint8))
    assert load_split("toyset", "test").source == str(tmp_path / "home/.medmnist/toyset.npz")
    monkeypatch.setenv("GECA_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    _npz(tmp_path / "data/toyset.npz", test_labels=np.full((4, 1), 3, np.uint8))
    ds = load_split("toyset", "train")
    assert ds.source == str(tmp_path / "data/toyset.npz")
    # K is the largest label over all splits + 1, even when the largest only occurs in another split.
    assert ds.class_names == ["class 0", "class 1", "class 2", "class 3"]
    assert ds.labels.argmax(1).tolist() == [0, 1, 2, 0, 1, 2]


def test_missing_named_dataset_says_where_it_looked_and_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("GECA_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(DataError) as err:
        load_split("retinamnist", "train")
    message = str(err.value)
    assert "retinamnist.npz" in message and str(tmp_path / "data") in message and ".medmnist" in message
    assert "--download" in message


def test_download_checks_md5_then_renames(tmp_path, monkeypatch):
    source = _npz(tmp_path / "remote.npz")
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    known = medmnist_npz.KnownDataset(("a", "b", "c"), md5, source.as_uri())  # file:// keeps tests offline
    monkeypatch.setitem(medmnist_npz.KNOWN_DATASETS, "toymnist", known)
    monkeypatch.setenv("GECA_DATA_DIR", str(tmp_path / "data"))
    ds = load_split("toymnist", "val", download=True)
    assert ds.source == str(tmp_path / "data/toymnist.npz") and ds.class_names == ["a", "b", "c"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["toymnist.npz"]


def test_download_with_wrong_md5_leaves_nothing(tmp_path, monkeypatch):
    source = _npz(tmp_path / "remote.npz")
    known = medmnist_npz.KnownDataset(("a", "b", "c"), "0" * 32, source.as_uri())
    monkeypatch.setitem(medmnist_npz.KNOWN_DATASETS, "toymnist", known)
    monkeypatch.setenv("GECA_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(DataError, match="MD5"):
        load_split("toymnist", "train", download=True)
    assert list((tmp_path / "data").iterdir()) == []


def test_multi_hot_npz_is_multilabel(tmp_path):
    hot = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], np.uint8)
    path = _npz(tmp_path / "multi.npz", test_labels=hot,
                train_labels=np.zeros((6, 3), np.uint8), val_labels=np.zeros((3, 3), np.uint8))
    ds = load_split(str(path), "test")
    assert ds.multilabel and ds.labels.tolist() == hot.tolist()
    assert ds.class_names == ["class 0", "class 1", "class 2"]


def test_grey_npz_gets_a_channel_axis_and_resizes(tmp_path):
    arrays = _arrays(channels=1, size=8)
    arrays["train_images"][:] = 200
    path = tmp_path / "grey.npz"
    np.savez(path, **arrays)
    ds = load_split(str(path), "train", image_size=4)
    assert ds.images.shape == (6, 4, 4, 1)
    assert np.all(ds.images == 200)  # a flat image must stay flat: no ringing, no rescaling


def _text_file(path: Path) -> Path:
    path.write_text("definitely not a zip archive")
    return path


def _single_array(path: Path) -> Path:
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    return path


def _hot(value: int) -> dict[str, np.ndarray]:
    return {"train_labels": np.full((6, 2), value, np.uint8), "val_labels": np.zeros((3, 2), np.uint8),
            "test_labels": np.zeros((4, 2), np.uint8)}


# case: (file name, how to write it, what the message must say)
BAD_NPZ = {
    "not a zip": ("text.npz", _text_file, "not an npz file (it is not a zip archive)"),
    "single array": ("single.npz", _single_array, "not an npz archive"),
    "missing key": ("nokey.npz", lambda p: _npz(p, val_labels=None), "missing key(s) val_labels"),
    "float images": ("float.npz", lambda p: _npz(p, train_images=np.zeros((6, 5, 5, 3))), "uint8"),
    "two channels": ("chan.npz", lambda p: _npz(p, train_images=np.zeros((6, 5, 5, 2), np.uint8)),
                     "(N,H,W,3)"),
    "float labels": ("flab.npz", lambda p: _npz(p, train_labels=np.zeros((6, 1))), "integers"),
    "1-D labels": ("flat.npz", lambda p: _npz(p, train_labels=np.zeros(6, np.uint8)), "(N,1)"),
    "count mismatch": ("count.npz", lambda p: _npz(p, train_labels=np.zeros((5, 1), np.uint8)),
                       "5 rows but the images have 6"),
    "negative label": ("neg.npz", lambda p: _npz(p, train_labels=np.full((6, 1), -1, np.int64)),
                       "out of range"),
    # A known name fixes K = 5, so label 5 is out of range although it is the file's largest label.
    "label >= K": ("retinamnist.npz", lambda p: _npz(p, train_labels=np.full((6, 1), 5, np.uint8)),
                   "out of range for 5 classes"),
    "multi-hot value 2": ("hot.npz", lambda p: _npz(p, **_hot(2)), "must be 0 or 1"),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_bad_npz_raises_data_error_naming_the_file(tmp_path, case):
    name, write, expected = BAD_NPZ[case]
    path = write(tmp_path / name)
    with pytest.raises(DataError) as err:
        load_split(str(path), "train")
    assert str(path) in str(err.value) and expected in str(err.value)


def test_missing_npz_path(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_split(str(tmp_path / "absent.npz"), "train")


# ---------------------------------------------------------------- folder + CSV


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _rows(csv_path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(csv_path.read_text().splitlines()))


def _folder(tmp_path: Path, rgb_one: bool = False, n: int = 6) -> Path:
    """n grey 8x8 images, patient p{i//2}, one-hot labels over a/b; optionally one RGB image."""
    root = tmp_path / "ds"
    rows = []
    for i in range(n):
        name = f"img/{i}.png"
        _png(root / name, np.full((8, 8), 10 * i, np.uint8))
        rows.append({"filename": name, "patient_id": f"p{i // 2}", "eye_id": f"e{i}", "a": int(i % 3 == 0),
                     "b": int(i % 3 != 0)})
    if rgb_one:
        _png(root / "img/0.png", np.stack([np.full((8, 8), v, np.uint8) for v in (255, 0, 0)], -1))
    return _csv(root / "labels.csv", rows)


def test_folder_csv_grey(tmp_path):
    ds = load_folder_csv(_folder(tmp_path), "all")
    assert ds.images.shape == (6, 8, 8, 1) and not ds.multilabel
    assert ds.ids == [f"img/{i}.png" for i in range(6)]
    assert [int(ds.images[i, 0, 0, 0]) for i in range(6)] == [0, 10, 20, 30, 40, 50]
    assert ds.labels[:, 0].tolist() == [1, 0, 0, 1, 0, 0] and ds.class_names == ["a", "b"]
    assert ds.patient_ids.tolist() == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert ds.eye_ids.tolist() == [f"e{i}" for i in range(6)]


def test_a_dataset_is_the_same_however_it_is_written_moved_or_resaved(tmp_path, monkeypatch):
    """The leakage checks compare what a spec holds: a moved CSV set re-saved with CRLF line endings and its rows in
    another order is the same set, another patient makes another; procedural options other than the seed draw the
    same first patients; a MedMNIST name is its file, and an npz re-saved with the same arrays the same set."""
    from geca.data.registry import same_data, source_key

    ds = _folder(tmp_path)
    moved = tmp_path / "moved" / "labels.csv"
    moved.parent.mkdir()
    shutil.copytree(ds.parent / "img", moved.parent / "img")
    header, *lines = ds.read_text().splitlines()
    moved.write_bytes(("\r\n".join([header, *reversed(lines)]) + "\r\n").encode())
    assert moved.read_bytes() != ds.read_bytes() and same_data(str(moved), str(ds))
    other = tmp_path / "other.csv"
    other.write_text(ds.read_text().replace("p2", "p9"))
    assert not same_data(str(other), str(ds))
    assert same_data(str(moved), "anything/recorded/elsewhere.csv", b_key=source_key(str(ds)))
    assert same_data("synthetic-oct@size=8,patients=9", "synthetic-oct@patients=12")
    assert not same_data("synthetic-oct@seed=1", "synthetic-oct")
    npz = tmp_path / "data" / "retinamnist.npz"
    npz.parent.mkdir()
    arrays = {"train_images": np.arange(24, dtype=np.uint8).reshape(6, 2, 2), "train_labels": np.arange(6)[:, None]}
    np.savez(npz, **arrays)
    monkeypatch.setenv("GECA_DATA_DIR", str(npz.parent))
    assert same_data("retinamnist", str(npz)) and not same_data("retinamnist", "synthetic-fundus")
    resaved, changed = tmp_path / "resaved.npz", tmp_path / "changed.npz"
    np.savez_compressed(resaved, **dict(reversed(arrays.items())))
    np.savez(changed, **{**arrays, "train_labels": arrays["train_labels"][::-1]})
    assert resaved.read_bytes() != npz.read_bytes()
    assert same_data(str(resaved), "retinamnist", b_key=source_key("retinamnist"))
    assert not same_data(str(changed), "retinamnist", b_key=source_key("retinamnist"))
    # geca recorded an npz's path as its key before keys were by content
    assert same_data("retinamnist", "x.npz", b_key=str(npz.resolve())) and not same_data(str(changed), "x.npz",
                                                                                             b_key=str(npz.resolve()))


def test_folder_csv_one_rgb_image_makes_the_set_rgb(tmp_path):
    ds = load_split(str(_folder(tmp_path, rgb_one=True)), "all")
    assert ds.images.shape == (6, 8, 8, 3)
    assert ds.images[0, 0, 0].tolist() == [255, 0, 0] and ds.images[1, 0, 0].tolist() == [10, 10, 10]


def test_folder_csv_multilabel_rule(tmp_path):
    root = tmp_path / "ds"
    for i in range(3):
        _png(root / f"{i}.png", np.zeros((4, 4), np.uint8))
    rows = [{"filename": "0.png", "a": 1, "b": 0}, {"filename": "1.png", "a": 0, "b": 1}]
    assert not read_table(_csv(root / "onehot.csv", rows)).multilabel
    both = rows + [{"filename": "2.png", "a": 1, "b": 1}]
    assert read_table(_csv(root / "both.csv", both)).multilabel
    none = rows + [{"filename": "2.png", "a": 0, "b": 0}]
    ds = load_folder_csv(_csv(root / "none.csv", none))
    assert ds.multilabel and ds.labels.tolist() == [[1, 0], [0, 1], [0, 0]]
    (root / "long.csv").write_text("filename,a,b\n0.png,1,0,\n1.png,0,1,1\n")  # a label with no column
    with pytest.raises(DataError, match="long.csv: line 3: 4 fields, the header has 3"):
        read_table(root / "long.csv")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_folder_csv_rejects_paths_outside_the_root(tmp_path, kind):
    csv_path = _folder(tmp_path)
    outside = tmp_path / "x.png"
    _png(outside, np.zeros((8, 8), np.uint8))
    name = {"dotdot": "../x.png", "absolute": str(outside), "symlink": "img/link.png"}[kind]
    if kind == "symlink":
        (csv_path.parent / name).symlink_to(outside)
    rows = _rows(csv_path)
    rows[3]["filename"] = name
    _csv(csv_path, rows)
    with pytest.raises(DataError) as err:
        load_folder_csv(csv_path)
    assert "line 5" in str(err.value) and repr(name) in str(err.value)


def test_folder_csv_symlink_inside_the_root_is_fine(tmp_path):
    csv_path = _folder(tmp_path)
    (csv_path.parent / "img/link.png").symlink_to(csv_path.parent / "img/1.png")
    rows = _rows(csv_path)
    rows[0]["filename"] = "img/link.png"
    ds = load_folder_csv(_csv(csv_path, rows))
    assert int(ds.images[0, 0, 0, 0]) == 10


def test_folder_csv_unreadable_image(tmp_path):
    csv_path = _folder(tmp_path)
    (csv_path.parent / "img/2.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError) as err:
        load_folder_csv(csv_path)
    assert str(csv_path.parent / "img/2.png") in str(err.value) and "unreadable" in str(err.value)


def test_folder_csv_image_too_large_to_decode(tmp_path, monkeypatch):
    """PIL refuses images over twice MAX_IMAGE_PIXELS (decompression bombs) with an error that is no OSError."""
    csv_path = _folder(tmp_path)
    _png(csv_path.parent / "img/2.png", np.zeros((8, 16), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60)  # the others are 8×8: 64 pixels, a warning only
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(DataError, match="img/2.png: unreadable image"):
        load_folder_csv(csv_path)


def test_folder_csv_truncated_image(tmp_path):
    csv_path = _folder(tmp_path)
    big = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    _png(csv_path.parent / "img/2.png", big)
    data = (csv_path.parent / "img/2.png").read_bytes()
    (csv_path.parent / "img/2.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="img/2.png"):
        load_folder_csv(csv_path)


def test_folder_csv_non_binary_label(tmp_path):
    csv_path = _folder(tmp_path)
    rows = _rows(csv_path)
    rows[2]["b"] = "2"
    _csv(csv_path, rows)
    with pytest.raises(DataError) as err:
        load_folder_csv(csv_path)
    assert "line 4" in str(err.value) and "'b'" in str(err.value) and "'2'" in str(err.value)


def test_folder_csv_sizes_and_centre_crop(tmp_path):
    csv_path = _folder(tmp_path)
    tall = np.zeros((12, 8), np.uint8)
    tall[:2] = tall[-2:] = 255  # only the centre 8x8 (all black) should survive
    _png(csv_path.parent / "img/0.png", tall)
    with pytest.raises(DataError, match="image_size"):
        load_folder_csv(csv_path)
    ds = load_folder_csv(csv_path, image_size=8)
    assert ds.images.shape == (6, 8, 8, 1) and np.all(ds.images[0] == 0)
    assert load_folder_csv(csv_path, image_size=4).images.shape == (6, 4, 4, 1)


def test_folder_csv_splits_need_folds(tmp_path):
    csv_path = _folder(tmp_path)
    with pytest.raises(DataError, match="geca folds"):
        load_split(str(csv_path), "train")
    with pytest.raises(DataError, match="train, val, test, all"):
        load_split(str(csv_path), "validation")


def test_folder_csv_splits_from_folds_file(tmp_path):
    csv_path = _folder(tmp_path, n=8)
    names = [f"img/{i}.png" for i in range(8)]
    folds_path = tmp_path / "folds.csv"
    write_folds(folds_path, names, [f"p{i // 2}" for i in range(8)], np.array([0, 0, 1, 1, 2, 2, 3, 3]))
    parts = {
        s: load_split(str(csv_path), s, folds_file=folds_path, fold=3, cv_val="next-fold").ids
        for s in ("train", "val", "test")
    }
    assert parts == {"test": names[6:], "val": names[:2], "train": names[2:6]}
    with pytest.raises(DataError, match="out of range"):
        load_split(str(csv_path), "test", folds_file=folds_path, fold=4)


# ---------------------------------------------------------------- folds


def _patients(n_patients=300, seed=0):
    """Patients with 1-4 images and three labels of prevalence ~5%, 30%, 50%."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_patients)
    patient_labels = (rng.random((n_patients, 3)) < [0.05, 0.3, 0.5]).astype(np.float32)
    groups = np.repeat(np.array([f"P{i:03d}" for i in range(n_patients)]), sizes)
    return patient_labels[np.repeat(np.arange(n_patients), sizes)], groups


def _balanced(labels: np.ndarray, folds: np.ndarray, k: int) -> bool:
    overall = labels.mean(0)
    return all(np.all(np.abs(labels[folds == f].mean(0) - overall) <= 0.2 * overall + 0.01) for f in range(k))


def test_patient_folds_groups_balance_and_determinism():
    labels, groups = _patients()
    folds = patient_folds(labels, groups, k=5, seed=0)
    assert folds.shape == (len(labels),) and set(folds.tolist()) == set(range(5))
    for g in np.unique(groups):
        assert len(set(folds[groups == g].tolist())) == 1, f"patient {g} in two folds"
    sizes = np.bincount(folds, minlength=5)
    assert sizes.min() >= 0.8 * len(labels) / 5
    assert _balanced(labels, folds, 5)
    # The bound is tight enough to catch a stratifier that piles one label's positives into one fold.
    piled = np.where(labels[:, 0] > 0, 0, folds)
    assert not _balanced(labels, piled, 5)
    assert np.array_equal(folds, patient_folds(labels, groups, k=5, seed=0))
    assert not np.array_equal(folds, patient_folds(labels, groups, k=5, seed=1))


def test_patient_folds_needs_enough_groups():
    with pytest.raises(DataError, match="3 folds from 2"):
        patient_folds(np.eye(2)[[0, 1, 0]], np.array(["a", "b", "a"]), k=3, seed=0)


def test_folds_csv_round_trip_and_atomic_write(tmp_path):
    names = [f"f{i}.png" for i in range(6)]
    path = tmp_path / "sub/folds.csv"
    write_folds(path, names, ["a", "a", "b", "b", "c", "c"], np.array([0, 0, 1, 1, 2, 2]))
    assert sorted(p.name for p in path.parent.iterdir()) == ["folds.csv"]
    assert path.read_text().splitlines()[:2] == ["filename,patient_id,fold", "f0.png,a,0"]
    assert read_folds(path, names[::-1]).tolist() == [2, 2, 1, 1, 0, 0]
    before = path.read_bytes()
    with pytest.raises(ValueError):  # a failure mid-write must leave the old file intact
        write_folds(path, names, ["a"] * 6, np.array([0, 1, 2, 0, 1, "x"], dtype=object))
    assert path.read_bytes() == before and not (path.parent / "folds.csv.tmp").exists()


def test_folds_csv_validation(tmp_path):
    names = ["f0.png", "f1.png", "f2.png"]
    path = tmp_path / "folds.csv"
    write_folds(path, names, ["a", "b", "c"], np.array([0, 1, 2]))
    with pytest.raises(DataError, match="f9.png"):
        read_folds(path, names + ["f9.png"])
    with pytest.raises(DataError, match=r"f2\.png.* not in the dataset"):
        read_folds(path, names[:2])
    with pytest.raises(DataError, match="patient ids differ .*f1.png"):
        read_folds(path, names, ["a", "z", "c"])
    path.write_text("filename,patient_id,fold\nf0.png,a,0\nf1.png,b,one\nf2.png,c,2\n")
    with pytest.raises(DataError, match="line 3"):
        read_folds(path, names)
    path.write_text("filename,patient_id,fold\nf0.png,a,0\nf1.png,b,2\nf2.png,c,2\n")
    with pytest.raises(DataError, match=r"fold\(s\) \[1\]"):
        read_folds(path, names)
    with pytest.raises(DataError, match="not found"):
        read_folds(tmp_path / "absent.csv", names)


# ---------------------------------------------------------------- registry


def test_parse_spec():
    expected = ("synthetic-oct", {"patients": "80", "seed": "1"})
    assert parse_spec("synthetic-oct@patients=80,seed=1") == expected
    assert parse_spec("retinamnist") == ("retinamnist", {})
    assert parse_spec("runs/a@b/data.csv") == ("runs/a@b/data.csv", {})
    with pytest.raises(DataError, match="key=value"):
        parse_spec("synthetic-oct@patients=80,seed")


def _fake_procedural(monkeypatch) -> list[tuple]:
    calls: list[tuple] = []

    def synthetic_oct(split: str, *, size: int = 32, patients: int = 200, seed: int = 0) -> ImageSet:
        calls.append((split, size, patients, seed))
        return ImageSet(np.zeros((2, size, size, 1), np.uint8), np.eye(2), ["x", "y"], False, "fake")

    monkeypatch.setattr(registry, "PROCEDURAL", {"synthetic-oct": synthetic_oct})
    return calls


def test_procedural_options_and_image_size(monkeypatch):
    calls = _fake_procedural(monkeypatch)
    ds = load_split("synthetic-oct@patients=80,seed=1", "val", image_size=16)
    assert calls == [("val", 16, 80, 1)] and ds.images.shape == (2, 16, 16, 1)
    with pytest.raises(DataError, match="valid: size, patients, seed"):
        load_split("synthetic-oct@eyes=2", "train")
    with pytest.raises(DataError, match="integer"):
        load_split("synthetic-oct@seed=one", "train")
    with pytest.raises(DataError, match="valid: train, val, test, all"):
        load_split("synthetic-oct", "validation")
    assert len(calls) == 1  # the bad split was refused before reaching the generator


def test_real_procedural_sets_through_the_registry():
    pytest.importorskip("geca.data.procedural", reason="procedural datasets not written yet")
    oct_test = load_split("synthetic-oct@patients=10,seed=3", "test", image_size=16)
    assert oct_test.images.shape[1:] == (16, 16, 1) and oct_test.patient_ids is not None
    assert len(load_split("synthetic-oct@patients=30,seed=3", "test")) > len(oct_test)
    fundus = load_split("synthetic-fundus@n=4", "val")
    assert fundus.images.shape == (4, 28, 28, 3) and fundus.class_names == [f"grade {i}" for i in range(5)]


def test_registry_rejects_unknown_names_splits_and_stray_options(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'nosuchset'"):
        load_split("nosuchset", "train")
    path = _npz(tmp_path / "toy.npz")
    with pytest.raises(DataError, match="valid: train, val, test"):
        load_split(str(path), "all")
    with pytest.raises(DataError, match="valid here: none"):
        load_split(f"{path}@seed=1", "train")


# ---------------------------------------------------------------- geca folds


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("folds")(folds_command)
    app.callback()(lambda: None)  # keeps `folds` a named subcommand, as in the real CLI
    return app


def test_folds_cli_writes_a_valid_folds_file(tmp_path):
    csv_path = _folder(tmp_path, n=12)
    out = tmp_path / "out/folds.csv"
    result = CliRunner().invoke(_cli(), ["folds", "--data", str(csv_path), "--k", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = read_table(csv_path)
    folds = read_folds(out, table.filenames, table.patient_ids)
    assert sorted(set(folds.tolist())) == [0, 1, 2]
    assert "patients" in result.stdout and "fold 2" in result.stdout and "warning" not in result.output


def test_folds_cli_falls_back_to_eye_id_with_a_warning(tmp_path):
    csv_path = _folder(tmp_path, n=6)
    rows = [{k: v for k, v in r.items() if k != "patient_id"} for r in _rows(csv_path)]
    _csv(csv_path, rows)
    out = tmp_path / "folds.csv"
    result = CliRunner().invoke(_cli(), ["folds", "--data", str(csv_path), "--k", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "eye_id" in result.stderr and "warning" in result.stderr
    with open(out) as f:
        assert [r["patient_id"] for r in csv.DictReader(f)] == [f"e{i}" for i in range(6)]


def test_an_eye_id_belongs_to_one_patient_unless_it_is_a_laterality(tmp_path):
    csv_path = _folder(tmp_path, n=12)
    rows = _rows(csv_path)
    out = tmp_path / "folds.csv"

    def run() -> object:
        return CliRunner().invoke(_cli(), ["folds", "--data", str(csv_path), "--k", "3", "--out", str(out)])

    rows[2]["eye_id"] = "e0"  # p1's image under p0's eye: its patients could land in two folds
    _csv(csv_path, rows)
    result = run()
    assert result.exit_code == 2 and not out.exists(), result.output
    assert f"error: {csv_path}: eye_id 'e0' is listed under patient_ids 'p0', 'p1'" in result.output
    # OD/OS repeat across patients by design; the patients group the images, and each patient's OD is an eye
    _csv(csv_path, [{**r, "eye_id": "OD" if i % 2 else "os"} for i, r in enumerate(rows)])
    result = run()
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    eyes = load_folder_csv(csv_path, "all").eye_ids
    assert eyes.tolist()[:4] == ["p0-OS", "p0-OD", "p1-OS", "p1-OD"] and len(set(eyes)) == 12
    # one eye however its laterality is spelt; eyes numbered within each patient are that patient's too
    _csv(csv_path, [{**r, "eye_id": ("R", "right", "1", "2")[i % 2 + 2 * (i >= 6)]} for i, r in enumerate(rows)])
    eyes = load_folder_csv(csv_path, "all").eye_ids.tolist()
    assert eyes[:2] == ["p0-OD", "p0-OD"] and eyes[6:8] == ["p3-1", "p3-2"] and len(set(eyes)) == 9
    # without patient_id a laterality cannot group a patient's images
    out.unlink()
    _csv(csv_path, [{**{k: v for k, v in r.items() if k != "patient_id"}, "eye_id": "OD" if i % 2 else "os"}
                    for i, r in enumerate(rows)])
    result = run()
    assert result.exit_code == 2 and "eye_id holds laterality (OD, os)" in result.output and "patient_id" in \
        result.output, result.output


def test_folds_cli_missing_csv_exits_2_without_traceback(tmp_path):
    missing = tmp_path / "nope.csv"
    result = CliRunner().invoke(_cli(), ["folds", "--data", str(missing), "--out", str(tmp_path / "f.csv")])
    assert result.exit_code == 2
    assert str(missing) in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "f.csv").exists()


def test_a_tilde_the_shell_left_in_a_flag_is_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out=~/x` (bash expands no `~` there) and a quoted '~/x' write under the home folder, not into `./~`."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    csv_path = _folder(tmp_path, n=6)
    for flags in (["--data", "~/../ds/labels.csv", "--out=~/f.csv"], ["--data", str(csv_path), "--out", "~/g.csv"]):
        (tmp_path / "home").mkdir(exist_ok=True)
        result = CliRunner().invoke(_cli(), ["folds", "--k", "3", *flags])
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["f.csv", "g.csv"]
    assert not (tmp_path / "~").exists()


def test_cross_validation_trains_on_four_fifths_with_a_stratified_validation_slice(tmp_path: Path) -> None:
    from geca.data.folds import patient_folds
    from geca.downstream.protocol import Splits

    spec = "synthetic-oct@patients=120,size=8"
    everything = load_split(spec, "all")
    out = tmp_path / "folds.csv"
    write_folds(out, everything.ids, list(everything.patient_ids),
                patient_folds(everything.labels, everything.patient_ids, 5, seed=0))
    parts = {s: load_split(spec, s, folds_file=out, fold=1) for s in ("train", "val", "test")}
    patients = {s: set(p.patient_ids) for s, p in parts.items()}
    assert not (patients["train"] & patients["test"] or patients["val"] & patients["test"]
                or patients["train"] & patients["val"])
    assert sum(len(p) for p in parts.values()) == len(everything)
    rest = len(parts["train"]) + len(parts["val"])
    assert 0.12 <= len(parts["val"]) / rest <= 0.18  # the 15 % slice (whole patients)
    assert 0.62 <= len(parts["train"]) / len(everything) <= 0.74  # 4/5 × 85 % = 0.68 of the data
    prevalence = {s: p.labels.mean(0) for s, p in parts.items()}
    assert np.abs(prevalence["val"] - prevalence["train"]).max() < 0.12  # label-stratified
    old = {s: load_split(spec, s, folds_file=out, fold=1, cv_val="next-fold") for s in ("val", "test")}
    assert set(old["val"].ids) == {i for i, f in zip(everything.ids, _fold_column(out), strict=True) if f == 2}
    # The classifier's training patients are the generator's (the same rows of the same split).
    split = Splits(spec, None, out, None).get(1)
    assert split.train.ids == parts["train"].ids and split.val.ids == parts["val"].ids
    with pytest.raises(DataError, match="next-fold"):
        load_split(spec, "train", folds_file=out, fold=1, cv_val="random")


def _fold_column(path: Path) -> list[int]:
    import csv

    return [int(r["fold"]) for r in csv.DictReader(open(path))]


def test_folds_file_splits_a_procedural_set_by_patient(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from geca.cli.main import app

    spec = "synthetic-oct@patients=30,size=16"
    out = tmp_path / "folds.csv"
    res = CliRunner().invoke(app, ["folds", "--data", spec, "--k", "5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    parts = {s: load_split(spec, s, folds_file=out, fold=2) for s in ("train", "val", "test")}
    everything = load_split(spec, "all")
    assert sum(len(p) for p in parts.values()) == len(everything)
    patients = {s: set(p.patient_ids) for s, p in parts.items()}
    assert not (patients["train"] & patients["test"]) and not (patients["val"] & patients["test"])
    assert not (patients["train"] & patients["val"])


def test_an_npz_names_its_own_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {f"{s}_{k}": (rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8) if k == "images" else
                           (np.arange(6) % 3)[:, None].astype(np.uint8)) for s in ("train", "val", "test")
              for k in ("images", "labels")}
    inline = tmp_path / "inline.npz"
    np.savez(inline, **arrays, class_names=np.array(["healthy", "mild", "severe"]))
    assert medmnist_npz.load_npz(inline, "train").class_names == ["healthy", "mild", "severe"]
    beside = tmp_path / "beside.npz"
    np.savez(beside, **arrays)
    assert medmnist_npz.load_npz(beside, "train").class_names == ["class 0", "class 1", "class 2"]
    (tmp_path / "beside.json").write_text('{"class_names": ["a", "b", "c"]}')
    assert medmnist_npz.load_npz(beside, "test").class_names == ["a", "b", "c"]
    # The names set the class count: a label beyond them is named, in whichever split it is
    (tmp_path / "beside.json").write_text('{"class_names": ["a", "b"]}')
    with pytest.raises(DataError, match=r"train_labels\[2\] = 2 is out of range for 2 classes"):
        medmnist_npz.load_npz(beside, "test")
    (tmp_path / "beside.json").write_text('{"class_names": ["a", "b", "c", "unseen"]}')
    assert medmnist_npz.load_npz(beside, "val").labels.shape == (6, 4)
    (tmp_path / "beside.json").write_text('{"class_names": ["a", "a", "b"]}')
    with pytest.raises(DataError, match="beside.json: class_names must be the distinct"):
        medmnist_npz.load_npz(beside, "test")
    # Without names, a stray large label makes classes no image has: said, not silently trained
    arrays["val_labels"][0] = 5
    np.savez(tmp_path / "stray.npz", **arrays)
    with pytest.warns(UserWarning, match="class.es. 3, 4 have no image in any split"):
        assert medmnist_npz.load_npz(tmp_path / "stray.npz", "train").labels.shape == (6, 6)


def test_a_published_file_is_known_by_its_contents_under_any_name(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Its class names come with it when it is copied or linked under another name (a copy was 'class 0', …, and
    refused beside a run trained on the original)."""
    arrays = {f"{s}_{k}": v for s in ("train", "val", "test") for k, v in
              (("images", np.zeros((2, 4, 4), np.uint8)), ("labels", np.array([[0], [1]])))}
    np.savez(tmp_path / "tinymnist.npz", **arrays)
    md5 = hashlib.md5((tmp_path / "tinymnist.npz").read_bytes()).hexdigest()
    monkeypatch.setitem(medmnist_npz.KNOWN_DATASETS, "tinymnist", medmnist_npz.KnownDataset(("a", "b"), md5, ""))
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "tinymnist.npz", tmp_path / "elsewhere" / "copy.npz")
    (tmp_path / "link.npz").symlink_to(tmp_path / "tinymnist.npz")
    for name in ("tinymnist.npz", "elsewhere/copy.npz", "link.npz"):
        assert medmnist_npz.load_npz(tmp_path / name, "val").class_names == ["a", "b"], name
    arrays["val_labels"] = np.array([[1], [0]])  # other contents under no known name: its own classes
    np.savez(tmp_path / "mine.npz", **arrays)
    assert medmnist_npz.load_npz(tmp_path / "mine.npz", "val").class_names == ["class 0", "class 1"]
    (tmp_path / "mine.json").write_text('["a", "b"]')  # the sidecar's form is said, not a Python error
    with pytest.raises(DataError, match=r'mine.json: a JSON list; expected an object, \{"class_names": \["first"'):
        medmnist_npz.load_npz(tmp_path / "mine.npz", "val")


def test_a_labels_csv_is_multilabel_where_its_geca_manifest_says_so(tmp_path):
    root = tmp_path / "set"
    for i in range(2):
        _png(root / f"{i}.png", np.zeros((4, 4), np.uint8))
    rows = [{"filename": "0.png", "a": 1, "b": 0}, {"filename": "1.png", "a": 0, "b": 1}]
    other = _csv(root / "other.csv", rows)
    labels = _csv(root / "labels.csv", rows)
    assert not load_folder_csv(labels).multilabel
    (root / "manifest.json").write_text(json.dumps({"num_images": 2, "multilabel": True, "geca_version": "0.3"}))
    assert load_folder_csv(labels).multilabel
    assert not load_folder_csv(other).multilabel  # the manifest speaks for labels.csv only
    # as data, a set cut down by hand still loads; another tool's manifest, or a damaged one, says nothing
    for foreign in ({"num_images": 3, "multilabel": True, "geca_version": "0.3"}, {"num_images": 1200}, "{"):
        (root / "manifest.json").write_text(foreign if isinstance(foreign, str) else json.dumps(foreign))
        assert load_folder_csv(labels).multilabel is ("geca_version" in foreign)


def test_one_dataset_stored_as_npz_or_as_pngs_gives_the_same_pixels_at_another_size(tmp_path):
    """Both loaders centre-crop and resize alike (the CSV loader used PIL's resampling: up to a grey level apart)."""
    arrays = _arrays(n=(3, 1, 1), size=9, channels=1)
    arrays["train_images"] = np.random.default_rng(1).integers(0, 256, (3, 40, 50), dtype=np.uint8)
    npz = tmp_path / "set.npz"
    np.savez(npz, **arrays)
    for i, image in enumerate(arrays["train_images"]):
        _png(tmp_path / "pngs" / f"{i}.png", image)
    rows = [{"filename": f"{i}.png", "a": int(i == 0), "b": int(i != 0)} for i in range(3)]
    from_pngs = load_folder_csv(_csv(tmp_path / "pngs" / "labels.csv", rows), image_size=28)
    from_npz = load_split(str(npz), "train", image_size=28)
    assert from_npz.images.shape == (3, 28, 28, 1)
    assert (from_pngs.images == from_npz.images).all()
