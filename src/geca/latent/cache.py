"""The latent cache: per split, the latents of every image and of its mirror image, keyed by what made them.

Layout: ``CACHE/<split>/latents.safetensors`` (``latents``, ``latents_flipped``: float32 (N, C, h, w);
``labels``: float32 (N, K)) and ``CACHE/<split>/meta.json`` (the key, its components, labels' class names, ids,
and the LatentSpec a run records). Each split directory is written whole and then moved into place.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import geca
from geca.data.imageset import ImageSet
from geca.errors import LatentError
from geca.latent.codec import LatentCodec
from geca.latent.spec import LatentSpec
from geca.latent.vae import latent_affine, read_config, resolve_vae, vae_identity
from geca.utils.io import atomic_write_json, few, other_files, staged_dir

CACHE_FORMAT = 1
ENCODE_SEED = 0
PREPROCESS = "centre square crop, bicubic antialiased resize, [-1, 1], grey repeated to RGB"


@dataclass
class LatentSet:
    """One split's cached latents (and the latents of the mirrored images) with its labels, on the CPU."""

    latents: torch.Tensor
    flipped: torch.Tensor
    labels: torch.Tensor
    spec: LatentSpec
    meta: dict[str, Any]


def data_sha256(data: ImageSet) -> str:
    """Content hash of the images, labels and class names: catches any change of file, fold, size or options."""
    h = hashlib.sha256()
    h.update(json.dumps([list(data.images.shape), data.class_names]).encode())
    h.update(data.images.tobytes())
    h.update(data.labels.astype("float32").tobytes())
    return h.hexdigest()


def key_components(vae_id: dict[str, Any], data: ImageSet, size: int, mean: bool, scale: float,
                   shift: float) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "preprocess": PREPROCESS,
            "data": {"sha256": data_sha256(data), "num_images": len(data), "image_shape": list(data.images.shape[1:])},
            "vae": vae_id, "size": size, "mode": "mean" if mean else "sample", "scale": scale, "shift": shift,
            "seed": ENCODE_SEED}


def cache_key(components: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


def _read(split_dir: Path, components: dict[str, Any], spec: LatentSpec, num: int) -> tuple[LatentSet | None, str]:
    """The cached set if its key matches, else None and why it cannot be used."""
    meta_path = split_dir / "meta.json"
    if not meta_path.exists():
        return None, "no cache yet"
    try:
        meta = json.loads(meta_path.read_text())
        old = dict(meta["components"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        return None, f"unreadable {meta_path} ({e})"
    if meta.get("key") != cache_key(components):
        changed = sorted(k for k in set(old) | set(components) if old.get(k) != components.get(k))
        return None, f"changed: {', '.join(changed) or 'key'}"
    try:
        t = load_file(split_dir / "latents.safetensors")
        lat, flipped, labels = t["latents"], t["latents_flipped"], t["labels"]
    except (SafetensorError, OSError, KeyError) as e:
        return None, f"unreadable {split_dir / 'latents.safetensors'} ({e})"
    if len(lat) != num or flipped.shape != lat.shape or len(labels) != num:
        return None, f"{split_dir / 'latents.safetensors'} holds {len(lat)} latents, expected {num}"
    return LatentSet(lat, flipped, labels, spec, meta), ""


CACHE_FILES = ("latents.safetensors", "meta.json")


def check_cache_dir(split_dir: Path) -> None:
    """A cache folder is replaced whole when (re)built: refuse one that holds anything else (a hidden file, such as
    a file browser's .DS_Store, goes with it)."""
    others = other_files(split_dir, lambda p: p.name in CACHE_FILES)
    if others or split_dir.is_file():
        raise LatentError(f"{split_dir}: {'a file' if split_dir.is_file() else f'holds other files ({few(others)})'}; "
                          "a latent cache replaces this folder when it builds: choose another --out")


def _write(split_dir: Path, latents: LatentSet) -> None:
    with staged_dir(split_dir) as tmp:
        save_file({"latents": latents.latents.contiguous(), "latents_flipped": latents.flipped.contiguous(),
                   "labels": latents.labels.contiguous()}, tmp / "latents.safetensors")
        atomic_write_json(tmp / "meta.json", latents.meta)


def _request(vae: str, data: ImageSet, size: int, mean: bool) -> tuple[Path, dict[str, Any], LatentSpec]:
    """The VAE's folder, the cache key's components and the latent spec of encoding `data` with it."""
    root = resolve_vae(vae)
    identity = vae_identity(root)
    scale, shift = latent_affine(read_config(root))
    # a local directory is recorded absolute, so that sampling works from any working directory; a hub id as given
    spec = LatentSpec(vae=str(root) if Path(vae).expanduser().is_dir() else vae,
                      vae_sha256=identity["weights_sha256"], scale=scale, shift=shift, image_size=size,
                      image_channels=data.channels)
    return root, key_components(identity, data, size, mean, scale, shift), spec


def cached(vae: str, data: ImageSet, split: str, cache_dir: Path, *, size: int = 256, mean: bool = False
           ) -> LatentSet | None:
    """The cache of `split` if `ensure_latents` would reuse it as it is, else None (known without encoding)."""
    _, components, spec = _request(vae, data, size, mean)
    return _read(Path(cache_dir).expanduser() / split, components, spec, len(data))[0]


def ensure_latents(vae: str, data: ImageSet, split: str, cache_dir: Path, *, size: int = 256, mean: bool = False,
                   get_codec: Callable[[], LatentCodec], build: bool = True, progress: bool = False
                   ) -> tuple[LatentSet, str]:
    """Reuse ``cache_dir/split`` when its key matches, else (re)encode it with ``get_codec()``.

    Returns the set and what happened: 'reused', 'built' or 'rebuilt (why)'. With ``build=False`` (non-main
    processes) a missing or stale cache is an error.
    """
    root, components, spec = _request(vae, data, size, mean)
    split_dir = Path(cache_dir).expanduser() / split
    found, why = _read(split_dir, components, spec, len(data))
    if found is not None:
        return found, "reused"
    if not build:
        raise LatentError(f"{split_dir}: latent cache not usable ({why})")
    check_cache_dir(split_dir)
    codec = get_codec()
    if (codec.size, codec.scale, codec.shift) != (size, spec.scale, spec.shift):
        raise LatentError(f"{root}: codec (size {codec.size}, scale {codec.scale}) does not match the cache "
                          f"request (size {size}, scale {spec.scale})")
    kw = dict(mean=mean, seed=ENCODE_SEED, progress=progress)
    lat = codec.encode(data.images, **kw, desc=f"encoding {split}")
    flipped = codec.encode(data.images, flip=True, **kw, desc=f"encoding {split} (flipped)")
    meta = {"key": cache_key(components), "components": components, "split": split, "source": data.source,
            "num_images": len(data), "latent_shape": list(lat.shape[1:]), "class_names": data.class_names,
            "multilabel": data.multilabel, "ids": data.ids, "latent_spec": asdict(spec),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "geca_version": geca.__version__}
    result = LatentSet(lat, flipped, torch.from_numpy(data.labels), spec, meta)
    _write(split_dir, result)
    return result, "built" if why == "no cache yet" else f"rebuilt ({why})"
