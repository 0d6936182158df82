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
