"""Finding, identifying and loading a diffusers AutoencoderKL from local files only (never the network)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from geca.errors import LatentError
from geca.utils.io import file_sha256, per_file_version, read_json_object
from geca.utils.pretrained import load_state_dict_file

HOW_TO_GET = ("get it on a networked machine with `huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir "
              "DIR`, copy DIR here and pass --vae DIR")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DEFAULT_SCALE = 0.18215
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_vae(name: str) -> Path:
    """The local directory of VAE `name`: a directory path, or a hub id already in the local HF cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        root = path.resolve()
    elif not path.exists() and _HUB_ID.match(name):
        from huggingface_hub import snapshot_download

        try:
            root = Path(snapshot_download(name, local_files_only=True))
        except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError, HFValidationError a ValueError
            raise LatentError(f"VAE {name!r} not found: no such directory, and not in the local Hugging Face "
                              f"cache; {HOW_TO_GET}") from None
    elif path.is_file():
        raise LatentError(f"{path}: a file, not a VAE directory (a diffusers AutoencoderKL folder holding config.json "
                          f"and its weights); {HOW_TO_GET}")
    else:
        raise LatentError(f"VAE directory {path} not found; {HOW_TO_GET}")
    if not (root / "config.json").is_file():
        raise LatentError(f"{root / 'config.json'} not found: {root} is not a diffusers AutoencoderKL directory; "
                          f"{HOW_TO_GET}")
    return root


def read_config(root: Path) -> dict[str, Any]:
    path = root / "config.json"
    config = read_json_object(path, LatentError)
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise LatentError(f"{path}: not an AutoencoderKL config")
    return config


def weights_file(root: Path) -> Path:
    for name in WEIGHT_FILES:
        if (root / name).is_file():
            return root / name
    raise LatentError(f"{root}: VAE weights missing (expected {' or '.join(WEIGHT_FILES)}); {HOW_TO_GET}")


def latent_affine(config: dict[str, Any]) -> tuple[float, float]:
    """(scale, shift) with latents = (z − shift)·scale; SD VAEs have no shift, SD3/FLUX VAEs do."""
    return float(config.get("scaling_factor") or DEFAULT_SCALE), float(config.get("shift_factor") or 0.0)


def vae_identity(root: Path) -> dict[str, Any]:
    """The VAE's config (without diffusers' bookkeeping keys, which change with the path) and weights hash."""
    config = read_config(root)
    weights = weights_file(root)
    return {"config": {k: v for k, v in config.items() if not k.startswith("_")},
            "weights_sha256": _weights_sha256(weights)}


# encode asks for it twice per split (reuse, then encoding), training once per split; an SD-VAE takes a second or so
_weights_sha256 = per_file_version(file_sha256)


def load_vae(root: Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """AutoencoderKL.from_pretrained on a resolved local directory, frozen, in eval mode."""
    from diffusers import AutoencoderKL  # lazily: importing diffusers takes seconds

    weights = weights_file(root)
    if weights.suffix == ".bin":  # one that passes the weights-only reader holds nothing that runs in diffusers
        load_state_dict_file(weights, "VAE")
    try:
        # named, so that a .bin is read without diffusers' "defaulting to unsafe serialization" (it is not)
        vae = AutoencoderKL.from_pretrained(root, use_safetensors=weights.suffix == ".safetensors")
    except (OSError, ValueError, RuntimeError) as e:
        raise LatentError(f"{root}: cannot load the VAE ({str(e).splitlines()[0]})") from None
    return vae.to(device).eval().requires_grad_(False)
