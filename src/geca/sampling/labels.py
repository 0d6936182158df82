"""Which label vectors to generate."""

from __future__ import annotations

import numpy as np
import torch


def per_class_labels(num_classes: int, per_class: int, classes: list[int] | None = None) -> torch.Tensor:
    """`per_class` one-hot vectors for each class (for multi-label data: that label alone)."""
    chosen = list(range(num_classes)) if classes is None else classes
    for c in chosen:
        if not 0 <= c < num_classes:
            raise ValueError(f"class {c} out of range for {num_classes} classes")
    eye = torch.eye(num_classes)
    return eye[torch.tensor(chosen).repeat_interleave(per_class)]


def replicate_labels(labels: np.ndarray, ratio: int) -> torch.Tensor:
    """Every label vector of a split exactly `ratio` times (Eq. 8: the joint label distribution is preserved)."""
    if ratio < 1:
        raise ValueError(f"ratio must be ≥ 1, got {ratio}")
    return torch.from_numpy(np.repeat(np.asarray(labels, dtype=np.float32), ratio, axis=0))
