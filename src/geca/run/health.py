"""A run's health for `geca runs`: damaged or misfitting checkpoints, found without loading a model."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from geca.data.folds import folds_status
from geca.errors import CheckpointError, MissingCheckpointError
from geca.run.checkpoints import (
    BEST,
    checkpoint_dir,
    find_checkpoint,
    read_state,
    upgrade_keys,
    verify,
)
from geca.run.spec import ModelSpec, read_spec
from geca.utils.io import csv_rows


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int] | None:
    """A safetensors file's header (tensor name → dtype, shape, offsets) and its length; None without one."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if n <= 100 * 2**20 else None
        if not isinstance(header, dict):
            return None
        header.pop("__metadata__", None)
        return header, n
    except (OSError, ValueError):
        return None


def _safetensors_damage(path: Path) -> str | None:
    """'damaged' (no safetensors header) or 'truncated' (shorter or longer than its header says), found without
    hashing the file; None where it looks whole."""
    found = _safetensors_header(path)
    if found is None:
        return "damaged"
    header, n = found
    try:
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
    except (TypeError, KeyError, IndexError, AttributeError):
        return "damaged"
    return None if path.stat().st_size == 8 + n + end else "truncated"


def _misfit(spec: ModelSpec, checkpoint: Path) -> str | None:
    """What keeps the weights from fitting the model model.json describes, read from the files' headers (a run's
    folder given another run's checkpoint or model.json); None where they fit."""
    try:
        with torch.device("meta"):  # shapes without memory or initialisation
            own = {k: list(v.shape) for k, v in spec.build().state_dict().items()}
    except Exception as e:  # a model.json edited into settings no model has (the builders raise many kinds)
        return f"model.json describes no model ({type(e).__name__}: {e})"
    for name in ("model.safetensors", "ema.safetensors"):
        header, _ = _safetensors_header(checkpoint / name) or ({}, 0)
        if upgrade_keys({k: v.get("shape") for k, v in header.items()}) != own:
            return f"{name} does not fit model.json"
    return None


def checkpoint_health(checkpoint: Path, hashes: bool = True, state_expected: bool = True) -> str:
    """'ok', or what keeps the checkpoint from loading: a missing file, or (with `hashes`) a file whose SHA-256
    differs from the one recorded at save time (read, not loaded). geca 0.1 wrote no state.json
    (`state_expected` False)."""
    for name in ("model.safetensors", "ema.safetensors"):
        if not (checkpoint / name).is_file():
            return f"missing {name}"
        if (checkpoint / name).stat().st_size == 0:  # found without hashing (--quick): no weights file is empty
            return f"empty {name}"
        cut = _safetensors_damage(checkpoint / name)
        if cut:
            return f"{cut} {name}"
    if state_expected and not (checkpoint / "state.json").is_file():
        return "missing state.json"
    try:
        recorded = read_state(checkpoint).get("files", {})
    except CheckpointError:
        return "damaged state.json"
    for name in recorded:
        if not (checkpoint / name).is_file():
            return f"missing {name}"
        if hashes:
            try:
                verify(checkpoint / name)
            except CheckpointError:
                return f"damaged {name}"
    return "ok"


def summarize_run(run_dir: Path, hashes: bool = True) -> dict[str, Any]:
    """One line about a run directory, read from its files without loading any weights (a damaged part is "?"); its
    status is the latest and best checkpoints' health (their files hashed unless `hashes` is False), or what is
    missing."""
    run_dir = Path(run_dir)
    row: dict[str, Any] = {"run": str(run_dir), "status": "ok", "step": None, "model": "?", "data": "?",
                           "folds_file": None, "fold": None, "heredity": None, "loss": None, "best_kid": None,
                           "best_step": None}
    spec = None
    try:
        spec = read_spec(run_dir)
        row.update(model=spec.model.name, data=spec.data.spec, heredity=getattr(spec.model, "heredity", None))
        if spec.data.folds_file is not None:
            row.update(folds_file=spec.data.folds_file, fold=spec.data.fold)
            if spec.folds_sha256 is not None and (status := folds_status(spec.data.folds_file,
                                                                          spec.folds_sha256)) != "ok":
                row["status"] = f"folds file {status}"
    except CheckpointError:
        row["status"] = "damaged model.json" if (run_dir / "model.json").exists() else "missing model.json"
    except OSError as e:  # a folds file that cannot be read here
        row["status"] = f"folds file unreadable ({e.strerror})"
    state_expected = spec is not None and spec.format >= 2  # geca 0.1 (format 1) wrote no state.json
    try:
        ckpt = find_checkpoint(run_dir)
    except CheckpointError as e:
        ckpt = None
        row["status"] = "no checkpoint" if not (checkpoint_dir(run_dir) / "latest.json").exists() else \
            "missing checkpoint folder" if isinstance(e, MissingCheckpointError) else "damaged latest.json"
    if ckpt is not None:
        if row["status"] == "ok":
            row["status"] = checkpoint_health(ckpt, hashes, state_expected)
        if row["status"] == "ok" and spec is not None and (misfit := _misfit(spec, ckpt)):
            row["status"] = misfit
        try:
            row["step"] = read_state(ckpt).get("step")
        except CheckpointError:
            pass
    try:
        rows = csv_rows(run_dir / "log.csv")
    except (csv.Error, UnicodeDecodeError):
        rows = []
    try:
        row["loss"] = float(rows[-1]["loss"]) if rows else None
    except (KeyError, TypeError, ValueError):  # a damaged last row
        row["loss"] = None
    best = checkpoint_dir(run_dir) / BEST
    try:
        state = read_state(best)
        row.update(best_kid=state.get("kid"), best_step=state.get("step"))
    except CheckpointError:
        pass
    if best.is_dir() and row["status"] == "ok" and (health := checkpoint_health(best, hashes, state_expected)) != "ok":
        row["status"] = f"best: {health}"
    return row
