"""Labelled sample sets: one function samples them (for `geca sample`, the training preview, validation and the
study), and a sample directory holds them on disk: images/*.png, labels.csv, manifest.json."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import time
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import geca
from geca.diffusion.gaussian import GaussianDiffusion
from geca.errors import ConfigError, DataError
from geca.latent.codec import LatentCodec
from geca.models.base import Denoiser
from geca.run import LoadedRun
from geca.sampling.config import SamplerConfig, settings_key
from geca.sampling.samplers import resolved_precision, sample
from geca.sampling.trace import FIELDS as TRACE_FIELDS
from geca.utils.images import pil_image, to_uint8
from geca.utils.io import (
    atomic_write_json,
    atomic_write_text,
    few,
    has_csv_header,
    other_files,
    output_dir,
    read_json_object,
    real_dir,
    replace_dir,
)
from geca.utils.schema import MAX_BATCH, changes
from geca.utils.seeding import derive_seed, kept_random_state

Decoder = Callable[[torch.Tensor], np.ndarray]


def sample_batches(model: Denoiser, diffusion: GaussianDiffusion, labels: torch.Tensor, shape: tuple[int, int, int],
                   sampler: SamplerConfig, seed: int, batch_size: int, device: torch.device | str,
                   decode: Decoder = to_uint8, progress: bool = False, skip: Collection[int] = ()
                   ) -> Iterator[tuple[int, np.ndarray]]:
    """(b, uint8 images (n, H, W, C)) for each batch b of `batch_size` label vectors not in `skip`. Batch b draws
    from seed (seed, b), so the same seed gives the same images whatever came before (or was skipped); the global
    random state is left as it was. A bad batch size is refused here, before the first batch is asked for."""
    if not 1 <= batch_size <= MAX_BATCH:
        raise ConfigError(f"--batch-size must be in [1, {MAX_BATCH}], got {batch_size}")
    return _batches(model, diffusion, labels, shape, sampler, seed, batch_size, device, decode, progress, skip)


def _batches(model: Denoiser, diffusion: GaussianDiffusion, labels: torch.Tensor, shape: tuple[int, int, int],
             sampler: SamplerConfig, seed: int, batch_size: int, device: torch.device | str, decode: Decoder,
             progress: bool, skip: Collection[int]) -> Iterator[tuple[int, np.ndarray]]:
    with kept_random_state(device):
        batches = labels.split(batch_size)
        bar = tqdm(total=len(batches), initial=len(set(skip)), desc="batches", disable=not progress)
        for b, y in enumerate(batches):
            if b in skip:
                continue
            torch.manual_seed(derive_seed(seed, b, 0))
            images = decode(sample(model, diffusion, y.to(device), shape, sampler, progress=progress))
            bar.update(1)
            yield b, images
        bar.close()


def sample_images(model: Denoiser, diffusion: GaussianDiffusion, labels: torch.Tensor, shape: tuple[int, int, int],
                  sampler: SamplerConfig, seed: int, batch_size: int, device: torch.device | str,
                  decode: Decoder = to_uint8, progress: bool = False) -> np.ndarray:
    """One uint8 image (N, H, W, C) per label vector (see `sample_batches`)."""
    out = [images for _, images in sample_batches(model, diffusion, labels, shape, sampler, seed, batch_size, device,
                                                 decode, progress)]
    return np.concatenate(out) if out else decode(torch.zeros(0, *shape))


def decoder(run: LoadedRun, device: torch.device | str, batch_size: int = 16) -> Decoder:
    """Model-space tensors → uint8 images: the run's VAE for latent runs, a rescale for pixel runs."""
    latent = run.spec.latent
    if latent is None:
        return to_uint8
    codec = LatentCodec.for_spec(latent, device, batch_size)
    return lambda x: codec.decode(x, latent.image_channels)


def run_sampler(run: LoadedRun, sampler: SamplerConfig, strict: bool = False) -> SamplerConfig:
    """The settings `run` samples with (see SamplerConfig.for_model); `strict` (the commands) also warns when a
    GeCA is asked to inherit what its training never handed over: C_h after published training, C_out after any."""
    resolved = sampler.for_model(run.model.has_cell_state, run.spec.latent is not None, strict,
                                 ghg_default=run.model.ghg_default)
    resolved.check_steps(run.diffusion.num_timesteps)
    if strict and resolved.ghg in ("hidden", "both") and run.model.ghg_default == "none":
        warnings.warn(f"--ghg {resolved.ghg}: {run.run_dir} was trained without heredity (model.heredity: off), and "
                      "inheriting C_h turns such a model's samples to noise; use --ghg none, or train with --heredity",
                      stacklevel=2)
    if strict and resolved.ghg in ("out", "both"):
        warnings.warn(f"--ghg {resolved.ghg}: no training geca offers hands C_out from one call to the next "
                      "(heredity-aware training carries C_h only), and inheriting it gave noise after either training "
                      "(KID×10³ above 200,000 in the synthetic-OCT study); use --ghg hidden or none", stacklevel=2)
    return resolved


def generate(run: LoadedRun, labels: torch.Tensor, sampler: SamplerConfig, seed: int, batch_size: int,
             device: torch.device | str, progress: bool = False) -> np.ndarray:
    """`sample_images` for a loaded run; a latent run's samples are decoded by the VAE it was trained with."""
    return sample_images(run.model, run.diffusion, labels, run.spec.shape, run_sampler(run, sampler), seed,
                         batch_size, device, decoder(run, device, batch_size), progress)


def _work_key(weights_sha256: str, labels: torch.Tensor, sampler: SamplerConfig, seed: int, batch_size: int) -> str:
    """What makes a sample set's images: an unfinished one is resumed only under the same key."""
    h = hashlib.sha256(json.dumps({"weights": weights_sha256, "sampling": settings_key(asdict(sampler)),
                                   "seed": seed, "batch_size": batch_size}, sort_keys=True).encode())
    h.update(labels.numpy().astype(np.float32).tobytes())
    return h.hexdigest()[:16]


def _work_settings(weights_sha256: str, labels: torch.Tensor, sampler: SamplerConfig, seed: int,
                   batch_size: int) -> dict[str, Any]:
    """The key's parts as the user gives them (every setting resolved, none left out as a default), recorded beside
    the key so that --resume can say which one differs."""
    return {"weights": weights_sha256, "sampling": asdict(sampler), "seed": seed,
            "batch_size": batch_size,
            "labels": hashlib.sha256(labels.numpy().astype(np.float32).tobytes()).hexdigest()[:16]}


def _unfinished(work: Path, key: str, settings: dict[str, Any], resume: bool) -> set[int]:
    """The batches an interrupted run left in `work` (reused by --resume under the same settings); anything else
    there is cleared."""
    progress = work / "progress.json"
    if work.is_dir() and resume and progress.is_file():
        try:
            state = read_json_object(progress, DataError)
        except DataError:  # damaged by the interruption: its batches cannot be trusted, so they are sampled again
            state = {}
        batches = state.get("batches", [])
        if state.get("key") == key and isinstance(batches, list) and all(type(b) is int for b in batches):
            return set(batches)
        if state.get("key") is not None:
            raise ConfigError(f"--resume: {work} holds an unfinished set sampled with {_other(state, settings)}; "
                              "rerun with those, or without --resume to start afresh")
    if work.exists():
        shutil.rmtree(work)
    return set()


def _other(state: dict[str, Any], settings: dict[str, Any]) -> str:
    """What an unfinished set's recorded settings have that these do not, in words."""
    recorded = state.get("settings")  # absent where written before the settings were recorded
    shown = {"weights": "other weights (another run or checkpoint)", "labels": "other label vectors"}
    return ", ".join(shown.get(key) or f"{key} {was!r} (now {now!r})" for key, was, now in
                     changes(recorded if isinstance(recorded, dict) else settings, settings)) or \
        "other settings, seed or weights"


SET_FILES = ("images", "labels.csv", "manifest.json")


def _check_replaceable(out: Path) -> None:
    """--overwrite replaces a folder whole: only an earlier sample set, holding nothing but what geca wrote there."""
    try:
        ours = isinstance(read_json_object(out / "manifest.json", DataError).get("num_images"), int)
    except DataError:
        ours = False
    if not ours:
        raise FileExistsError(f"--overwrite replaces an earlier sample set (a folder with geca's manifest.json); {out} "
                              "is none: choose another --out")

    def own(p: Path) -> bool:  # the set's files, and a --trace written into the set (its CSV and plot)
        trace = p.with_suffix(".csv")
        return p.name in SET_FILES or (p.suffix in (".csv", ".png") and has_csv_header(trace, TRACE_FIELDS))

    others = other_files(out, own) + [
        f"images/{n}" for n in other_files(out / "images", lambda p: re.fullmatch(r"\d{6,}\.png", p.name) is not None)]
    if others:
        raise FileExistsError(f"--overwrite replaces {out} whole, and it holds files of yours beside the sample set "
                              f"({few(others)}): move them, or choose another --out")


def labels_csv(filenames: list[str], labels: np.ndarray, class_names: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["filename", *class_names])
    for name, row in zip(filenames, labels, strict=True):
        writer.writerow([name, *(int(v) for v in row)])
    return buf.getvalue()


def write_images(directory: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> list[str]:
    """images/NNNNNN.png and labels.csv in `directory`; returns the file names."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    names = [f"images/{i:06d}.png" for i in range(len(images))]
    for name, img in zip(names, images, strict=True):
        pil_image(img).save(directory / name)
    atomic_write_text(directory / "labels.csv", labels_csv(names, labels, class_names))
    return names


def write_sample_dir(out: Path, run: LoadedRun, labels: torch.Tensor, sampler: SamplerConfig, seed: int,
                     batch_size: int, device: torch.device | str, extra: dict[str, Any] | None = None,
                     overwrite: bool = False, progress: bool = True, resume: bool = False
                     ) -> tuple[dict[str, Any], np.ndarray]:
    """Sample into a hidden sibling directory, one batch of PNGs at a time, and move it into place only when whole;
    returns (manifest, images). An interrupted run leaves its finished batches there for `resume`."""
    out = real_dir(output_dir(out))
    run_dir = run.run_dir.resolve()
    if out.resolve() == run_dir or out.resolve() in run_dir.parents:
        raise ConfigError(f"--out {out}: holds the run {run.run_dir}, which writing the set there would delete; "
                          "choose another --out")
    filled = out.is_dir() and any(out.iterdir())
    if filled and overwrite:
        _check_replaceable(out)
    if filled and not overwrite:
        if resume and (out / "manifest.json").is_file():
            raise FileExistsError(f"--resume: {out} is a finished sample set already (its manifest.json is written); "
                                  "nothing is left to resume (--overwrite samples it afresh)")
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    if len(labels) == 0:
        raise ConfigError("no label vectors to sample")
    sampler = run_sampler(run, sampler)  # so that the manifest records what sampling used
    sampler = replace(sampler, precision=resolved_precision(sampler.precision, device))
    work = out.with_name(f".{out.name}.unfinished")  # one per target, found again by --resume
    done: set[int] = set()  # filled below; the batches read it only once iterated
    batches = sample_batches(run.model, run.diffusion, labels, run.spec.shape, sampler, seed, batch_size, device,
                             decoder(run, device, batch_size), progress, skip=done)  # checks the batch size first
    key = _work_key(run.weights_sha256, labels, sampler, seed, batch_size)
    settings = _work_settings(run.weights_sha256, labels, sampler, seed, batch_size)
    done |= _unfinished(work, key, settings, resume)
    (work / "images").mkdir(parents=True, exist_ok=True)
    names = [f"images/{i:06d}.png" for i in range(len(labels))]
    t0 = time.time()
    for b, batch in batches:
        for name, img in zip(names[b * batch_size:], batch, strict=False):
            pil_image(img).save(work / name)
        done.add(b)
        atomic_write_json(work / "progress.json", {"key": key, "settings": settings, "batches": sorted(done)})
    images = np.stack([np.asarray(Image.open(work / n)) for n in names])
    if images.ndim == 3:  # grey PNGs read back without a channel axis
        images = images[..., None]
    atomic_write_text(work / "labels.csv", labels_csv(names, labels.numpy(), run.spec.class_names))
    (work / "progress.json").unlink()
    manifest = {
        "run": str(run.run_dir.resolve()),
        "checkpoint": str(run.checkpoint.resolve()),
        "checkpoint_step": run.step,
        "weights_file": run.weights_file.name,
        "weights_sha256": run.weights_sha256,
        "model": run.spec.model.name,
        "trained_on": run.spec.training_split(),  # classify refuses a set whose generator saw its test patients
        "sampling": asdict(sampler),
        "seed": seed,
        "batch_size": batch_size,
        "num_images": len(images),
        "class_names": run.spec.class_names,
        "multilabel": run.spec.multilabel,
        "latent": None if run.spec.latent is None else asdict(run.spec.latent),
        "seconds": round(time.time() - t0, 2),
        "device": str(device),
        "geca_version": geca.__version__,
        "torch_version": torch.__version__,
        **(extra or {}),
    }
    atomic_write_json(work / "manifest.json", manifest)
    replace_dir(work, out)
    return manifest, images
