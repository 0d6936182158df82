"""A run's checkpoints: `checkpoints/step_NNNNNNN/{model,ema}.safetensors, optimizer.pt, state.json`, with
`checkpoints/latest.json` naming the newest and `checkpoints/best/` where training validates; writing, finding,
verifying, pruning and loading them."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from geca.errors import CheckpointError, MissingCheckpointError
from geca.models.base import Denoiser
from geca.utils.io import atomic_write_json, delete_dir, file_sha256, read_json_object, staged_dir

BEST = "best"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_checkpoints(run_dir: Path) -> dict[int, Path]:
    """A run's checkpoints/step_NNNNNNN folders by step, in step order."""
    found = ((re.fullmatch(r"step_(\d{7,})", p.name), p) for p in checkpoint_dir(run_dir).glob("step_*"))
    return dict(sorted((int(m[1]), p) for m, p in found if m and p.is_dir()))


def prune_checkpoints(run_dir: Path, keep: int) -> list[int]:
    """Delete all but the `keep` latest step checkpoints (never the one latest.json names; `best` is no step
    checkpoint); returns the steps deleted. Each is renamed before it is deleted, so an interruption leaves no
    half-deleted checkpoint, only a hidden folder the next pruning removes."""
    root = checkpoint_dir(run_dir)
    for left in root.glob(".step_*.pruned"):
        shutil.rmtree(left, ignore_errors=True)
    latest = find_checkpoint(run_dir)
    steps = step_checkpoints(run_dir)
    gone = [step for step in list(steps)[:-keep] if steps[step].name != latest.name]
    for step in gone:
        delete_dir(steps[step], root / f".{steps[step].name}.pruned")
    return gone


def _safetensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in module.state_dict().items()}


def save_weights(directory: Path, model: torch.nn.Module, ema: torch.nn.Module) -> None:
    save_file(_safetensors(model), directory / "model.safetensors")
    save_file(_safetensors(ema), directory / "ema.safetensors")


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """state.json, with the SHA-256 of every file beside it: a flipped byte is found before anything uses it."""
    files = {f.name: file_sha256(f) for f in sorted(directory.iterdir()) if f.is_file() and f.name != "state.json"}
    (directory / "state.json").write_text(json.dumps({**state, "files": files}, indent=2))


def save_checkpoint(run_dir: Path, step: int, model: Denoiser, ema: Denoiser, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Write checkpoints/step_NNNNNNN/ as a whole, then point latest.json at it."""
    root = checkpoint_dir(run_dir)
    name = f"step_{step:07d}"
    with staged_dir(root / name) as tmp:
        save_weights(tmp, model, ema)
        try:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        except RuntimeError as e:  # torch reports a full disk as a RuntimeError of its zip writer
            raise CheckpointError(f"{tmp / 'optimizer.pt'}: could not be written ({str(e).splitlines()[0]})") from None
        write_state(tmp, {"step": step, **state})
    atomic_write_json(root / "latest.json", {"step": step, "path": name})
    return root / name


def read_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's state.json ({} for checkpoints written without one)."""
    path = Path(checkpoint) / "state.json"
    if not path.exists():
        return {}
    state = read_json_object(path, CheckpointError)
    files = state.get("files", {})
    if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
        raise CheckpointError(f"{path}: corrupt checkpoint state (files is not a mapping of names to SHA-256s)")
    return state


def verify(path: Path, sha256: str | None = None) -> None:
    """Refuse a checkpoint file whose SHA-256 (`sha256` if already known) differs from the one its state.json
    recorded at save time."""
    expected = read_state(path.parent).get("files", {}).get(path.name)
    if expected is not None and path.exists() and (sha256 or file_sha256(path)) != expected:
        raise CheckpointError(f"{path}: corrupt (its SHA-256 differs from the one recorded when it was saved)")


def find_checkpoint(run_dir: Path, which: str | int | Path | None = None) -> Path:
    """`which`: None/'latest', 'best' (lowest validation KID), a step number, or a checkpoint directory path."""
    run_dir, which = Path(run_dir), None if which is None else str(which)
    if which is not None and not which.strip():
        raise CheckpointError("--checkpoint is empty; give 'latest', 'best', a step number or a directory")
    root = checkpoint_dir(run_dir)
    if which in (None, "latest"):
        latest = root / "latest.json"
        if not latest.exists():
            raise CheckpointError(f"{run_dir}: no checkpoint found (expected {latest}); has this run been trained?")
        try:
            name = json.loads(latest.read_text())["path"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{latest}: corrupt pointer file ({e})") from None
        if not (isinstance(name, str) and re.fullmatch(r"step_\d{7,}", name)):
            raise CheckpointError(f"{latest}: corrupt pointer file (path {name!r} is not a step_NNNNNNN folder of "
                                  "this run)")
        path = root / name
    elif which == BEST:
        path = root / BEST
        if not path.is_dir():
            raise CheckpointError(f"{path}: no best checkpoint; it is kept only when training validates "
                                  "(validation.every > 0 or --validate-every)")
    elif (step := re.fullmatch(r"(?:step_)?(\d+)", which)) is not None:
        # a name is a name even where a folder of that name is in the working directory
        path = root / f"step_{int(step[1]):07d}"
        if not path.is_dir():
            steps = list(step_checkpoints(run_dir))
            raise CheckpointError(f"--checkpoint {which}: {run_dir} has no checkpoint of step {int(step[1])}; it has "
                                  f"{', '.join(map(str, steps)) if steps else 'none'}")
    elif Path(which).is_dir():
        return Path(which)
    else:
        raise CheckpointError(f"--checkpoint {which!r}: neither 'latest', 'best', a step number nor a directory")
    if not path.is_dir():
        raise MissingCheckpointError(f"{path}: checkpoint directory missing")
    return path


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A checkpoint's weights, verified against its recorded SHA-256 and finite (a diverged run is refused), and
    the SHA-256 of the very bytes they were read from (what a sample set's manifest records)."""
    if not path.exists():
        raise CheckpointError(f"{path}: weights file missing")
    raw = path.read_bytes()
    sha256 = hashlib.sha256(raw).hexdigest()
    verify(path, sha256)
    try:
        weights = load_safetensors(raw)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: {bad[0]} holds NaN or infinite values (the run diverged); use an earlier "
                              "checkpoint (--checkpoint STEP)")
    return weights, sha256


def upgrade_keys(weights: dict[str, Any]) -> dict[str, Any]:
    """geca 0.1 named the final layer's parts final_ada / final; they now live in one FinalLayer."""
    renamed = {}
    for k, v in weights.items():
        if k.startswith("final_ada."):
            k = "final.ada." + k[len("final_ada."):]
        elif k in ("final.weight", "final.bias"):
            k = "final.linear." + k.split(".")[1]
        renamed[k] = v
    return renamed


def load_state_dict_into(model: torch.nn.Module, path: Path) -> str:
    """Load the safetensors file `path` into `model`, strictly: every key, every shape; returns the file's SHA-256."""
    weights, sha256 = load_weights(path)  # its own errors (missing, corrupt, diverged) say so themselves
    weights = upgrade_keys(weights)
    own = model.state_dict()
    for key, tensor in weights.items():  # load_state_dict would cast integers into float weights without a word
        if key in own and tensor.dtype.is_floating_point != own[key].dtype.is_floating_point:
            raise CheckpointError(f"{path}: weights do not fit the model ({key} holds {tensor.dtype}, the model's "
                                  f"{own[key].dtype})")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        # torch's first line names only the model class; the first of its reasons says what does not fit
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = lines[1] if len(lines) > 1 else lines[0] if lines else "no reason given"
        reason = reason if len(reason) <= 300 else reason[:300] + " …"
        raise CheckpointError(f"{path}: weights do not fit the model ({reason})") from None
    return sha256
