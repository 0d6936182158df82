"""The training loop: accelerate for devices, processes and mixed precision; exact resume."""

from __future__ import annotations

import csv
import functools
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from geca.config import ConfigError, RunConfig, save_config
from geca.data import load_split
from geca.data.imageset import ImageSet
from geca.diffusion.gaussian import GaussianDiffusion
from geca.latent.cache import LatentSet, ensure_latents
from geca.latent.codec import LatentCodec
from geca.sampling.labels import per_class_labels
from geca.sampling.samplers import sample
from geca.training.checkpoint import (
    CheckpointError,
    ModelSpec,
    find_checkpoint,
    load_state_dict_into,
    load_weights,
    read_spec,
    save_checkpoint,
)
from geca.training.ema import EMA
from geca.utils.hardware import resolve_precision
from geca.utils.images import grid, save_png, to_uint8
from geca.utils.io import atomic_write_json, atomic_write_text
from geca.utils.plots import plot_loss_curve

ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
LOG_FIELDS = ["step", "epoch", "loss", "mse", "vb", "lr", "images_per_s", "elapsed_min"]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what to try."""


def step_seed(seed: int, step: int, rank: int) -> int:
    """Every random draw of a step depends only on (seed, step, rank): resuming is exact by construction."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


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
            seed = np.random.SeedSequence([self.seed, epoch, 0xDA7A]).generate_state(1)[0]
            g = torch.Generator().manual_seed(int(seed))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        pos = torch.arange(start, start + count)
        return torch.stack([self._perm(int(p) // self.n)[int(p) % self.n] for p in pos])


def _precision(cfg: RunConfig) -> str:
    """Accelerate's mixed-precision name for the configured precision (`auto` resolved for this machine)."""
    try:
        return ACCELERATE_PRECISION[resolve_precision(cfg.train.precision)]
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _preview(ema_model: torch.nn.Module, diffusion: GaussianDiffusion, spec: ModelSpec, cfg: RunConfig,
             path: Path, device: torch.device, to_images: Callable[[torch.Tensor], np.ndarray]) -> None:
    classes = list(range(min(spec.num_classes, cfg.preview.max_classes)))
    labels = per_class_labels(spec.num_classes, cfg.preview.per_class, classes).to(device)
    rng = torch.get_rng_state()
    torch.manual_seed(cfg.train.seed)
    x = sample(ema_model, diffusion, labels, (spec.in_channels, spec.resolution, spec.resolution),
               spec.sampling(cfg.preview.sampler))
    torch.set_rng_state(rng)
    images = to_images(x)
    save_png(grid(images, nrow=cfg.preview.per_class, upscale=max(1, 64 // images.shape[1])), path)


def _latents(cfg: RunConfig, data: ImageSet, run_dir: Path, accelerator: Accelerator,
             codec: Callable[[], LatentCodec], progress: bool) -> LatentSet:
    """The main process builds (or reuses) the latent cache of the training split; the others read it after."""
    cache = Path(cfg.data.latent_cache).expanduser() if cfg.data.latent_cache else run_dir / "latents"
    kwargs: dict[str, Any] = dict(size=cfg.data.latent_size, mean=cfg.data.latent_mean, get_codec=codec)
    result = None
    if accelerator.is_main_process:
        result, status = ensure_latents(cfg.data.vae, data, "train", cache, progress=progress, **kwargs)
        tqdm.write(f"latents of the training images: {status} ({cache / 'train'})")
    accelerator.wait_for_everyone()
    if result is None:
        result, _ = ensure_latents(cfg.data.vae, data, "train", cache, build=False, **kwargs)
    return result


class LossWindow:
    """Loss terms averaged over the steps since the last log row."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.started = time.time()

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        for k in ("loss", "mse", "vb"):
            if k in terms:
                self.sums[k] = self.sums.get(k, 0.0) + terms[k].mean().item()

    def row(self, step: int, batch_size: int, epoch: float, lr: float, elapsed_s: float) -> dict[str, object]:
        ips = self.steps * batch_size / max(time.time() - self.started, 1e-9)
        row: dict[str, object] = {"step": step, "epoch": f"{epoch:.3f}", "lr": lr, "images_per_s": f"{ips:.2f}",
                                  "elapsed_min": f"{elapsed_s / 60:.3f}"}
        row.update({k: f"{v / self.steps:.6g}" for k, v in self.sums.items()})
        self.reset()
        return row


def _append_log(log_path: Path, row: dict[str, object]) -> None:
    new = not log_path.exists()
    with open(log_path, "a", newline="") as f:
        writer = csv.DictWriter(f, LOG_FIELDS, restval="")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _rewrite_log(log_path: Path, upto_step: int) -> None:
    """On resume, drop log rows from steps after the checkpoint so the log never repeats a step."""
    if not log_path.exists():
        return
    rows = [r for r in csv.DictReader(open(log_path)) if int(r["step"]) <= upto_step]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(log_path, buf.getvalue())


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
          train_set: ImageSet | None = None) -> dict[str, Any]:
    """Train a denoiser into `run_dir`; returns a summary. Launch under torchrun for several processes."""
    run_dir = Path(run_dir)
    # Accelerate keeps mixed precision in a process-wide singleton; reset it (not the process group) so that
    # several runs with different precisions can share one Python process.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=_precision(cfg), cpu=not torch.cuda.is_available())
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if cfg.train.batch_size % world:
        raise ConfigError(f"batch size {cfg.train.batch_size} is not divisible by {world} processes")
    local_batch = cfg.train.batch_size // world
    has_ckpt = (run_dir / "checkpoints" / "latest.json").exists()
    if has_ckpt and not resume:
        raise CheckpointError(f"{run_dir} already holds a trained run; pass --resume to continue it or choose "
                              "another --out")
    if resume and not has_ckpt:
        raise CheckpointError(f"{run_dir}: nothing to resume (no checkpoints/latest.json)")

    data = train_set if train_set is not None else load_split(
        cfg.data.spec, "train", image_size=cfg.data.image_size, folds_file=cfg.data.folds_file,
        fold=cfg.data.fold, download=cfg.data.download and main)
    codec = functools.cache(lambda: LatentCodec.load(cfg.data.vae, cfg.data.latent_size, accelerator.device))
    latent = _latents(cfg, data, run_dir, accelerator, codec, progress) if cfg.data.vae else None
    if latent is None:
        (images, labels), flipped = data.tensors(), None
        to_images: Callable[[torch.Tensor], np.ndarray] = to_uint8
    else:
        images, flipped, labels = latent.latents, latent.flipped.to(accelerator.device), latent.labels

        def to_images(x: torch.Tensor) -> np.ndarray:
            return codec().decode(x, latent.spec.image_channels)

    spec = ModelSpec(model=cfg.model, diffusion=cfg.diffusion, data=cfg.data, in_channels=images.shape[1],
                     num_classes=data.num_classes, resolution=images.shape[-1], class_names=data.class_names,
                     multilabel=data.multilabel, latent=None if latent is None else latent.spec)
    if resume and read_spec(run_dir).to_dict() != spec.to_dict():
        raise CheckpointError(f"{run_dir}/model.json differs from this config (model, diffusion or data changed); "
                              "resume needs the same setup")
    torch.manual_seed(cfg.train.seed)
    model = spec.build()
    diffusion = spec.diffusion_process()
    ema = EMA(model, cfg.train.ema_decay, cfg.train.ema_warmup)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    state: dict[str, Any] = {"elapsed_s": 0.0, "images_seen": 0}
    step = 0
    if resume:
        ckpt = find_checkpoint(run_dir)
        load_state_dict_into(model, load_weights(ckpt / "model.safetensors"), ckpt / "model.safetensors")
        load_state_dict_into(ema.model, load_weights(ckpt / "ema.safetensors"), ckpt / "ema.safetensors")
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        state = json.loads((ckpt / "state.json").read_text())
        step = int(state.pop("step"))
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    ema.model.to(device)
    images, labels = images.to(device), labels.to(device)
    stream = BatchStream(len(data), cfg.train.seed)

    log_path = run_dir / "log.csv"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        atomic_write_json(run_dir / "model.json", spec.to_dict())
        if resume:
            _rewrite_log(log_path, step)
        (run_dir / "samples").mkdir(exist_ok=True)
    accelerator.wait_for_everyone()
    validator = None
    if cfg.validation.every:
        from geca.metrics.validation import Validator, check_validation  # lazily: it imports this module

        check_validation(cfg)  # on every rank, so that a bad setting stops them all
        if main:
            validator = Validator(cfg, spec, data, run_dir, device, to_images, log=tqdm.write)
            if resume:
                validator.resume(step)

    def checkpoint() -> None:
        if main:
            save_checkpoint(run_dir, step, accelerator.unwrap_model(model), ema.model, optimizer,
                            {**state, "elapsed_s": state["elapsed_s"] + time.time() - t_start})

    t_start = time.time()
    budget_s = None if cfg.train.max_minutes is None else cfg.train.max_minutes * 60 - state["elapsed_s"]
    window = LossWindow()

    def log_row() -> None:
        row = window.row(step, cfg.train.batch_size, state["images_seen"] / len(data), cfg.train.lr,
                         state["elapsed_s"] + time.time() - t_start)
        bar.set_postfix(loss=row["loss"], img_s=row["images_per_s"])
        if main:
            _append_log(log_path, row)

    bar = tqdm(total=cfg.train.max_steps, initial=step, desc="training", disable=not (progress and main),
               dynamic_ncols=True)
    model.train()
    while step < cfg.train.max_steps:
        if budget_s is not None:
            over = torch.tensor([float(time.time() - t_start > budget_s)], device=device)
            if accelerator.reduce(over, "max").item() > 0:
                break
        torch.manual_seed(step_seed(cfg.train.seed, step, rank))
        idx = stream.indices(step * cfg.train.batch_size + rank * local_batch, local_batch).to(device)
        x0, y = images[idx], labels[idx]
        if cfg.data.flip:
            flip = torch.rand(local_batch, device=device) < 0.5
            # latents: the cached encoding of the mirrored image (a mirrored latent is not one)
            mirrored = x0.flip(-1) if flipped is None else flipped[idx]
            x0 = torch.where(flip[:, None, None, None], mirrored, x0)
        t = torch.randint(0, diffusion.num_timesteps, (local_batch,), device=device)
        noise = torch.randn_like(x0)
        with accelerator.autocast():
            terms = diffusion.training_losses(lambda xt, tt, y=y: model(xt, tt, y).output, x0, t, noise)
        loss = terms["loss"].mean()
        if not torch.isfinite(loss):
            last = run_dir / "checkpoints"
            raise TrainingError(f"loss became {loss.item()} at step {step} (lr {cfg.train.lr}, precision "
                                f"{cfg.train.precision}); checkpoints so far are in {last}. Try a lower --lr, "
                                "--precision fp32 or a gradient clip.")
        accelerator.backward(loss)
        if cfg.train.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(accelerator.unwrap_model(model), step)
        step += 1
        state["images_seen"] += cfg.train.batch_size
        window.add(terms)
        bar.update(1)
        if step % cfg.train.log_every == 0:
            log_row()
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            checkpoint()
        if main and cfg.train.sample_every and step % cfg.train.sample_every == 0:
            _preview(ema.model, diffusion, spec, cfg, run_dir / "samples" / f"step_{step:07d}.png", device,
                     to_images)
        if validator is not None and step % cfg.validation.every == 0:
            validator(step, accelerator.unwrap_model(model), ema.model, diffusion)
    if window.steps:
        log_row()
    bar.close()
    if not cfg.train.checkpoint_every or step % cfg.train.checkpoint_every:
        checkpoint()
    checksum = _parameters_identical(accelerator, model) if world > 1 else None
    if main:
        if cfg.train.sample_every and step % cfg.train.sample_every:
            _preview(ema.model, diffusion, spec, cfg, run_dir / "samples" / f"step_{step:07d}.png", device,
                     to_images)
        if validator is not None and step % cfg.validation.every:
            validator(step, accelerator.unwrap_model(model), ema.model, diffusion)
        plot_loss_curve(log_path, run_dir / "loss.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"run_dir": str(run_dir), "step": step, "processes": world, "parameter_checksum": checksum,
            "config": asdict(cfg)}


def _parameters_identical(accelerator: Accelerator, model: torch.nn.Module) -> float:
    """Check that data-parallel ranks ended with the same weights; a mismatch means broken gradient sync."""
    flat = torch.cat([p.detach().float().flatten() for p in accelerator.unwrap_model(model).parameters()])
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64) % 9973 + 1
    checksum = (flat.double() * weights).sum().reshape(1)
    sums = accelerator.gather(checksum)
    if not torch.all(sums == sums[0]):
        raise TrainingError(f"parameters differ between processes after training: checksums {sums.tolist()}")
    return checksum.item()
