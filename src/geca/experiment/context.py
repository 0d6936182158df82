"""What every stage of the study shares: the experiment, its directory, the device, loaded runs and splits."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geca.data.imageset import ImageSet
from geca.data.registry import load_split
from geca.experiment.config import GENERATED_FOLDS, Experiment, LoadedExperiment
from geca.experiment.graph import read_marker, stage_dir
from geca.run import LoadedRun, load_run
from geca.sampling.labels import replicate_labels


@dataclass
class Context:
    """What every stage shares: the experiment, its directory, the device, and caches of loaded runs and splits."""

    loaded: LoadedExperiment
    root: Path
    device: torch.device
    log: Callable[[str], None] = print
    progress: bool = False
    _runs: dict[str, LoadedRun] = field(default_factory=dict)
    _splits: dict[tuple[str, int | None], ImageSet] = field(default_factory=dict)

    @property
    def exp(self) -> Experiment:
        return self.loaded.exp

    @property
    def eval_fold(self) -> int | None:
        """Table 1 and the ablations use the first fold's generators (the fixed split without CV)."""
        return self.loaded.folds[0]

    @property
    def folds_file(self) -> str | None:
        f = self.loaded.folds_file
        return str(self.root / f) if f == GENERATED_FOLDS and not self.exp.data.folds_file else f

    def outputs(self, stage_id: str) -> dict[str, Any]:
        marker = read_marker(self.root, stage_id)
        if marker is None:
            raise FileNotFoundError(f"{stage_dir(self.root, stage_id)}: stage {stage_id} has no done-marker")
        return marker["outputs"]

    def trained(self, stage_id: str) -> LoadedRun:
        if stage_id not in self._runs:
            self._runs[stage_id] = load_run(stage_dir(self.root, stage_id), device=self.device)
        return self._runs[stage_id]

    def split(self, split: str, fold: int | None) -> ImageSet:
        if (split, fold) not in self._splits:
            d = self.exp.data
            self._splits[split, fold] = load_split(d.spec, split, image_size=d.image_size, folds_file=self.folds_file,
                                                   fold=fold or 0, cv_val=d.cv_val)
        return self._splits[split, fold]

    def eval_labels(self, n: int | None) -> torch.Tensor:
        """The test split's label vectors (the real images generated sets are compared with), or `n` of them
        drawn by replicating that list and taking a seeded random subset: the label mix stays the test set's."""
        test = self.split("test", self.eval_fold).labels
        if n is None:
            return torch.from_numpy(np.asarray(test, dtype=np.float32))
        pool = replicate_labels(test, math.ceil(n / len(test)))
        return pool[np.random.default_rng(self.exp.seed).permutation(len(pool))[:n]]

    def real_spec(self, split: str) -> str:
        """`SPEC:SPLIT` for `run_evaluation`; under CV the real stage's copy of the evaluation fold's split."""
        if not self.exp.data.cv:
            return f"{self.exp.data.spec}:{split}"
        return f"{stage_dir(self.root, 'real') / split / 'labels.csv'}:all"


def train_id(name: str, fold: int | None, heredity: str | None = None) -> str:
    """A generator's training stage; `heredity` names the GHG stage's twin trained with that `model.heredity`."""
    name = name if heredity is None else f"{name}.heredity-{heredity}"
    return f"train.{name}" if fold is None else f"train.{name}.f{fold}"


def expand_id(name: str, fold: int | None) -> str:
    return f"expand.{name}" if fold is None else f"expand.{name}.f{fold}"
