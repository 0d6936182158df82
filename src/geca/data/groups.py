"""Patient groups of a dataset and the cross-validation folds made from them (`geca folds`, the study's folds)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geca.data.folder_csv import read_table
from geca.data.folds import group_ids, patient_folds, write_folds
from geca.data.registry import load_split

_WARNINGS = {
    "eye": "no patient_id column: grouping by eye_id, so a patient's two eyes may span folds",
    "image": "no patient_id or eye_id column: one group per image, so a patient's images may span folds",
}


@dataclass
class Groups:
    """Every image of a dataset's `all` split: its name, labels and group (patient, else eye, else itself)."""

    names: list[str]
    labels: np.ndarray
    class_names: list[str]
    groups: np.ndarray
    by: str  # "patient", "eye" or "image"

    @property
    def warning(self) -> str | None:
        """Why the groups may split a patient across folds, if they may."""
        return _WARNINGS.get(self.by)


def dataset_groups(spec: str) -> Groups:
    """The groups of `spec`'s `all` split; a folder + CSV set is read from its table alone."""
    if spec.lower().endswith(".csv"):
        # The table suffices: decoding every image just to split it would be slow, and would fail on
        # mixed image sizes that only matter once an image_size is chosen for training.
        table = read_table(Path(spec).expanduser())
        names, labels, classes = table.filenames, table.labels, table.class_names
        patients, eyes = table.patient_ids, table.eye_ids
    else:
        images = load_split(spec, "all")
        names, labels, classes = images.ids, images.labels, images.class_names
        patients, eyes = images.patient_ids, images.eye_ids
    return Groups(names, labels, classes, *group_ids(names, patients, eyes))


def make_folds(spec: str, k: int, seed: int, out: Path, name: str = "--k") -> tuple[Groups, np.ndarray]:
    """Assign `spec`'s groups to k label-stratified folds, write the folds CSV to `out`; returns groups and folds.
    `name` is how the user gave k (a flag, or a config key), for the error when there are fewer groups."""
    groups = dataset_groups(spec)
    fold_of = patient_folds(groups.labels, groups.groups, k, seed, name=name)
    write_folds(out, groups.names, [str(g) for g in groups.groups], fold_of)
    return groups, fold_of
