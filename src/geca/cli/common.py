"""What every command shares: turning known errors into a clear message and a non-zero exit; device choice."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from geca.errors import ConfigError, GecaError

if TYPE_CHECKING:
    import torch

F = TypeVar("F", bound=Callable[..., Any])
CV_VAL_HELP = ("With a folds file, each fold's validation split: slice (a patient-disjoint, label-stratified 15 % of "
               "the other folds' patients; train on the rest: 4/5 of the data minus val) or next-fold (fold k+1; "
               "train on the other three folds).")
USER_ERRORS = (GecaError, ValueError)


def split_flags(folds_file: str | None, fold: int | None, cv_val: str | None) -> tuple[int, str]:
    """(fold, cv_val) for `load_split`: --fold and --cv-val choose splits of a folds file, so without one they are
    refused rather than ignored; --cv-val is checked before any work."""
    from geca.data.config import CV_VAL

    if folds_file is None and (fold is not None or cv_val is not None):
        raise ConfigError(f"{'--fold' if fold is not None else '--cv-val'} chooses splits of a folds file: it needs "
                          "--folds-file")
    if cv_val is not None and cv_val not in CV_VAL:
        raise ConfigError(f"--cv-val must be one of {', '.join(CV_VAL)}, got {cv_val!r}")
    return fold or 0, cv_val or "slice"


def describe(error: BaseException) -> str:
    """One line for the user: an OS error as `FILE: what went wrong` (a full disk, a file where a folder should be)."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def at_home(value: Any) -> Any:
    """A flag's `~` where the shell left it (`--out=~/x`, a quoted '~/x') is the home folder, as a shell would make it:
    a path of `~` would otherwise create a folder named `~` in the working directory."""
    if isinstance(value, Path):
        return Path(os.path.expanduser(value))
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    return [at_home(v) for v in value] if isinstance(value, list) else value


def _line_start() -> str:
    """A newline where a progress bar the error interrupted holds the line (tqdm ends it only when closed), so that
    the message starts a line of its own."""
    from tqdm import tqdm

    return "\n" if any(not bar.disable for bar in list(getattr(tqdm, "_instances", ()))) else ""


def guarded(fn: F) -> F:
    """Every command's flags with `~` expanded (`at_home`); known user errors, and the machine's (a full disk, a
    missing folder), print one `error:` line on stderr and exit 2 instead of a traceback; Ctrl-C prints one
    `interrupted` line (with what to do next, where a command raises KeyboardInterrupt(hint)) and exits 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **{name: at_home(value) for name, value in kwargs.items()})
        except (*USER_ERRORS, OSError) as e:
            print(f"{_line_start()}error: {describe(e)}", file=sys.stderr)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:  # files are written under temporary names, so nothing half-written stays
            print(f"{_line_start()}interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def on_interrupt(hint: Callable[[], str]) -> Iterator[None]:
    """Ctrl-C inside says what to do next, as `hint()` tells it when it comes (`guarded` prints it)."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(hint()) from None


RESUME_BATCHES = "the same command with --resume continues from the batches already written"


def pick_device(name: str) -> torch.device:
    from geca.utils.hardware import resolve_device

    return resolve_device(name)


PROGRESS_HELP = "Progress bars (default: on a terminal; in a log file, periodic plain lines instead)."
BARS_HELP = "Progress bars (default: on a terminal; not in a log file)."
DEMO_MARKER = ".geca-demo"  # in a folder `geca demo` wrote, which the next demo may replace (hidden: a run may hold it)


def show_progress(flag: bool | None) -> bool:
    """One rule for every command: bars where a person watches (a terminal), none in a log file."""
    return sys.stderr.isatty() if flag is None else flag


def set_threads(threads: int | None) -> None:
    """--threads: intra-op CPU threads (default: torch's, one per core)."""
    if threads is None:
        return
    if not 1 <= threads <= 4096:
        raise ConfigError(f"--threads must be in [1, 4096], got {threads}")
    import torch

    torch.set_num_threads(threads)
