"""Folder + CSV datasets (OCT-ML style): images under a root, one CSV row per image with 0/1 label columns."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from geca.data.folds import fold_split_rows, group_ids, read_folds
from geca.data.imageset import ImageSet
from geca.errors import DataError
from geca.utils.images import fit_square
from geca.utils.io import read_json_object

ID_COLUMNS = ("filename", "patient_id", "eye_id")
SPLITS_WITH_FOLDS = ("train", "val", "test", "all")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass
class CsvTable:
    """The validated CSV: filenames relative to ``root``, their resolved paths, and 0/1 labels (N, K)."""

    csv_path: Path
    root: Path
    filenames: list[str]
    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]
    patient_ids: np.ndarray | None
    eye_ids: np.ndarray | None

    @property
    def multilabel(self) -> bool:
        """Multi-label unless every row has exactly one positive label (then it is multi-class)."""
        return not bool(np.all(self.labels.sum(1) == 1))


def read_manifest(directory: Path, rows: int) -> dict[str, Any] | None:
    """A sample set's manifest.json (None where there is none: another tool's set), checked against the `rows` of its
    labels.csv: a CSV cut at a line boundary still parses, and only the count recorded at writing shows it."""
    path = Path(directory) / "manifest.json"
    if not path.exists():
        return None
    manifest = read_json_object(path, DataError)
    recorded = manifest.get("num_images")
    if isinstance(recorded, int) and recorded != rows:
        raise DataError(f"{Path(directory) / 'labels.csv'}: {rows} rows, but its manifest.json records {recorded} "
                        "images: the set was cut short or edited since it was written")
    return manifest


def _recorded_multilabel(table: CsvTable) -> bool:
    """Whether geca's manifest.json beside a labels.csv records the set as multi-label: its rows alone cannot show it
    where each happens to be one-hot. Another tool's manifest, or none, says nothing; nor is its count checked here:
    a set cut down by hand is still data (`read_manifest` checks a sample set)."""
    path = table.csv_path.parent / "manifest.json"
    if table.csv_path.name != "labels.csv" or not path.is_file():
        return False
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(meta, dict) and "geca_version" in meta and meta.get("multilabel") is True


def _safe_path(csv_path: Path, root: Path, line: int, name: str) -> Path:
    """The file a row names, refusing anything that leaves the data root (absolute, ``..``, symlinks)."""
    where = f"{csv_path}: line {line}: filename {name!r}"
    if not name:
        raise DataError(f"{where}: empty filename")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        raise DataError(f"{where}: absolute paths are not allowed; give a path relative to {root}")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise DataError(f"{where}: '..' is not allowed; files must lie under {root}")
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise DataError(f"{where}: resolves to {path}, outside the data root {root}")
    if not path.is_file():
        raise DataError(f"{where}: image file {path} not found")
    return path


def _id_column(rows: list[dict[str, str]], column: str, csv_path: Path) -> np.ndarray:
    values = [(row[column] or "").strip() for row in rows]
    blank = [i for i, v in enumerate(values) if not v]
    if blank:
        raise DataError(f"{csv_path}: line {blank[0] + 2}: empty {column}")
    return np.array(values)


def read_table(csv_path: str | Path, root: str | Path | None = None) -> CsvTable:
    """Parse and validate the CSV without decoding any image (enough for making folds)."""
    csv_path = Path(csv_path)
    root = (Path(root) if root is not None else csv_path.parent).resolve()
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # tolerate a spreadsheet BOM
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            rows = list(reader)
    except FileNotFoundError as exc:
        raise DataError(f"{csv_path}: CSV file not found") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path}: unreadable CSV: {exc}") from exc
    if "filename" not in header:
        raise DataError(f"{csv_path}: needs a 'filename' column, got columns {header}")
    class_names = [h for h in header if h not in ID_COLUMNS]
    if not class_names:
        raise DataError(f"{csv_path}: needs at least one 0/1 label column besides {', '.join(ID_COLUMNS)}")
    if not rows:
        raise DataError(f"{csv_path}: has no rows")

    filenames, paths = [], []
    labels = np.zeros((len(rows), len(class_names)), dtype=np.float32)
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        line = i + 2  # the header is line 1
        if any(v.strip() for v in row.get(None) or []):  # csv.DictReader's key for fields beyond the header's
            raise DataError(f"{csv_path}: line {line}: {len(header) + len(row[None])} fields, the header has "
                            f"{len(header)}")
        name = (row["filename"] or "").strip()
        if name in seen:
            raise DataError(f"{csv_path}: line {line}: filename {name!r} already on line {seen[name]}")
        seen[name] = line
        paths.append(_safe_path(csv_path, root, line, name))
        filenames.append(name)
        for j, column in enumerate(class_names):
            value = (row[column] or "").strip()
            if value not in ("0", "1"):
                raise DataError(f"{csv_path}: line {line} (filename {name!r}), column {column!r}: "
                                f"expected 0 or 1, got {value!r}")
            labels[i, j] = float(value)
    patient_ids = _id_column(rows, "patient_id", csv_path) if "patient_id" in header else None
    eye_ids = _id_column(rows, "eye_id", csv_path) if "eye_id" in header else None
    if eye_ids is not None:
        eye_ids = _own_eye_ids(csv_path, eye_ids, patient_ids)
    return CsvTable(csv_path=csv_path, root=root, filenames=filenames, paths=paths, labels=labels,
                    class_names=class_names, patient_ids=patient_ids, eye_ids=eye_ids)


LATERALITY = {"od": "OD", "r": "OD", "re": "OD", "right": "OD", "os": "OS", "l": "OS", "le": "OS", "left": "OS",
              "ou": "OU"}


def _own_eye_ids(csv_path: Path, eye_ids: np.ndarray, patient_ids: np.ndarray | None) -> np.ndarray:
    """One id per eye. An eye_id is either numbered within its patient (a laterality, OD/OS, R/L, or 1/2: fewer
    distinct ids than patients), which becomes PATIENT-ID (lateralities spelt OD/OS) so that eye-level scores do not
    merge every patient's right eyes into one, or one eye's own id, which must belong to one patient, else that
    eye's images could land in two folds under two patient ids."""
    laterality = {str(e).lower() for e in eye_ids} <= LATERALITY.keys()
    if patient_ids is None:
        if laterality:
            raise DataError(f"{csv_path}: eye_id holds laterality ({', '.join(sorted(set(eye_ids.tolist())))}), "
                            "which cannot group a patient's images into one fold; add a patient_id column")
        return eye_ids
    if laterality or len(set(eye_ids.tolist())) < len(set(patient_ids.tolist())):
        return np.array([f"{p}-{LATERALITY.get(str(e).lower(), e)}"
                         for p, e in zip(patient_ids.tolist(), eye_ids.tolist(), strict=True)])
    owners: dict[str, set[str]] = {}
    for eye, patient in zip(eye_ids.tolist(), patient_ids.tolist(), strict=True):
        owners.setdefault(eye, set()).add(patient)
    shared = {eye: sorted(p) for eye, p in owners.items() if len(p) > 1}
    if shared:
        eye, patients = next(iter(shared.items()))
        more = f" (and {len(shared) - 1} more eye_ids)" if len(shared) > 1 else ""
        raise DataError(f"{csv_path}: eye_id {eye!r} is listed under patient_ids {', '.join(map(repr, patients))}"
                        f"{more}; one eye belongs to one patient (ids numbered within each patient, such as OD/OS or "
                        "1/2, may repeat: then there are fewer distinct eye_ids than patients)")
    return eye_ids


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:  # the last is no OSError
        raise DataError(f"{path}: unreadable image: {exc}") from None


def _decode(path: Path, grey: bool, image_size: int | None) -> np.ndarray:
    try:
        with _open(path) as img:
            if grey and img.mode.startswith("I;16"):
                # PIL's convert("L") clips 16-bit values at 255 instead of rescaling them.
                img = Image.fromarray((np.asarray(img, dtype=np.float32) / 257.0).round().astype(np.uint8))
            array = np.asarray(img.convert("L" if grey else "RGB"), dtype=np.uint8)
    # Truncated or corrupt pixel data only surfaces on decode, not in Image.open.
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image: {exc}") from exc
    array = array[..., None] if grey else array
    return array if image_size is None else fit_square(array[None], image_size)[0]


def _split_rows(table: CsvTable, split: str, folds_file: str | Path | None, fold: int, cv_val: str) -> np.ndarray:
    if split not in SPLITS_WITH_FOLDS:
        raise DataError(f"unknown split '{split}'; valid: {', '.join(SPLITS_WITH_FOLDS)}")
    if split == "all":
        return np.arange(len(table.filenames))
    if folds_file is None:
        raise DataError(f"{table.csv_path}: split '{split}' needs a folds file; only 'all' is available "
                        f"without one. Create it with `geca folds --data {table.csv_path} --out folds.csv`")
    folds = read_folds(folds_file, table.filenames, table.patient_ids)
    groups, _ = group_ids(table.filenames, table.patient_ids, table.eye_ids)
    return fold_split_rows(folds, split, fold, folds_file, table.labels, groups, cv_val)


def load_folder_csv(
    csv_path: str | Path,
    split: str = "all",
    *,
    root: str | Path | None = None,
    image_size: int | None = None,
    folds_file: str | Path | None = None,
    fold: int = 0,
    cv_val: str = "slice",
) -> ImageSet:
    """Load a split of a folder + CSV dataset.

    The CSV has a ``filename`` column (relative to ``root``, default: the CSV's folder), optional
    ``patient_id`` and ``eye_id`` columns, and every other column is a 0/1 label. The set is multi-label
    unless every row has exactly one positive label, in which case it is multi-class (one-hot), or unless a
    ``labels.csv`` has a geca ``manifest.json`` beside it recording ``multilabel: true`` (a one-hot set sampled from
    multi-label data).
    Images are grey (1 channel) when every image in the CSV is grey, else RGB. Without ``image_size`` all
    images must share one square size; with it, each is centre-cropped to a square and resized.
    Splits need a folds file: ``test`` is fold ``fold``, and ``val``/``train`` split the other folds' patients as
    ``cv_val`` says (``folds.fold_split_rows``); ``all`` is every row and needs no folds file.
    """
    table = read_table(csv_path, root)
    rows = _split_rows(table, split, folds_file, fold, cv_val)
    # Headers only (no pixel decoding): channels and the size check must agree across every split.
    modes, sizes = set(), set()
    for path in table.paths:
        with _open(path) as img:
            modes.add(img.mode)
            sizes.add(img.size)
    grey = modes <= _GREY_MODES
    if image_size is None and (len(sizes) > 1 or any(w != h for w, h in sizes)):
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:5])
        raise DataError(f"{table.csv_path}: images must all have one square size unless image_size is given; "
                        f"found {shown}")
    images = [_decode(table.paths[i], grey, image_size) for i in rows]
    channels = 1 if grey else 3
    size = image_size if image_size is not None else next(iter(sizes))[0]
    return ImageSet(
        images=np.stack(images) if images else np.zeros((0, size, size, channels), dtype=np.uint8),
        labels=table.labels[rows],
        class_names=list(table.class_names),
        multilabel=_recorded_multilabel(table) or table.multilabel,
        source=str(table.csv_path),
        ids=[table.filenames[i] for i in rows],
        patient_ids=None if table.patient_ids is None else table.patient_ids[rows],
        eye_ids=None if table.eye_ids is None else table.eye_ids[rows],
        native_size=min((min(wh) for wh in sizes), default=None) if image_size is not None else None,
    )
