"""Patient-level, label-stratified cross-validation folds and the folds CSV (``filename,patient_id,fold``)."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from geca.data.config import CV_VAL
from geca.errors import DataError
from geca.utils.io import atomic_write, file_sha256, same_source

FOLDS_COLUMNS = ("filename", "patient_id", "fold")


def patient_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int,
                  shares: list[float] | None = None, name: str = "k") -> np.ndarray:
    """Fold index (N,) in [0, k): no group (patient) spans two folds, and label prevalence is balanced.

    Iterative stratification (Sechidis et al., 2011) over groups: each group carries the sum of its images'
    label vectors. Repeatedly take the label with the fewest positives among unassigned groups and place
    every unassigned group holding it, largest first, in the fold still missing most of that label; ties go
    to the fold missing most images, then to a seeded random choice. Groups without positives fill the folds
    missing most images. `shares` (default equal) sets each fold's fraction of the images and of every label.
    `name` is how the user gave k (a flag or a config key), for the error when there are fewer groups than folds.
    """
    labels = np.asarray(labels, dtype=np.float64)
    groups = np.asarray(groups)
    if labels.ndim != 2 or groups.shape != (len(labels),):
        raise DataError(f"patient_folds needs labels (N,K) and groups (N,), got {labels.shape} and "
                        f"{groups.shape}")
    if k < 2:
        raise DataError(f"need at least 2 folds, got k={k}")
    _, group_of = np.unique(groups.astype(str), return_inverse=True)
    n_groups = int(group_of.max(initial=-1)) + 1
    if n_groups < k:
        raise DataError(f"{name} {k}: cannot make {k} folds from {n_groups} patients/groups (the data has "
                        f"{n_groups} patients/groups; no patient may span two folds)")
    rng = np.random.default_rng(seed)
    group_labels = np.zeros((n_groups, labels.shape[1]))
    np.add.at(group_labels, group_of, labels)
    group_sizes = np.bincount(group_of, minlength=n_groups).astype(np.float64)

    # What each fold still needs to reach its share of images and of every label's positives.
    share = np.full(k, 1 / k) if shares is None else np.asarray(shares, dtype=np.float64) / np.sum(shares)
    need_size = share * len(labels)
    need_label = share[:, None] * group_labels.sum(0)[None]
    fold_of_group = np.full(n_groups, -1)

    def place(g: int, need: np.ndarray) -> None:
        # lexsort sorts by its last key first: most need, then most missing images, then random.
        best = np.lexsort((rng.random(k), -need_size, -need))[0]
        fold_of_group[g] = best
        need_size[best] -= group_sizes[g]
        need_label[best] -= group_labels[g]

    while True:
        open_groups = np.flatnonzero(fold_of_group < 0)
        remaining = (group_labels[open_groups] > 0).sum(0)
        if not remaining.any():
            break
        label = np.flatnonzero(remaining)[np.argmin(remaining[remaining > 0])]
        holders = open_groups[group_labels[open_groups, label] > 0]
        holders = rng.permutation(holders)
        for g in holders[np.argsort(-group_labels[holders, label], kind="stable")]:
            place(g, need_label[:, label])
    rest = rng.permutation(np.flatnonzero(fold_of_group < 0))
    for g in rest[np.argsort(-group_sizes[rest], kind="stable")]:
        place(g, need_size)
    return fold_of_group[group_of]


def write_folds(
    path: str | Path, filenames: Sequence[str], patient_ids: Sequence[str], folds: np.ndarray
) -> None:
    """Write the folds CSV atomically: a reader never sees a half-written file."""
    path = Path(path)
    if not len(filenames) == len(patient_ids) == len(folds):
        raise DataError(f"{path}: got {len(filenames)} filenames, {len(patient_ids)} patient ids and "
                        f"{len(folds)} folds")

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(FOLDS_COLUMNS)
            writer.writerows(zip(filenames, patient_ids, (int(x) for x in folds), strict=True))

    atomic_write(path, write)


def _preview(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def read_folds(
    path: str | Path, filenames: Sequence[str], patient_ids: Sequence[str] | None = None
) -> np.ndarray:
    """Fold index per entry of ``filenames``, validated: every filename listed exactly once, no unknown ones,
    folds numbered 0..K-1 with none empty, and (when given) the patient ids matching the dataset's."""
    path = Path(path).expanduser()
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if "filename" not in header or "fold" not in header:
                raise DataError(f"{path}: folds file needs columns {','.join(FOLDS_COLUMNS)}, got {header}")
            rows = list(reader)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: folds file not found; create it with `geca folds`") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable folds file: {exc}") from exc

    fold_of: dict[str, int] = {}
    patient_of: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        name = (row["filename"] or "").strip()
        if name in fold_of:
            raise DataError(f"{path}: line {line}: filename {name} is listed twice")
        try:
            fold_of[name] = int(row["fold"])
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: line {line}: fold must be an integer, got {row['fold']!r}") from exc
        if fold_of[name] < 0:
            raise DataError(f"{path}: line {line}: fold must be >= 0, got {fold_of[name]}")
        patient_of[name] = (row.get("patient_id") or "").strip()

    missing = [n for n in filenames if n not in fold_of]
    if missing:
        raise DataError(f"{path}: no fold for dataset file(s) {_preview(missing)}; "
                        "regenerate it with `geca folds`")
    known = set(filenames)
    unknown = [n for n in fold_of if n not in known]
    if unknown:
        raise DataError(f"{path}: file(s) {_preview(unknown)} are not in the dataset; "
                        "regenerate it with `geca folds`")
    if patient_ids is not None and "patient_id" in header:
        moved = [n for n, p in zip(filenames, patient_ids, strict=True) if patient_of[n] != str(p)]
        if moved:
            raise DataError(f"{path}: patient ids differ from the dataset's for {_preview(moved)}")
    folds = np.array([fold_of[n] for n in filenames], dtype=np.int64)
    empty = sorted(set(range(int(folds.max(initial=-1)) + 1)) - set(folds.tolist()))
    if empty:
        raise DataError(f"{path}: folds must be numbered 0..K-1 without gaps; fold(s) {empty} have no files")
    return folds


def group_ids(names: list[str], patient_ids: np.ndarray | None, eye_ids: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Who belongs together: patients, else eyes, else each image alone; and which of them it is."""
    if patient_ids is not None:
        return np.asarray(patient_ids), "patient"
    if eye_ids is not None:
        return np.asarray(eye_ids), "eye"
    return np.array(names), "image"


VAL_FRACTION = 0.15


def fold_split_rows(folds: np.ndarray, split: str, fold: int, folds_file: str | Path, labels: np.ndarray,
                    groups: np.ndarray, cv_val: str = "slice") -> np.ndarray:
    """Rows of ``split`` for test fold ``fold``: ``test`` is that fold. With ``cv_val="slice"`` (the default)
    ``val`` is a patient-disjoint, label-stratified 15 % of the other patients and ``train`` the rest of them (4/5
    of the data minus val); with ``"next-fold"`` ``val`` is fold k+1 and ``train`` the other three folds (3/5)."""
    if split == "all":
        return np.arange(len(folds))
    if cv_val not in CV_VAL:
        raise DataError(f"unknown cross-validation validation split {cv_val!r}; valid: {', '.join(CV_VAL)}")
    k = int(folds.max()) + 1
    if k < 3:
        raise DataError(f"{folds_file}: train/val/test splits need at least 3 folds, got {k}")
    if not 0 <= fold < k:
        raise DataError(f"{folds_file}: fold {fold} is out of range for {k} folds")
    test = folds == fold
    if cv_val == "next-fold":
        val = folds == (fold + 1) % k
    else:
        rest = np.flatnonzero(~test)
        part = patient_folds(labels[rest], np.asarray(groups)[rest], 2, seed=fold,
                             shares=[VAL_FRACTION, 1 - VAL_FRACTION])
        val = np.zeros(len(folds), dtype=bool)
        val[rest[part == 0]] = True
    rows = np.flatnonzero({"test": test, "val": val, "train": ~test & ~val}[split])
    if not len(rows):  # every user of a split scores or trains on it; say which fold before it fails there
        patients = len(np.unique(np.asarray(groups)[~test].astype(str)))
        raise DataError(f"fold {fold} of {folds_file}: its {split} split is empty (cv_val {cv_val}, {patients} "
                        "patients/groups outside the test fold); with few patients per fold try cv_val next-fold "
                        "(--cv-val) or fewer folds")
    return rows


def folds_digest(path: str | Path) -> str:
    """A folds file's SHA-256: what a run or a synthetic set records of the folds it came from."""
    where = Path(path).expanduser()
    if not where.is_file():
        raise DataError(f"{path}: folds file not found (--folds-file, data.folds_file); create it with `geca folds`")
    return file_sha256(where)


def folds_status(path: str | Path, sha256: str) -> str:
    """'ok' when the folds file at `path` holds the folds recorded as `sha256`, else 'missing' or 'changed'."""
    where = Path(path).expanduser()
    return "missing" if not where.is_file() else "ok" if folds_digest(where) == sha256 else "changed"


@contextmanager
def stable_folds(path: str | Path | None) -> Iterator[str | None]:
    """The folds file's SHA-256 around reading it: a file rewritten meanwhile would make the recorded hash describe
    other folds than those read."""
    digest = None if path is None else folds_digest(path)
    yield digest
    if digest is not None and folds_digest(path) != digest:
        raise DataError(f"{path}: the folds file changed while it was being read; run the command again")


def same_split(folds_file: str | Path | None, fold: int | None, other_file: str | Path | None,
               other_fold: int | None, other_sha256: str | None = None) -> bool:
    """Whether two (folds file, fold) pairs name the same training split of one dataset: both the fixed split, or
    the same fold of the same folds. Given `other_sha256` (other_file's SHA-256 when it was recorded), the folds are
    the same when the bytes are, wherever the file lies and whatever has since been written at other_file."""
    if folds_file is None or other_file is None:
        return folds_file is None and other_file is None
    if other_sha256 is not None:
        return fold == other_fold and folds_status(folds_file, other_sha256) == "ok"
    return same_source(folds_file, other_file) and fold == other_fold


def split_name(folds_file: str | Path | None, fold: int | None) -> str:
    return "the fixed split" if folds_file is None else f"fold {fold} of {folds_file}"
