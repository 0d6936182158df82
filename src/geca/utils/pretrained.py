"""Pretrained weight files: found at an explicit path or in $GECA_WEIGHTS_DIR (never the network), checked against
their published SHA-256 prefix, and read without ever running a pickle's code."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from geca.errors import DataError, MissingWeightsError
from geca.utils.io import file_sha256

WEIGHTS_DIR_ENV = "GECA_WEIGHTS_DIR"
# Accept a pretrained file whose SHA-256 is not the published one (a re-saved copy, say): it is still read without
# running pickle code, but its numbers may not be the paper's.
UNVERIFIED_ENV = "GECA_UNVERIFIED_WEIGHTS"


def torch_hub_checkpoints() -> Path:
    """Where torch (torchvision, torch.hub) keeps downloaded weights: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(explicit: str | Path | None, filename: str, what: str, url: str, flag: str) -> Path:
    """The weight file to load: `explicit` if given, else `filename` in $GECA_WEIGHTS_DIR, else in torch's hub cache
    (where torchvision puts it); it must exist."""
    if explicit is not None:
        candidates = [Path(explicit).expanduser()]
        if candidates[0].is_dir():
            raise MissingWeightsError(f"{flag} {explicit}: a folder; give the {what} weights file itself "
                                      f"({filename}), or name the folder with ${WEIGHTS_DIR_ENV}")
    else:
        candidates = [Path(os.environ[WEIGHTS_DIR_ENV]).expanduser() / filename] if os.environ.get(WEIGHTS_DIR_ENV) \
            else []
        candidates.append(torch_hub_checkpoints() / filename)
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    unset = "" if explicit is not None or os.environ.get(WEIGHTS_DIR_ENV) else f"; ${WEIGHTS_DIR_ENV} is unset"
    # `flag` is a command's flag, or a config key (with its file) a study sets
    give = f"pass {flag} /path/to/{filename}" if flag.startswith("-") else f"set {flag} to /path/to/{filename}"
    raise MissingWeightsError(
        f"{what} weights not found (looked for {looked}{unset}). This machine never downloads: fetch {filename} from "
        f"{url} on a machine with internet, then {give} or put it in the folder named by ${WEIGHTS_DIR_ENV} (or "
        "torch's hub cache)."
    )


def check_published(path: Path, prefix: str, published_name: str, what: str) -> str:
    """Refuse a file whose SHA-256 does not start with the published `prefix`, before anything reads it; returns the
    digest. ${GECA_UNVERIFIED_WEIGHTS}=1 turns the refusal into a warning."""
    digest = file_sha256(path)
    if not digest.startswith(prefix):
        msg = (f"{path}: SHA-256 {digest[:16]}… is not that of the published {what} file {published_name} (which "
               f"starts {prefix})")
        if os.environ.get(UNVERIFIED_ENV) != "1":
            raise DataError(f"{msg}; refusing to read it (set {UNVERIFIED_ENV}=1 to use it anyway; it is never "
                            "unpickled with code)")
        warnings.warn(f"{msg}; using it because {UNVERIFIED_ENV}=1", stacklevel=2)
    return digest


def load_torch_file(path: Path) -> object:
    """`torch.load(weights_only=True)` on the CPU: tensors and plain containers only. A file holding anything else is
    a ValueError that says so (torch's own message advises `weights_only=False`, which would run a crafted file's
    code: never passed on), and torch's warnings about the pickle protocol stay unprinted."""
    import pickle

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = str(e).partition("WeightsUnpickler error:")[2].strip().split(". ")[0].splitlines()
            raise ValueError("holds objects other than tensors, or is no torch file; refusing to unpickle it"
                             + (f" ({found[0]})" if found else "")) from None


def load_state_dict_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} state dict from safetensors or from a torch file read with `weights_only=True`.

    Third-party loaders (torch-fidelity's among them) call `torch.load(weights_only=False)`, which runs any code a
    crafted file carries; every pretrained file goes through here instead.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = load_torch_file(path)
    except Exception as e:  # torch.load and safetensors raise many unrelated types for a bad or hostile file
        raise DataError(f"{path}: not a readable {what} weights file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and type(v) is torch.Tensor for k, v in state.items()):
        raise DataError(f"{path}: not a {what} state dict (expected a mapping of names to tensors)")
    return dict(state)
