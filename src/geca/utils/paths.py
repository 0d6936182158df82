"""geca's own cache folder (compiled kernels, domain features, torch.compile's cache); torch-free, so that the CLI
can set it up before torch is imported."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "GECA_CACHE_DIR"


def cache_dir() -> Path:
    """$GECA_CACHE_DIR, else $XDG_CACHE_HOME/geca, else ~/.cache/geca."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "geca"
