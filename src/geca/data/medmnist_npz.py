"""MedMNIST-format npz files: ``{train,val,test}_{images,labels}`` arrays, by path or by dataset name."""

from __future__ import annotations

import json
import os
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geca.data.imageset import ImageSet
from geca.errors import DataError
from geca.utils.images import fit_square
from geca.utils.io import file_digest, per_file_version

SPLITS = ("train", "val", "test")
_ZENODO = "https://zenodo.org/records/10519652/files/{}.npz?download=1"


@dataclass(frozen=True)
class KnownDataset:
    """A published MedMNIST (28 px) file: class names fix K; MD5 and URL allow a checked download."""

    class_names: tuple[str, ...]
    md5: str
    url: str
    multilabel: bool = False


KNOWN_MAX_BYTES = 400 * 2**20  # beyond the largest 28-px MedMNIST file

KNOWN_DATASETS: dict[str, KnownDataset] = {
    "retinamnist": KnownDataset(
        tuple(f"grade {i}" for i in range(5)), "bd4c0672f1bba3e3a89f0e4e876791e4",
        _ZENODO.format("retinamnist"),
    ),
    "pathmnist": KnownDataset(
        ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
         "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
        "a8b06965200029087d5bd730944a56c1", _ZENODO.format("pathmnist"),
    ),
    "chestmnist": KnownDataset(
        ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
         "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"),
        "02c8a6516a18b556561a56cbdd36c4a8", _ZENODO.format("chestmnist"), multilabel=True,
    ),
    "dermamnist": KnownDataset(
        ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
         "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
         "vascular lesions"),
        "0744692d530f8e62ec473284d019b0c7", _ZENODO.format("dermamnist"),
    ),
    "octmnist": KnownDataset(
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        "c68d92d5b585d8d81f7112f81e2d0842", _ZENODO.format("octmnist"),
    ),
    "pneumoniamnist": KnownDataset(
        ("normal", "pneumonia"), "28209eda62fecd6e6a2d98b1501bb15f", _ZENODO.format("pneumoniamnist")
    ),
    "breastmnist": KnownDataset(
        ("malignant", "normal, benign"), "750601b1f35ba3300ea97c75c52ff8f6", _ZENODO.format("breastmnist")
    ),
    "bloodmnist": KnownDataset(
        ("basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte", "monocyte",
         "neutrophil", "platelet"),
        "7053d0359d879ad8a5505303e11de1dc", _ZENODO.format("bloodmnist"),
    ),
}


def data_dirs() -> list[Path]:
    """Where dataset names are looked up, in order: ``$GECA_DATA_DIR`` (if set), then ``~/.medmnist``."""
    dirs = []
    if os.environ.get("GECA_DATA_DIR"):
        dirs.append(Path(os.environ["GECA_DATA_DIR"]).expanduser())
    dirs.append(Path.home() / ".medmnist")
    return dirs


def find_npz(name: str) -> Path | None:
    """The first ``NAME.npz`` in :func:`data_dirs`, or None."""
    for d in data_dirs():
        if (d / f"{name}.npz").is_file():
            return d / f"{name}.npz"
    return None


def _md5(path: Path) -> str:
    return file_digest(path, "md5")


def download_dataset(name: str) -> Path:
    """Fetch a known dataset into the first data dir; it gets its final name only once its MD5 matches."""
    info = KNOWN_DATASETS.get(name)
    if info is None:
        raise DataError(f"cannot download '{name}': not a known dataset (known: {', '.join(KNOWN_DATASETS)})")
    dest = data_dirs()[0] / f"{name}.npz"
    tmp = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(info.url, timeout=60) as response, open(tmp, "wb") as f:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
        got = _md5(tmp)
        if got != info.md5:
            raise DataError(f"{info.url}: MD5 {got} does not match the expected {info.md5}; "
                            f"download to {dest} discarded")
        os.replace(tmp, dest)
    except OSError as exc:  # urllib's URLError is an OSError
        raise DataError(f"download of {name} from {info.url} to {dest} failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def resolve_npz(name_or_path: str | Path, *, download: bool = False) -> Path:
    """The npz file for a path, or for a dataset name looked up in :func:`data_dirs` (fetched on request)."""
    text = str(name_or_path)
    if text.endswith(".npz") or os.sep in text or "/" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: npz file not found")
        return path
    found = find_npz(text)
    if found is not None:
        return found
    if download:
        return download_dataset(text)
    where = ", ".join(str(d) for d in data_dirs())
    known = ", ".join(KNOWN_DATASETS)
    hint = "; pass --download to fetch it" if text in KNOWN_DATASETS else f" (downloadable: {known})"
    raise DataError(f"{text}.npz not found in {where}{hint}")


def _known(path: Path) -> tuple[str, KnownDataset] | None:
    """The published MedMNIST file `path` is (name, entry), by its name (a link's target's too) or, under another
    name, by its MD5 (those files are at most a few hundred MB; a larger file is none of them and is not hashed)."""
    for name in (path.stem, path.resolve().stem):
        if name in KNOWN_DATASETS:
            return name, KNOWN_DATASETS[name]
    if path.stat().st_size > KNOWN_MAX_BYTES:
        return None
    digest = _cached_md5(path)
    return next(((name, known) for name, known in KNOWN_DATASETS.items() if known.md5 == digest), None)


_cached_md5 = per_file_version(_md5)  # each split of a file is loaded on its own


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(6)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    keys = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
    if path.is_file() and not _head(path).startswith((b"PK", b"\x93NUMPY")):
        # numpy would try it as a pickle and suggest allow_pickle, which we never set
        raise DataError(f"{path}: not an npz file (it is not a zip archive)")
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a valid npz (zip) file: {exc}") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single array, not an npz archive with keys {', '.join(keys)}")
    with npz:
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise DataError(f"{path}: missing key(s) {', '.join(missing)}; expected {', '.join(keys)}")
        try:
            return {k: npz[k] for k in [*keys, *(["class_names"] if "class_names" in npz.files else [])]}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt npz member: {exc}") from exc
        except MemoryError as exc:  # a member whose header claims a shape far larger than the file
            raise DataError(f"{path}: an npz member too large to load ({exc})") from None


def _check_images(path: Path, key: str, images: np.ndarray) -> np.ndarray:
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {key} must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{path}: {key} must be (N,H,W) grey or (N,H,W,3) RGB, got shape {images.shape}")
    return images


def _check_labels(path: Path, key: str, labels: np.ndarray, n: int) -> None:
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise DataError(f"{path}: {key} must hold integers, got {labels.dtype}")
    if labels.ndim != 2:
        raise DataError(f"{path}: {key} must be (N,1) class indices or (N,K) multi-hot, "
                        f"got shape {labels.shape}")
    if len(labels) != n:
        raise DataError(f"{path}: {key} has {len(labels)} rows but the images have {n}")


def _class_names(path: Path, arrays: dict[str, np.ndarray], k: int | None) -> list[str] | None:
    """The file's own class names: a `class_names` string array in the npz, or a sidecar NAME.json holding
    {"class_names": [...]}; None when it has neither. `k`: how many there must be (None: any number)."""
    names: Any = None
    where = path
    if "class_names" in arrays:
        names = arrays["class_names"].tolist()
    elif (sidecar := path.with_suffix(".json")).is_file():
        where = sidecar
        expected = '{"class_names": ["first", "second", …]}'
        try:
            names = json.loads(sidecar.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{sidecar}: not JSON; expected {expected}") from None
        if not isinstance(names, dict):
            raise DataError(f"{sidecar}: a JSON {type(names).__name__}; expected an object, {expected}")
        names = names.get("class_names")
    if names is None:
        return None
    if not isinstance(names, list) or not names or len(names) != (k or len(names)) \
            or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise DataError(f"{where}: class_names must be {k or 'the'} distinct non-empty strings, got {names!r}")
    return names


def load_npz(
    name_or_path: str | Path, split: str, *, image_size: int | None = None, download: bool = False
) -> ImageSet:
    """Load one split of a MedMNIST-format npz.

    Labels ``(N,1)`` are class indices (K from the known-dataset table, else the largest label over all
    splits + 1), stored one-hot; labels ``(N,K)`` with K > 1 are 0/1 multi-hot (``multilabel=True``).
    """
    if split == "all":
        raise DataError(f"{name_or_path}: an npz dataset has no split 'all' (valid: {', '.join(SPLITS)}), the one "
                        "cross-validation folds are made from; a folder+CSV dataset or synthetic-oct has it")
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' for an npz dataset; valid: {', '.join(SPLITS)}")
    path = resolve_npz(name_or_path, download=download)
    arrays = _read_arrays(path)
    for s in SPLITS:
        images = arrays[f"{s}_images"] = _check_images(path, f"{s}_images", arrays[f"{s}_images"])
        _check_labels(path, f"{s}_labels", arrays[f"{s}_labels"], len(images))
    widths = {arrays[f"{s}_labels"].shape[1] for s in SPLITS}
    if len(widths) != 1:
        raise DataError(f"{path}: label arrays disagree on their width: {sorted(widths)}")
    width = widths.pop()
    found = _known(path)
    known_name, known = found if found is not None else ("", None)
    multilabel = width > 1
    if known is not None and known.multilabel != multilabel:
        expect = f"(N,{len(known.class_names)}) multi-hot" if known.multilabel else "(N,1) class indices"
        raise DataError(f"{path}: {known_name} labels must be {expect}, got width {width}")

    labels = arrays[f"{split}_labels"].astype(np.int64)
    if multilabel:
        k = width
        own = _class_names(path, arrays, k)
        if known is not None and k != len(known.class_names):
            raise DataError(f"{path}: {known_name} has {len(known.class_names)} labels, got {k} columns")
        bad = np.argwhere((labels != 0) & (labels != 1))
        if len(bad):
            row, col = bad[0]
            raise DataError(f"{path}: {split}_labels[{row}, {col}] = {labels[row, col]}; "
                            "multi-hot values must be 0 or 1")
        onehot = labels
    else:
        indices = {s: arrays[f"{s}_labels"][:, 0].astype(np.int64) for s in SPLITS}
        all_idx = np.concatenate(list(indices.values()))
        own = _class_names(path, arrays, None if known is None else len(known.class_names))
        k = len(known.class_names) if known is not None else len(own) if own else int(all_idx.max(initial=0)) + 1
        if known is None and own is None and k > max(len(all_idx), 1000):  # or np.eye(k) takes terabytes
            raise DataError(f"{path}: the largest label, {k - 1}, would make {k} classes for {len(all_idx)} images; "
                            "labels are class indices 0..K-1 (give the file class_names to set K)")
        for s, idx in indices.items():  # every split, so that a bad label is found whichever split is loaded first
            bad = np.flatnonzero((idx < 0) | (idx >= k))
            if len(bad):
                row = bad[0]
                raise DataError(f"{path}: {s}_labels[{row}] = {idx[row]} is out of range for {k} classes "
                                f"(expected 0..{k - 1})")
        empty = np.flatnonzero(np.bincount(all_idx, minlength=k) == 0)
        if known is None and own is None and len(empty):
            warnings.warn(f"{path}: class(es) {', '.join(map(str, empty))} have no image in any split; the class "
                          f"count is read as the largest label + 1 = {k} (give the file class_names to set it)",
                          stacklevel=2)
        onehot = np.eye(k, dtype=np.float32)[labels[:, 0]]
    class_names = own or (list(known.class_names) if known is not None else [f"class {i}" for i in range(k)])

    images = arrays[f"{split}_images"]
    h, w = images.shape[1:3]
    side = min(h, w)
    if h != w and image_size is None:
        raise DataError(f"{path}: {split}_images are {h}×{w}; geca needs square images (pass --image-size to "
                        "centre-crop and resize them)")
    resized = image_size is not None and side != image_size
    if image_size is not None:
        images = fit_square(images, image_size)
    return ImageSet(
        images=images,
        labels=onehot.astype(np.float32),
        class_names=class_names,
        multilabel=multilabel,
        source=str(path),
        ids=[f"{split}/{i}" for i in range(len(images))],
        native_size=side if resized else None,
    )
