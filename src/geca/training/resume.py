"""Resuming a run: its latest checkpoint and state, loaded into the model, its EMA, the optimizer and the loss
scaler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from geca.errors import CheckpointError
from geca.run import find_checkpoint, load_state_dict_into, read_state, verify
from geca.training.ema import EMA
from geca.utils.pretrained import load_torch_file


def latest_checkpoint(run_dir: Path) -> tuple[Path, int, dict[str, Any]]:
    """The latest checkpoint, its step and its state (elapsed time, images seen)."""
    ckpt = find_checkpoint(run_dir)
    state = read_state(ckpt)
    for key, kind in (("step", int), ("elapsed_s", (int, float)), ("images_seen", int)):
        if not isinstance(state.get(key), kind) or isinstance(state[key], bool):
            raise CheckpointError(f"{ckpt / 'state.json'}: missing, or holds no valid {key}; cannot resume from {ckpt}")
    state.pop("files", None)
    state.pop("grad_scaler", None)  # the scaler's own state, read by _resume
    return ckpt, int(state.pop("step")), state


def resume_from(ckpt: Path, model: torch.nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None) -> None:
    """Load checkpoint `ckpt` into the model, its EMA, the optimizer and fp16's loss scaler."""
    load_state_dict_into(model, ckpt / "model.safetensors")
    load_state_dict_into(ema.model, ckpt / "ema.safetensors")
    opt_file = ckpt / "optimizer.pt"
    verify(opt_file)
    corrupt = f"{opt_file}: corrupt or not an optimizer state written by geca"
    try:
        saved = load_torch_file(opt_file)  # on the CPU first: a run trained on a GPU resumes on one without
    except ValueError as e:
        raise CheckpointError(f"{corrupt} ({e})") from None
    except Exception as e:  # torch's reader raises whatever its parser hits in truncated or foreign bytes
        raise CheckpointError(f"{corrupt} (torch.load: {type(e).__name__})") from None
    if not (isinstance(saved, dict) and {"state", "param_groups"} <= saved.keys()):
        raise CheckpointError(f"{corrupt} (a {type(saved).__name__} without state and param_groups)")
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{opt_file}: does not fit this model's optimizer ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    scale = read_state(ckpt).get("grad_scaler")
    if scaler is not None and isinstance(scale, dict):
        scaler.load_state_dict(scale)
