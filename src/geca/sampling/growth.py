"""Watch an organism grow: the NCA steps at one noise level, and the denoising trajectory over t."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from geca.diffusion.gaussian import GaussianDiffusion
from geca.errors import ConfigError
from geca.models.base import CellState, Denoiser
from geca.run import LoadedRun
from geca.sampling.config import SamplerConfig
from geca.sampling.generate import Decoder, decoder, run_sampler
from geca.sampling.labels import one_hot, resolve_class
from geca.sampling.samplers import autocast_dtype, inherit, sample
from geca.utils.images import pil_image, to_uint8
from geca.utils.io import atomic_write, few, other_files, output_dir
from geca.utils.plots import plot_image_rows


@dataclass
class Growth:
    """uint8 frames (F, H, W, C): ε estimate and implied clean image per NCA step; x_t and x̂_0 per reverse step."""

    nca_eps: np.ndarray
    nca_x0: np.ndarray
    nca_t: int
    trajectory_xt: np.ndarray
    trajectory_x0: np.ndarray
    trajectory_t: list[int]


def _show_eps(eps: torch.Tensor) -> np.ndarray:
    """ε is ~N(0,1): ±3σ fills the display range; latent ε shows its first three channels."""
    return to_uint8((eps[:, :3] / 3).clamp(-1, 1))


@torch.no_grad()
def grow(model: Denoiser, diffusion: GaussianDiffusion, label: torch.Tensor, shape: tuple[int, int, int],
         sampler: SamplerConfig, at_t: int, frames: int = 25, decode: Decoder = to_uint8) -> Growth:
    """Sample one image (label (1, K)); record the trajectory, then replay the M updates at the step nearest `at_t`.

    `decode` turns model-space tensors into uint8 images (a VAE decoder for latent runs).
    """
    if not model.has_cell_state:
        raise ValueError("growth needs a cellular model (GeCA); this denoiser has no cell state")
    if sampler.sampler.startswith("dpm++"):
        raise ConfigError("geca grow replays a respaced DDPM/DDIM chain; use --sampler ddim or ddpm")
    spaced = diffusion.respaced(sampler.steps)
    record: dict[int, tuple[torch.Tensor, torch.Tensor, CellState | None]] = {}  # by respaced step
    step_of = {t: i for i, t in enumerate(spaced.timestep_map)}

    def keep(t: int, xt: torch.Tensor, p: dict[str, torch.Tensor], state: CellState | None) -> None:
        record[step_of[t]] = (xt.clone(), p["pred_x0"].clone(), state)

    sample(model, diffusion, label, shape, sampler, callback=keep)
    order = sorted(record, reverse=True)
    pick = min(order, key=lambda i: abs(spaced.timestep_map[i] - at_t))
    xt = record[pick][0]
    carry = inherit(record[pick + 1][2], sampler.ghg) if pick + 1 in record else None
    if carry is not None and sampler.guidance_scale != 1.0:
        carry = carry.chunk2()[0]
    t = spaced.model_timesteps(torch.tensor([pick], device=xt.device))
    eps_frames, x0_frames = [], []
    step = torch.tensor([pick], device=xt.device)
    dtype = autocast_dtype(sampler.precision, xt.device)  # the replay runs as the sampling did
    with torch.autocast(xt.device.type, dtype=dtype, enabled=dtype is not None):
        states = list(model.grow(xt, t, label, carry=carry, nca_steps=sampler.nca_steps))
    for state in states:
        p = spaced.p_mean_variance(state.out.float().permute(0, 3, 1, 2), xt, step, clip_x0=sampler.clip_x0)
        eps_frames.append(p["eps"])
        x0_frames.append(p["pred_x0"])
    keep_idx = np.unique(np.linspace(0, len(order) - 1, min(frames, len(order))).round().astype(int))
    chosen = [order[i] for i in keep_idx]
    return Growth(
        nca_eps=_show_eps(torch.cat(eps_frames)),
        nca_x0=decode(torch.cat(x0_frames)),
        nca_t=spaced.timestep_map[pick],
        trajectory_xt=decode(torch.cat([record[i][0] for i in chosen])),
        trajectory_x0=decode(torch.cat([record[i][1] for i in chosen])),
        trajectory_t=[spaced.timestep_map[i] for i in chosen],
    )


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize so small grids stay crisp and latent-size ε frames match decoded images."""
    t = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    return torch.nn.functional.interpolate(t, size=(size, size), mode="nearest").to(torch.uint8).permute(
        0, 2, 3, 1).numpy()


def _common(top: np.ndarray, bottom: np.ndarray, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    size = max(min_size, top.shape[1], bottom.shape[1])
    channels = max(top.shape[-1], bottom.shape[-1])
    return tuple(np.repeat(_resize(f, size), channels // f.shape[-1], axis=-1) for f in (top, bottom))


CAPTION_PX = 12


def _captioned(frame: np.ndarray, caption: str) -> Image.Image:
    """The frame under a black band carrying its caption (PIL's built-in bitmap font: no font files needed)."""
    img = pil_image(frame).convert("RGB")
    out = Image.new("RGB", (img.width, img.height + CAPTION_PX))
    out.paste(img, (0, CAPTION_PX))
    ImageDraw.Draw(out).text((2, 1), caption, fill=(255, 255, 255))
    return out


def write_gif(top: np.ndarray, bottom: np.ndarray, path: Path, captions: list[str], ms_per_frame: int = 200) -> None:
    """Each frame shows `top[i]` above `bottom[i]` under `captions[i]`; the last frame is held longer."""
    pair = np.concatenate(_common(top, bottom, 128), axis=1)
    images = [_captioned(f, c) for f, c in zip(pair, captions, strict=True)]
    durations = [ms_per_frame] * (len(images) - 1) + [ms_per_frame * 8]
    atomic_write(Path(path), lambda p: images[0].save(p, format="GIF", save_all=True, append_images=images[1:],
                                                     duration=durations, loop=0))


def growth_paths(out_dir: Path) -> dict[str, Path]:
    names = {"growth_gif": "growth.gif", "growth_png": "growth.png", "denoise_gif": "denoise.gif",
             "denoise_png": "denoise.png"}
    return {key: Path(out_dir) / name for key, name in names.items()}


def write_growth(g: Growth, out_dir: Path) -> dict[str, Path]:
    paths = growth_paths(out_dir)
    m = len(g.nca_eps)
    nca = [f"NCA step {i}/{m}" for i in range(1, m + 1)]
    write_gif(g.nca_eps, g.nca_x0, paths["growth_gif"], [f"{c}, t={g.nca_t}" for c in nca])
    plot_image_rows(list(_common(g.nca_eps, g.nca_x0, 16)), ["ε (C_out)", "x̂₀"], paths["growth_png"],
                    [f"m={i}" for i in range(1, m + 1)], f"M NCA updates at t = {g.nca_t}, from one seed cell")
    steps = [f"t={t}" for t in g.trajectory_t]
    write_gif(g.trajectory_xt, g.trajectory_x0, paths["denoise_gif"], steps, ms_per_frame=120)
    plot_image_rows(list(_common(g.trajectory_xt, g.trajectory_x0, 16)), ["x_t", "x̂₀"], paths["denoise_png"], steps,
                    "denoising trajectory")
    return paths


@dataclass
class Organism:
    """One grown organism: its class, the noise level its M updates were shown at, and the files written."""

    label: str
    t: int
    paths: dict[str, Path]


def grow_organism(run: LoadedRun, label: str, at_t: int, sampler: SamplerConfig, frames: int, seed: int,
                  device: torch.device | str, out: Path, overwrite: bool = False) -> Organism:
    """Grow one organism of class `label` (name or index) from a loaded GeCA and write its GIFs and strips into
    `out`; files an earlier growth wrote there are replaced only with `overwrite`."""
    out = output_dir(out)
    own = {p.name for p in growth_paths(out).values()}
    # grow replaces only its four files, so no hidden name (a folder's own dot-folders too) is another's
    others = other_files(out, lambda p: p.name in own or p.name.startswith("."))
    if others:  # as geca sample: its four files are not mixed into a folder of other things
        raise FileExistsError(f"--out {out} holds other files ({few(others)}); geca grow writes into a new or empty "
                              "folder, or one an earlier grow wrote")
    earlier = [p.name for p in growth_paths(out).values() if p.exists()]
    if earlier and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(earlier)}; pass --overwrite or choose another --out")
    if not run.model.has_cell_state:
        raise ConfigError(f"{run.spec.model.name} is not a cellular model; growth needs a GeCA")
    steps = run.diffusion.num_timesteps
    if not 0 <= at_t < steps:
        raise ConfigError(f"--t must be in 0…{steps - 1} (the run's diffusion steps), got {at_t}")
    if frames < 1:
        raise ConfigError(f"--frames must be ≥ 1, got {frames}")
    cls = resolve_class(label, run.spec.class_names)
    torch.manual_seed(seed)
    g = grow(run.model, run.diffusion, one_hot([cls], run.spec.num_classes).to(device), run.spec.shape,
             run_sampler(run, sampler), at_t, frames, decoder(run, device))
    return Organism(run.spec.class_names[cls], g.nca_t, write_growth(g, out))
