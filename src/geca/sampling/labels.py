"""Which label vectors to generate."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from geca.errors import ConfigError

MAX_IMAGES = 10_000_000


def per_class_labels(num_classes: int, per_class: int, classes: list[int] | None = None) -> torch.Tensor:
    """`per_class` one-hot vectors for each class (for multi-label data: that label alone)."""
    chosen = list(range(num_classes)) if classes is None else classes
    for c in chosen:
        if not 0 <= c < num_classes:
            raise ConfigError(f"class {c} out of range for {num_classes} classes")
    _check_count(len(chosen) * per_class, f"--per-class {per_class}")
    return one_hot(torch.tensor(chosen).repeat_interleave(per_class), num_classes)


def replicate_labels(labels: np.ndarray, ratio: int) -> torch.Tensor:
    """Every label vector of a split exactly `ratio` times (Eq. 8: the joint label distribution is preserved)."""
    if ratio < 1:
        raise ConfigError(f"--ratio must be ≥ 1, got {ratio}")
    _check_count(len(labels) * ratio, f"--ratio {ratio}")
    return torch.from_numpy(np.repeat(np.asarray(labels, dtype=np.float32), ratio, axis=0))


def _check_count(n: int, flag: str) -> None:
    """Refuse a set no machine holds before its label vectors are allocated (they alone would take n × K floats)."""
    if n > MAX_IMAGES:
        raise ConfigError(f"{flag} asks for {n:,} images; a set holds at most {MAX_IMAGES:,}")


def resolve_class(name_or_index: str, class_names: list[str]) -> int:
    """A class given by name or index."""
    if name_or_index.isdigit() and int(name_or_index) < len(class_names):
        return int(name_or_index)
    if name_or_index in class_names:
        return class_names.index(name_or_index)
    raise ConfigError(f"unknown label {name_or_index!r}; classes: {', '.join(class_names)} "
                      f"(or an index 0–{len(class_names) - 1})")


def one_hot(indices: Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """The label vectors (N, K) of classes `indices`, each alone."""
    return torch.eye(num_classes)[torch.as_tensor(indices, dtype=torch.long)]
