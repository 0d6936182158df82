"""Where pretrained weight files are looked for: an explicit path, else $GECA_WEIGHTS_DIR. Never the network."""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_DIR_ENV = "GECA_WEIGHTS_DIR"
CACHE_DIR_ENV = "GECA_CACHE_DIR"


class MissingWeightsError(FileNotFoundError):
    """A pretrained weight file that is not on disk; the message names the file and how to get it."""


def resolve_weights(explicit: str | Path | None, filename: str, what: str, url: str, flag: str) -> Path:
    """The weight file to load: `explicit` if given, else $GECA_WEIGHTS_DIR/`filename`; it must exist."""
    if explicit is not None:
        path = Path(explicit).expanduser()
    elif os.environ.get(WEIGHTS_DIR_ENV):
        path = Path(os.environ[WEIGHTS_DIR_ENV]).expanduser() / filename
    else:
        path = None
    if path is not None and path.is_file():
        return path
    looked = f"{path} does not exist" if path is not None else f"no {flag} given and ${WEIGHTS_DIR_ENV} is unset"
    raise MissingWeightsError(
        f"{what} weights not found ({looked}). This machine never downloads: fetch {filename} from {url} on a "
        f"machine with internet, then pass {flag} /path/to/{filename} or put it in the folder named by "
        f"${WEIGHTS_DIR_ENV}."
    )


def cache_dir() -> Path:
    """$GECA_CACHE_DIR, else $XDG_CACHE_HOME/geca, else ~/.cache/geca."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "geca"
