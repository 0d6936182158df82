"""The Python API: a trained run as one object, for notebooks and scripts.

    import geca
    run = geca.load_run("runs/rmnist")
    images = run.sample(["grade 0", "grade 4"], steps=50, sampler="ddim", seed=0)  # uint8 (N, H, W, C)

The same settings, seed and batch size give the same images as `geca sample` on the same device.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from geca.errors import GecaError
from geca.run import LoadedRun
from geca.run import load_run as _load
from geca.sampling.config import GROWTH_FRAMES, GROWTH_T, SamplerConfig, growth_sampler
from geca.sampling.generate import generate, run_sampler
from geca.sampling.growth import Organism, grow_organism
from geca.sampling.labels import one_hot, resolve_class
from geca.utils.hardware import resolve_device
from geca.utils.images import pil_image
from geca.utils.schema import MAX_BATCH, from_dict


class Run:
    """A loaded run: `sample` labelled images, `grow` one organism; `loaded` holds the model, spec and diffusion."""

    def __init__(self, loaded: LoadedRun, device: torch.device) -> None:
        self.loaded, self.device = loaded, device

    @property
    def class_names(self) -> list[str]:
        return list(self.loaded.spec.class_names)

    @property
    def step(self) -> int:
        return self.loaded.step

    def __repr__(self) -> str:
        s = self.loaded.spec
        return (f"geca.Run({str(self.loaded.run_dir)!r}, model={s.model.name}, step={self.step}, "
                f"classes={self.class_names}, shape={s.shape})")

    def labels(self, labels: Sequence[str | int] | Sequence[Sequence[float]] | np.ndarray | torch.Tensor
               ) -> torch.Tensor:
        """Label vectors (N, K): from class names or indices (each one-hot; a 1-D integer array or tensor too), or
        label vectors of 0/1 entries passed through (one 1 each for a multi-class run)."""
        k = len(self.class_names)
        if isinstance(labels, (str, int)):
            raise TypeError(f"labels must be a sequence (one image per entry): pass [{labels!r}], not {labels!r}")
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        if not isinstance(labels, (Sequence, np.ndarray)):
            raise TypeError(f"labels must be a list, array or tensor (one image per entry), got "
                            f"{type(labels).__name__}")
        if len(labels) == 0:
            raise ValueError("no labels given: pass one class name, index or label vector per image")
        if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
            labels = labels.tolist()
        if isinstance(labels, np.ndarray) or all(isinstance(x, (Sequence, np.ndarray)) and not isinstance(x, str)
                                                 for x in labels):
            return self._vectors(labels)
        for x in labels:
            if not isinstance(x, (str, int, np.integer)) or isinstance(x, bool):
                raise TypeError(f"labels: {x!r} is neither a class name nor an index; pass names or indices, or label "
                                f"vectors of {k} entries")
        return one_hot([resolve_class(str(c), self.class_names) for c in labels], k)

    def _vectors(self, labels: Sequence[Sequence[float]] | np.ndarray) -> torch.Tensor:
        k = len(self.class_names)
        try:
            y = np.asarray(labels, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"labels: label vectors must all have {k} numbers") from None
        if y.ndim != 2 or y.shape[1] != k:
            raise ValueError(f"labels: expected label vectors (N, {k}) for the run's {k} classes, or class names or "
                             f"indices (N,); got shape {y.shape}")
        bad = np.flatnonzero(~np.isin(y, (0, 1)).all(1))
        if len(bad):
            raise ValueError(f"labels: row {bad[0]} is {y[bad[0]].tolist()}; label vectors hold 0 or 1 entries")
        if not self.loaded.spec.multilabel and len(bad := np.flatnonzero(y.sum(1) != 1)):
            raise ValueError(f"labels: row {bad[0]} marks {int(y[bad[0]].sum())} classes; the run is multi-class "
                             "(one 1 per label vector)")
        return torch.from_numpy(y)

    def sample(self, labels: Sequence[str | int] | np.ndarray | torch.Tensor, *, seed: int = 0,
               batch_size: int = 64, pil: bool = False, progress: bool = False, **sampling: Any
               ) -> np.ndarray | list[Image.Image]:
        """One image per label; `sampling` takes SamplerConfig's fields (sampler, steps, guidance_scale, ghg,
        nca_steps, eta, clip_x0, schedule, precision), defaulting as `geca sample` does. Returns uint8 (N, H, W, C)
        or PIL images."""
        _check_int("seed", seed, 0, 2**63 - 1, "[0, 2⁶³)")
        _check_int("batch_size", batch_size, 1, MAX_BATCH, f"[1, {MAX_BATCH:,}]")
        with _parameter_names():
            sampler = run_sampler(self.loaded, sampler_config(**sampling), strict=True)
            images = generate(self.loaded, self.labels(labels), sampler, int(seed), int(batch_size), self.device,
                              progress)
        return [pil_image(im) for im in images] if pil else images

    def grow(self, label: str | int, out: str | Path, *, t: int = GROWTH_T, frames: int = GROWTH_FRAMES, seed: int = 0,
             overwrite: bool = False, **sampling: Any) -> Organism:
        """`geca grow`: one organism of `label`, its M updates at noise level t and its denoising, written to `out`
        (GIFs and strips; an earlier growth's files there are replaced only with `overwrite`). Sampling defaults to
        DDIM 50 as the command does."""
        _check_int("seed", seed, 0, 2**63 - 1, "[0, 2⁶³)")
        default = growth_sampler()
        sampler = sampler_config(**{"sampler": default.sampler, "steps": default.steps, **sampling})
        with _parameter_names():
            return grow_organism(self.loaded, str(label), t, run_sampler(self.loaded, sampler, strict=True), frames,
                                 int(seed), self.device, Path(out), overwrite)


def sampler_config(**sampling: Any) -> SamplerConfig:
    known = {f.name for f in fields(SamplerConfig)}
    unknown = sorted(set(sampling) - known)
    if unknown:
        raise TypeError(f"unknown sampling setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    # types checked as a config's are (steps=2.5 is refused); numpy's scalars as the Python numbers they hold
    plain = {k: v.item() if isinstance(v, np.generic) else v for k, v in sampling.items()}
    return from_dict(SamplerConfig, plain, "sampling")


def _check_int(name: str, value: Any, low: int, high: int, shown: str) -> None:
    """An integer (numpy's too) in [low, high]; `shown` is the range as the message gives it."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {shown}, got {value!r}")


def load_run(run_dir: str | Path, checkpoint: str | int | None = None, weights: str = "ema",
             device: str = "auto", vae: str | Path | None = None) -> Run:
    """A trained run directory (from `geca train`): its EMA weights of the latest checkpoint by default
    (`checkpoint`: "best", a step number or a directory); `vae`: a latent run's VAE where it is now, if it moved."""
    with _parameter_names():
        dev = resolve_device(device)
        return Run(_load(Path(run_dir), checkpoint, weights, dev, vae), dev)


# the library's checks name the command line's flags; a caller of this API wrote these keyword arguments instead
# (a flag of another command, such as geca train --validate-every, stays as it is)
_PARAMETERS = {"--run": "run_dir", "--checkpoint": "checkpoint", "--weights": "weights", "--device": "device",
               "--seed": "seed", "--batch-size": "batch_size", "--sampler": "sampler", "--steps": "steps",
               "--cfg": "guidance_scale", "--ghg": "ghg", "--m": "nca_steps", "--schedule": "schedule",
               "--precision": "precision", "--clip-x0": "clip_x0", "--t": "t", "--frames": "frames", "--out": "out",
               "--vae": "vae", "--overwrite": "overwrite=True"}
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


@contextmanager
def _parameter_names() -> Iterator[None]:
    """Errors raised inside name this API's parameters (`nca_steps`), not the flags (`--m`)."""
    said: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            yield
    except (GecaError, FileExistsError) as e:
        message = _named(str(e))
        if message == str(e):
            raise
        raise type(e)(message) from None
    finally:
        for w in said:  # `ghg="hidden"` on a run trained without heredity, said as `--ghg hidden` inside
            warnings.warn(_named(str(w.message)), w.category, stacklevel=4)


def _named(message: str) -> str:
    return _FLAG.sub(lambda m: _PARAMETERS.get(m[0], m[0]), message)
