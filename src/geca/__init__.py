"""Generative Cellular Automata. `geca.load_run(DIR)` gives a trained run to sample from (see geca.api)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): `import geca` stays cheap, so `geca --help` and the version need no torch.
    if name in ("load_run", "Run"):
        return getattr(importlib.import_module("geca.api"), name)
    raise AttributeError(f"module 'geca' has no attribute {name!r}")
