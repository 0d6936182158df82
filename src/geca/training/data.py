"""What a run trains on: the training split as pixels or cached latents on the device, and its batches as a pure
function of the step."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from geca.config import RunConfig
from geca.data.folds import folds_digest, stable_folds
from geca.data.imageset import ImageSet
from geca.data.registry import load_split, located_spec, source_key
from geca.errors import DataError
from geca.latent.cache import LatentSet, ensure_latents
from geca.latent.codec import LatentCodec
from geca.run import ModelSpec
from geca.training.distributed import main_first, same_folds_everywhere
from geca.utils.images import to_uint8
from geca.utils.seeding import derive_seed


class BatchStream:
    """Batch indices as a pure function of the step: epochs are seeded permutations of the dataset."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 0xDA7A))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        pos = torch.arange(start, start + count)
        return torch.stack([self._perm(int(p) // self.n)[int(p) % self.n] for p in pos])


@dataclass
class TrainingData:
    """What the denoiser trains on, on the device: images (or latents), their mirrored twins where the mirror is not
    a flip of the tensor (latents), label vectors, and how model-space tensors become uint8 images."""

    data: ImageSet
    images: torch.Tensor
    flipped: torch.Tensor | None
    labels: torch.Tensor
    latent: LatentSet | None
    to_images: Callable[[torch.Tensor], np.ndarray]
    folds_sha256: str | None  # of the folds file the split was read from
    data_key: str | None  # geca.data.registry.source_key of the data spec

    def spec(self, config: RunConfig) -> ModelSpec:
        d, folds = self.data, config.data.folds_file
        where = None if folds is None else str(Path(folds).expanduser().resolve())
        return ModelSpec(model=config.model, diffusion=config.diffusion,
                         data=replace(config.data, spec=located_spec(config.data.spec), folds_file=where),
                         folds_sha256=self.folds_sha256, data_key=self.data_key,
                         in_channels=self.images.shape[1], num_classes=d.num_classes, resolution=self.images.shape[-1],
                         class_names=d.class_names, multilabel=d.multilabel,
                         latent=None if self.latent is None else self.latent.spec)


def _latents(config: RunConfig, data: ImageSet, run_dir: Path, accelerator: Accelerator,
             codec: Callable[[], LatentCodec], progress: bool) -> LatentSet:
    """The main process builds (or reuses) the latent cache of the training split; the others read it after."""
    d = config.data
    cache = Path(d.latent_cache).expanduser() if d.latent_cache else run_dir / "latents"
    kwargs: dict[str, Any] = dict(size=d.latent_size, mean=d.latent_mean, get_codec=codec)

    def build(main: bool) -> LatentSet:
        result, status = ensure_latents(d.vae, data, "train", cache, progress=progress and main, build=main, **kwargs)
        if main:
            tqdm.write(f"latents of the training images: {status} ({cache / 'train'})")
        return result

    return main_first(accelerator, build, "building the latent cache")


def training_data(config: RunConfig, run_dir: Path, accelerator: Accelerator, progress: bool,
                  train_set: ImageSet | None = None) -> TrainingData:
    """The training split, as pixels or (with a VAE) as cached latents."""
    d = config.data
    if train_set is not None:
        data, digest = train_set, None if d.folds_file is None else folds_digest(d.folds_file)
    else:
        def load(main: bool) -> tuple[ImageSet, str | None]:
            with stable_folds(d.folds_file) as digest:  # the others read what the main process downloaded
                return load_split(d.spec, "train", image_size=d.image_size, folds_file=d.folds_file, fold=d.fold,
                                  cv_val=d.cv_val, download=d.download and main), digest

        data, digest = main_first(accelerator, load, "loading the training data")
        same_folds_everywhere(accelerator, d.folds_file, digest)
    try:
        key = source_key(d.spec)
    except DataError:  # a split handed in by a caller, under a spec that names nothing loadable
        key = None
    if not d.vae:
        images, labels = data.tensors()
        return TrainingData(data, images, None, labels, None, to_uint8, digest, key)
    codec = functools.cache(lambda: LatentCodec.load(d.vae, d.latent_size, accelerator.device))
    latent = _latents(config, data, run_dir, accelerator, codec, progress)
    return TrainingData(data, latent.latents, latent.flipped.to(accelerator.device), latent.labels, latent,
                        lambda x: codec().decode(x, latent.spec.image_channels), digest, key)
