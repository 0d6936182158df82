"""Procedural retinal image sets, made deterministically from a seed at any resolution, with no download.

``synthetic-fundus`` mimics RetinaMNIST (colour fundus photographs, 5 diabetic-retinopathy grades);
``synthetic-oct`` mimics a multi-label OCT B-scan collection with patients, eyes and several scans per eye.
Both draw at a supersampled resolution and box-filter down, so small images are antialiased.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from geca.data.imageset import ImageSet
from geca.data.procedural.drawing import MAX_DRAWN
from geca.data.procedural.fundus import FUNDUS_CLASSES, check_fundus, synthetic_fundus
from geca.data.procedural.oct import OCT_CLASSES, check_oct, synthetic_oct

__all__ = ["FUNDUS_CLASSES", "MAX_DRAWN", "OCT_CLASSES", "PROCEDURAL", "check_options", "resolved_options",
           "synthetic_fundus", "synthetic_oct"]

PROCEDURAL: dict[str, Callable[..., ImageSet]] = {
    "synthetic-fundus": synthetic_fundus,
    "synthetic-oct": synthetic_oct,
}
_CHECKS: dict[str, Callable[..., None]] = {"synthetic-fundus": check_fundus, "synthetic-oct": check_oct}


def resolved_options(name: str, **options: int) -> dict[str, int | None]:
    """A generator's options with its own defaults filled in (size, n or patients, seed); an unknown one is a
    TypeError."""
    bound = inspect.signature(PROCEDURAL[name]).bind("train", **options)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "split"}


def check_options(name: str, **options: int) -> None:
    """A generator's own range checks on its options (its defaults filled in), without drawing an image: for commands
    that check everything before they create anything."""
    check = _CHECKS[name]
    checked = inspect.signature(check).parameters
    check(**{k: v for k, v in resolved_options(name, **options).items() if k in checked})
