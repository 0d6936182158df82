"""What every command shares: turning known errors into a clear message and a non-zero exit; device choice."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from geca.errors import ConfigError, GecaError

if TYPE_CHECKING:
    import torch

F = TypeVar("F", bound=Callable[..., Any])
CV_VAL_HELP = ("With a folds file, each fold's validation split: slice (a patient-disjoint, label-stratified 15 % of "
               "the other folds' patients; train on the rest: 4/5 of the data minus val) or next-fold (fold k+1; "
               "train on the other three folds).")
USER_ERRORS = (GecaError, FileExistsError, FileNotFoundError, ValueError)


def guarded(fn: F) -> F:
    """Known user errors print one `error:` line on stderr and exit 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def pick_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is available")
    return torch.device(name)
