"""Table 2 in one call: ResNet-34 arms on real and synthetic data, scored and tested (`geca classify`, the study)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from geca.data.folds import CV_VAL
from geca.downstream.classifier import STEMS, ClassifierConfig
from geca.downstream.metrics import AGGREGATIONS, MACRO
from geca.downstream.protocol import ProtocolConfig, Splits, parse_arms, run_protocol
from geca.downstream.report import summarise, write_report
from geca.downstream.significance import FOLD_TESTS, TESTS
from geca.errors import ConfigError
from geca.utils.schema import MAX_BATCH, MAX_IMAGE_SIZE

MIN_IMAGE_SIZE = 8


@dataclass
class TableSettings:
    """How the classifiers are trained, scored and compared (see `geca classify --help`)."""

    seeds: int = 3
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    image_size: int | None = None
    stem: str = "imagenet"
    imagenet_weights: str | None = None
    equal_steps: bool = True
    eye_agg: str = "max"
    test: str = "auto"
    p_metric: str = "map"
    bootstrap: int = 1000

    def validate(self, name: Callable[[str], str] = lambda key: "--" + key.replace("_", "-")) -> None:
        """Refuse values out of range; `name(field)` is how the user gave that field (a flag, or a YAML key)."""
        for key, valid in (("stem", STEMS), ("eye_agg", AGGREGATIONS), ("test", TESTS), ("p_metric", MACRO)):
            if getattr(self, key) not in valid:
                raise ConfigError(f"{name(key)} must be one of {', '.join(valid)}, got {getattr(self, key)!r}")
        if not 100 <= self.bootstrap <= 10**6:
            raise ConfigError(f"{name('bootstrap')} needs 100 to 1,000,000 replicates, got {self.bootstrap}")
        for key in ("seeds", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{name(key)} must be ≥ 1, got {getattr(self, key)}")
        if self.batch_size > MAX_BATCH:
            raise ConfigError(f"{name('batch_size')} must be at most {MAX_BATCH}, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"{name('lr')} must be > 0, got {self.lr}")
        if self.image_size is not None and not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            # ResNet-34 halves an ImageNet-stem input five times: below 8 pixels nothing is left to classify.
            raise ConfigError(f"{name('image_size')} must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got "
                              f"{self.image_size}")


def classify(data: str, synthetic: dict[str, str], arms: str | None, settings: TableSettings, out: Path,
             folds_file: Path | None = None, folds: int | None = None, cv_val: str = "slice", device: str = "cpu",
             progress: bool = True) -> dict[str, Any]:
    """Train every arm on every (fold, seed) unit, write the report into `out` and return its summary. Under
    cross-validation (`folds_file`) `cv_val` says how each fold's validation split is made."""
    settings.validate()
    if cv_val not in CV_VAL:
        raise ConfigError(f"--cv-val must be one of {', '.join(CV_VAL)}, got {cv_val!r}")
    if settings.test in FOLD_TESTS and (folds_file is None or (folds is not None and folds < 2)):
        raise ConfigError(f"--test {settings.test} pairs the arms over folds: it needs --folds-file and at least 2 "
                          "--folds (--test bootstrap, or auto, pairs them over test cases instead)")
    arm_list = parse_arms(arms, synthetic)
    s = settings
    weights = Path(s.imagenet_weights) if s.imagenet_weights else None
    clf = ClassifierConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, stem=s.stem, imagenet_weights=weights,
                           equal_steps=s.equal_steps, device=device, progress=progress)
    protocol = ProtocolConfig(data=data, arms=arm_list, synthetic=synthetic, classifier=clf, seeds=s.seeds,
                              image_size=s.image_size, folds_file=folds_file, folds=folds, cv_val=cv_val)
    splits = Splits(data, s.image_size, folds_file, folds, cv_val)
    if s.p_metric == "acc" and splits.reference.multilabel:
        raise ConfigError("--p-metric acc is for multi-class data; this data is multi-label")
    result = run_protocol(protocol, splits)
    config = {"data": data, "synthetic": synthetic, "arms": [a.name for a in arm_list], **asdict(s),
              "folds_file": None if folds_file is None else str(folds_file), "folds": folds, "cv_val": cv_val,
              "device": device,
              "threads": torch.get_num_threads()}
    summary = summarise(result, [a.name for a in arm_list], s.seeds, s.eye_agg, s.test, s.p_metric, s.bootstrap,
                        config)
    write_report(out, summary, result)
    return summary
