"""What both procedural sets share: seed streams, supersampled drawing and the option checks."""

from __future__ import annotations

import math

import numpy as np

from geca.errors import DataError
from geca.utils.schema import MAX_IMAGE_SIZE

MAX_DRAWN = 10**6  # images or patients drawn: a typo beyond it would fill memory before failing


def rng_for(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def supersample(size: int) -> int:
    """Factor that makes small images drawn at ~80 px or more, and never less than 2x."""
    return min(4, max(2, math.ceil(80 / size)))


def box_down(img: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks of the first two axes (an antialiasing box filter)."""
    # Summing strided slices is several times faster than a mean over axes of a 5-d reshape.
    rows = sum(img[k::factor] for k in range(factor))
    return sum(rows[:, k::factor] for k in range(factor)) / factor**2


def check_common(name: str, size: int, seed: int) -> None:
    if not 8 <= size <= MAX_IMAGE_SIZE:
        raise DataError(f"{name}: size must be in [8, {MAX_IMAGE_SIZE}], got {size}")
    if seed < 0:
        raise DataError(f"{name}: seed must be non-negative, got {seed}")
