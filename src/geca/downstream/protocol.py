"""Table 2's protocol: arms × seeds on a fixed split or on patient-level K-fold cross-validation."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from geca.data.folder_csv import CsvTable, load_folder_csv, read_manifest, read_table
from geca.data.folds import fold_split_rows, group_ids, read_folds, same_split, split_name
from geca.data.imageset import ImageSet
from geca.data.registry import SPLITS, load_split, same_data
from geca.downstream.classifier import ClassifierConfig, predict, to_tensor, train_classifier
from geca.errors import CheckpointError, ConfigError, DataError
from geca.run import read_spec
from geca.utils.io import file_sha256, read_json_object, same_path, unfindable
from geca.utils.seeding import derive_seed

BASELINE = "geometric"
FOLD_FIELD = "{fold}"


@dataclass(frozen=True)
class Arm:
    """``none``: no augmentation; ``geometric``: the baseline; ``+NAME``: geometric on real + synthetic set NAME."""

    name: str
    augment: bool
    synthetic: str | None = None


def parse_synthetic(items: list[str]) -> dict[str, str]:
    """``NAME=DIR`` pairs (DIR may hold ``{fold}``) → {NAME: DIR}."""
    out: dict[str, str] = {}
    for item in items:
        name, eq, directory = (part.strip() for part in item.partition("="))
        if not eq or not name or not directory:
            raise ConfigError(f"--synthetic {item!r}: expected NAME=DIR")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"--synthetic {item!r}: NAME may hold letters, digits, '-' and '_' only")
        if name in out:
            raise ConfigError(f"--synthetic {name!r} given twice")
        out[name] = directory
    return out


def parse_arms(text: str | None, synthetic: dict[str, str]) -> list[Arm]:
    """Comma-separated arms; the default is none, geometric and one +NAME per synthetic set."""
    valid = ["none", BASELINE, *(f"+{n}" for n in synthetic)]
    if text is not None and not text.strip():
        raise ConfigError(f"--arms is empty; give some of {', '.join(valid)}, or leave it out for all of them")
    names = valid if text is None else [a.strip() for a in text.split(",")]
    arms = []
    for name in names:
        if name not in valid:
            hint = f" (give its set with --synthetic {name[1:]}=DIR)" if name.startswith("+") else ""
            raise ConfigError(f"unknown arm {name!r}; valid: {', '.join(valid)}{hint}")
        arms.append(Arm(name, augment=name != "none", synthetic=name[1:] if name.startswith("+") else None))
    if len({a.name for a in arms}) != len(arms):
        raise ConfigError(f"--arms lists an arm twice: {text}")
    return arms


def synthetic_dir(template: str, fold: int | None) -> Path:
    """The synthetic set of one fold: ``{fold}`` in the template becomes the fold index (CV needs it)."""
    if fold is None:
        if FOLD_FIELD in template:
            raise ConfigError(f"synthetic dir {template!r} holds {FOLD_FIELD} but no --folds-file was given")
        return Path(template).expanduser()
    if FOLD_FIELD not in template:
        raise ConfigError(f"synthetic dir {template!r} needs {FOLD_FIELD}: under cross-validation each fold needs "
                          "a generator trained without that fold's test patients (e.g. runs/syn-{fold})")
    return Path(template.replace(FOLD_FIELD, str(fold))).expanduser()


def check_synthetic(directory: Path, class_names: list[str]) -> Path:
    """Validate a `geca sample`-format directory without decoding images; returns its labels.csv."""
    return _synthetic_table(directory, class_names).csv_path


def _synthetic_table(directory: Path, class_names: list[str]) -> CsvTable:
    if not directory.is_dir():
        raise DataError(f"{directory}: synthetic set not found (expected a `geca sample`/`geca expand` directory "
                        "with images/ and labels.csv)")
    csv_path = directory / "labels.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: missing; {directory} is not a `geca sample`/`geca expand` directory")
    table = read_table(csv_path)
    read_manifest(directory, len(table.filenames))
    if table.class_names != list(class_names):
        raise DataError(f"{csv_path}: class columns {table.class_names} do not match the data's classes "
                        f"{list(class_names)}")
    return table


def check_lineage(directory: Path, data: str, folds_file: Path | None, fold: int | None,
                  cv_val: str = "slice") -> None:
    """A synthetic set must not come from a generator that saw this arm's test or validation images. Its manifest
    records the split its generator trained on (`trained_on`, in every set `geca sample` and `geca expand` write)
    and, for an expansion, the split whose labels it replicates (`expansion`): on the same data each must be the
    split this arm trains on (under cross-validation with the same `cv_val`), an expansion must be complete, and no
    set may replicate the label vectors of held-out cases. A set without a manifest (another tool's) is taken as is;
    a damaged one is refused, since it would silently turn these checks off."""
    path = directory / "manifest.json"
    if not path.exists():
        return
    manifest = read_json_object(path, DataError)
    trained = manifest.get("trained_on")
    if not isinstance(manifest.get("num_images"), int) or not isinstance(trained, dict | None) or \
            (trained is None and not isinstance(manifest.get("run"), str)):
        raise DataError(f"{path}: not a manifest as geca writes it (num_images, and trained_on or run); the set's "
                        "leakage checks cannot run on it. Remove it to use the set unchecked, as another tool's")
    if trained is None:
        trained = _run_split(manifest)
        if trained is None:
            warnings.warn(f"{directory}: which split its generator trained on is not recorded, and its run "
                          f"{manifest['run']} is gone or holds other weights now; the set is used unchecked",
                          stacklevel=2)
    if isinstance(trained, dict) and same_data(data, trained.get("data"), trained.get("data_key")):
        _check_split(directory, "its generator was trained on", trained, folds_file, fold, cv_val)
        split = _labels_split(manifest.get("labels"))
        if split in ("val", "test", "all"):  # the held-out cases' label vectors (a rare combination names one)
            raise DataError(f"{directory}: its label vectors replicate the {split} split of this arm's data (its "
                            f"manifest.json: labels {manifest['labels']!r}); an arm trains on sets labelled like "
                            "its training split (geca expand, or geca sample --labels-from train or --per-class)")
    origin = manifest.get("expansion")
    if isinstance(origin, dict):
        if origin.get("complete") is False:
            raise DataError(f"{directory}: a partial expansion (geca expand --limit; its manifest.json says complete: "
                            "false); an arm needs every training label vector ×ratio, run expand without --limit")
        _check_split(directory, "expanded from", origin, folds_file, fold, cv_val)


def _labels_split(labels: Any) -> str | None:
    """The split whose label vectors a set replicates, from its manifest's `labels` ('SPEC:SPLIT xR', as `geca
    sample --labels-from` and `geca expand` write it), or None (`per-class N`)."""
    if not isinstance(labels, str):
        return None
    head, _, ratio = labels.rpartition(" x")
    split = head.rpartition(":")[2]
    return split if ratio.isdigit() and split in SPLITS else None


def _run_split(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """For a set written before manifests recorded `trained_on`: the split its run trained on, if the run's folder
    still holds the very weights the set was sampled with (its model.json may have been rewritten since)."""
    checkpoint, name, sha = (manifest.get(k) for k in ("checkpoint", "weights_file", "weights_sha256"))
    if not all(isinstance(v, str) for v in (checkpoint, name, sha)):
        return None
    weights = Path(checkpoint) / name
    try:
        if not weights.is_file() or file_sha256(weights) != sha:
            return None
        return read_spec(Path(manifest["run"])).training_split()
    except (CheckpointError, OSError):
        return None


def _check_split(directory: Path, what: str, record: dict[str, Any], folds_file: Path | None,
                 fold: int | None, cv_val: str) -> None:
    """The split a manifest `record`s (folds_file, fold, folds_sha256, cv_val) must be (folds_file, fold, cv_val)."""
    their_folds, their_fold, their_sha = record.get("folds_file"), record.get("fold"), record.get("folds_sha256")
    if their_sha is None and unfindable(their_folds, folds_file):
        raise DataError(f"{directory}: its manifest.json says {what} folds file {their_folds}, which is not found "
                        f"from {Path.cwd()}; whether it matches {folds_file} cannot be checked (run from the folder "
                        "it was made in)")
    if same_split(folds_file, fold, their_folds, their_fold, their_sha):
        theirs = record.get("cv_val")
        # Either way round, one cv_val's training patients include some of the other's validation patients: model
        # selection would then score the classifier on images its generator learned (a record without it predates it).
        if folds_file is not None and theirs is not None and theirs != cv_val:
            raise DataError(f"{directory}: {what} {split_name(folds_file, fold)} with cv_val {theirs} (its "
                            f"manifest.json), but this arm uses cv_val {cv_val}, whose validation patients that "
                            f"generator trained on. Use --cv-val {theirs}, or a set from a run trained with "
                            f"--cv-val {cv_val}")
        return
    target = split_name(folds_file, fold)
    if their_sha is not None and folds_file is not None and their_folds is not None and their_fold == fold and \
            same_path(folds_file, their_folds):
        raise DataError(f"{directory}: {what} fold {fold} of {folds_file} as it was then (its manifest.json); the "
                        "file has changed since (its SHA-256 differs), so this arm's split is another. Restore the "
                        "folds file, or make the set again from a run trained on the new folds")
    raise DataError(f"{directory}: {what} {split_name(their_folds, their_fold)} (its manifest.json), but this arm is "
                    f"trained for {target}; the generator may have seen that split's test images. Use a set from a "
                    f"run trained on {target}")


def load_synthetic(directory: Path, real: ImageSet) -> ImageSet:
    """A synthetic set resized to the real set's resolution, with its labels checked against the real data's."""
    table = _synthetic_table(directory, real.class_names)
    csv_path = table.csv_path
    with Image.open(table.paths[0]) as first:  # the header only (read_table refuses a set without rows)
        width, height = first.size
    if (width, height) != (real.resolution, real.resolution):
        warnings.warn(f"{directory}: its images are {width}×{height} px and are resized to the real images' "
                      f"{real.resolution} px; a generator trained at another size, or on other data with the same "
                      "class names?", stacklevel=2)
    syn = load_folder_csv(csv_path, "all", image_size=real.resolution)
    if syn.channels != real.channels:
        raise DataError(f"{directory}: images have {syn.channels} channel(s), the real data {real.channels}")
    if not real.multilabel and not np.all(syn.labels.sum(1) == 1):
        row = int(np.flatnonzero(syn.labels.sum(1) != 1)[0])
        raise DataError(f"{csv_path}: row {row + 2} ({syn.ids[row]}) is not one-hot, but the data is multi-class")
    return syn


@dataclass
class Split:
    """One evaluation unit's data: a fold (None for the source's fixed split) and its train/val/test sets."""

    fold: int | None
    train: ImageSet
    val: ImageSet
    test: ImageSet


class Splits:
    """The source's fixed train/val/test split, or folds 0..K-1 of a folds file (test = fold k; val and train as
    ``cv_val`` says, see ``geca.data.folds.fold_split_rows``).

    Under CV the images are decoded once and each fold is a subset chosen by the same ``read_folds`` and
    ``fold_split_rows`` that ``load_split(..., folds_file=, fold=)`` applies.
    """

    def __init__(self, data: str, image_size: int | None, folds_file: Path | None, folds: int | None,
                 cv_val: str = "slice") -> None:
        self.folds_file, self.cv_val = folds_file, cv_val
        if folds_file is None:
            if folds is not None:
                raise ConfigError("--folds needs --folds-file (create one with `geca folds`)")
            self._fixed = {s: load_split(data, s, image_size=image_size) for s in ("train", "val", "test")}
            for name, split in self._fixed.items():
                if not len(split):
                    raise DataError(f"{data}: its {name} split is empty; a classifier arm trains, selects and "
                                    "tests on three")
            self.folds: list[int | None] = [None]
            self.reference = self._fixed["train"]
            return
        self.reference = load_split(data, "all", image_size=image_size, folds_file=folds_file)
        self._fold_of = read_folds(folds_file, self.reference.ids, self.reference.patient_ids)
        k = int(self._fold_of.max()) + 1
        count = k if folds is None else folds
        if not 1 <= count <= k:
            raise ConfigError(f"--folds {folds}: {folds_file} has {k} folds")
        self.folds = list(range(count))
        groups, _ = group_ids(self.reference.ids, self.reference.patient_ids, self.reference.eye_ids)
        # every fold's rows now: a fold that cannot be split fails before the first classifier trains
        self._rows = {fold: {s: fold_split_rows(self._fold_of, s, fold, folds_file, self.reference.labels, groups,
                                                cv_val) for s in ("train", "val", "test")} for fold in self.folds}

    @property
    def protocol(self) -> str:
        if self.folds_file is None:
            return "fixed split"
        val = "a 15 % patient slice of the other folds" if self.cv_val == "slice" else "the next fold"
        return f"patient-level {len(self.folds)}-fold CV (validation: {val})"

    def get(self, fold: int | None) -> Split:
        if fold is None:
            return Split(None, **self._fixed)
        return Split(fold, **{s: self.reference.subset(r) for s, r in self._rows[fold].items()})


def unit_seed(seed: int, fold: int | None) -> int:
    """Seed of one (fold, seed) unit, shared by all arms: paired arms start from the same weights."""
    return derive_seed(seed, 0 if fold is None else fold)


@dataclass
class UnitResult:
    """One arm trained on one (fold, seed) unit, and its test-set scores."""

    arm: str
    fold: int | None
    seed: int
    best_epoch: int
    val_auc: float
    seconds: float
    n_real: int
    n_synthetic: int
    labels: np.ndarray
    probs: np.ndarray
    eyes: np.ndarray | None
    history: list[dict[str, float]] = field(default_factory=list)
    patients: np.ndarray | None = None  # the test cases' patients: the bootstrap resamples them whole


@dataclass
class ProtocolConfig:
    data: str
    arms: list[Arm]
    synthetic: dict[str, str]
    classifier: ClassifierConfig
    seeds: int = 3
    image_size: int | None = None
    folds_file: Path | None = None
    folds: int | None = None
    cv_val: str = "slice"


@dataclass
class ProtocolResult:
    data: str
    results: list[UnitResult]
    class_names: list[str]
    multilabel: bool
    protocol: str
    sizes: list[dict[str, int | None]]


def check_inputs(protocol: ProtocolConfig, reference: ImageSet, folds: list[int | None]) -> None:
    """Fail before any training if a synthetic set an arm needs is missing or does not fit. The sets of the first
    fold are loaded before it trains; those of later folds are decoded here too (and again at their fold, so that
    only one fold's sets are in memory), or a damaged image would be found only after the earlier folds trained."""
    if protocol.seeds < 1:
        raise ConfigError(f"--seeds must be ≥ 1, got {protocol.seeds}")
    used = {a.synthetic for a in protocol.arms if a.synthetic}
    unused = sorted(set(protocol.synthetic) - used)
    if unused:
        raise ConfigError(f"synthetic set(s) {', '.join(unused)} given but no arm uses them "
                          f"(add {', '.join('+' + n for n in unused)} to --arms)")
    for name in sorted(used):
        for fold in folds:
            directory = synthetic_dir(protocol.synthetic[name], fold)
            check_synthetic(directory, reference.class_names)
            check_lineage(directory, protocol.data, protocol.folds_file, fold, protocol.cv_val)
    for name in sorted(used):
        for fold in folds[1:]:
            load_synthetic(synthetic_dir(protocol.synthetic[name], fold), reference)


def run_protocol(protocol: ProtocolConfig, data: Splits | None = None) -> ProtocolResult:
    """Train every arm on every (fold, seed) unit and score it on the unit's test set.

    ``data`` is ``Splits(protocol.data, protocol.image_size, protocol.folds_file, protocol.folds,
    protocol.cv_val)``, loaded here unless given.
    """
    protocol.classifier.validate()
    if data is None:
        data = Splits(protocol.data, protocol.image_size, protocol.folds_file, protocol.folds, protocol.cv_val)
    check_inputs(protocol, data.reference, data.folds)
    multilabel = data.reference.multilabel
    device = torch.device(protocol.classifier.device)
    results: list[UnitResult] = []
    sizes: list[dict[str, int | None]] = []
    outer = tqdm(total=len(data.folds) * protocol.seeds * len(protocol.arms), desc="classifiers",
                 disable=not protocol.classifier.progress)
    for fold in data.folds:
        split = data.get(fold)
        where = "split" if fold is None else f"fold {fold}"
        sizes.append({"fold": fold, "train": len(split.train), "val": len(split.val), "test": len(split.test)})
        real_x, real_y = to_tensor(split.train.images), torch.from_numpy(split.train.labels)
        val_x, test_x = to_tensor(split.val.images), to_tensor(split.test.images)
        synthetic = {name: load_synthetic(synthetic_dir(protocol.synthetic[name], fold), split.train)
                     for name in sorted({a.synthetic for a in protocol.arms if a.synthetic})}
        for seed in range(protocol.seeds):
            for arm in protocol.arms:
                x, y, n_syn = real_x, real_y, 0
                if arm.synthetic:
                    syn = synthetic[arm.synthetic]
                    x = torch.cat([real_x, to_tensor(syn.images)])
                    y = torch.cat([real_y, torch.from_numpy(syn.labels)])
                    n_syn = len(syn)
                t0 = time.time()
                trained = train_classifier(x, y, len(real_x), val_x, split.val.labels, multilabel, arm.augment,
                                           protocol.classifier, unit_seed(seed, fold),
                                           desc=f"{arm.name} {where} seed {seed}")
                probs = predict(trained.model, test_x, multilabel, trained.normalise, device)
                results.append(UnitResult(arm.name, fold, seed, trained.best_epoch, trained.best_val_auc,
                                          round(time.time() - t0, 2), len(real_x), n_syn, split.test.labels,
                                          probs, split.test.eye_ids, trained.history, split.test.patient_ids))
                outer.update()
    outer.close()
    return ProtocolResult(protocol.data, results, list(data.reference.class_names), multilabel, data.protocol, sizes)
