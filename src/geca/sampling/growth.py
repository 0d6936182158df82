"""Watch an organism grow: the NCA steps at one noise level, and the denoising trajectory over t."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geca.diffusion.gaussian import GaussianDiffusion
from geca.models.base import CellState, Denoiser
from geca.sampling.samplers import SamplerConfig, inherit, sample
from geca.utils.images import grid, pil_image, to_uint8
from geca.utils.io import atomic_write


@dataclass
class Growth:
    """uint8 frames (F, H, W, C): ε estimate and implied clean image per NCA step; x_t and x̂_0 per reverse step."""

    nca_eps: np.ndarray
    nca_x0: np.ndarray
    nca_t: int
    trajectory_xt: np.ndarray
    trajectory_x0: np.ndarray
    trajectory_t: list[int]


def _normalise(eps: torch.Tensor) -> torch.Tensor:
    """Map an ε map to [-1, 1] per image for display (ε is ~N(0,1), so ±3σ fills the range)."""
    return (eps / 3).clamp(-1, 1)


@torch.no_grad()
def grow(model: Denoiser, diffusion: GaussianDiffusion, label: torch.Tensor, shape: tuple[int, int, int],
         cfg: SamplerConfig, at_t: int, frames: int = 25) -> Growth:
    """Sample one image (label (1, K)); record the trajectory, then replay the M updates at the step nearest `at_t`."""
    if not model.has_cell_state:
        raise ValueError("growth needs a cellular model (GeCA); this denoiser has no cell state")
    spaced = diffusion.respaced(cfg.steps)
    record: dict[int, tuple[torch.Tensor, torch.Tensor, CellState | None]] = {}

    def keep(i: int, xt: torch.Tensor, p: dict[str, torch.Tensor], state: CellState | None) -> None:
        record[i] = (xt.clone(), p["pred_x0"].clone(), state)

    sample(model, diffusion, label, shape, cfg, callback=keep)
    order = sorted(record, reverse=True)
    pick = min(order, key=lambda i: abs(spaced.timestep_map[i] - at_t))
    xt = record[pick][0]
    carry = inherit(record[pick + 1][2], cfg.ghg) if pick + 1 in record else None
    if carry is not None and cfg.cfg != 1.0:
        carry = carry.chunk2()[0]
    t = spaced.model_timesteps(torch.tensor([pick], device=xt.device))
    eps_frames, x0_frames = [], []
    for state in model.grow(xt, t, label, carry=carry, steps=cfg.nca_steps):
        eps = state.out.permute(0, 3, 1, 2)[:, : model.in_channels]
        eps_frames.append(_normalise(eps))
        x0_frames.append(spaced.predict_x0(xt, torch.tensor([pick], device=xt.device), eps).clamp(-1, 1))
    keep_idx = np.unique(np.linspace(0, len(order) - 1, min(frames, len(order))).round().astype(int))
    chosen = [order[i] for i in keep_idx]
    return Growth(
        nca_eps=to_uint8(torch.cat(eps_frames)),
        nca_x0=to_uint8(torch.cat(x0_frames)),
        nca_t=spaced.timestep_map[pick],
        trajectory_xt=to_uint8(torch.cat([record[i][0] for i in chosen])),
        trajectory_x0=to_uint8(torch.cat([record[i][1] for i in chosen])),
        trajectory_t=[spaced.timestep_map[i] for i in chosen],
    )


def _upscale(frames: np.ndarray, min_size: int = 128) -> np.ndarray:
    k = max(1, -(-min_size // frames.shape[1]))
    return frames.repeat(k, axis=1).repeat(k, axis=2)


def write_gif(top: np.ndarray, bottom: np.ndarray, path: Path, ms_per_frame: int = 200) -> None:
    """Each frame shows `top[i]` above `bottom[i]`; the last frame is held longer."""
    pair = np.concatenate([_upscale(top), _upscale(bottom)], axis=1)
    images = [pil_image(f).convert("RGB") for f in pair]
    durations = [ms_per_frame] * (len(images) - 1) + [ms_per_frame * 8]
    atomic_write(Path(path), lambda p: images[0].save(p, format="GIF", save_all=True, append_images=images[1:],
                                                     duration=durations, loop=0))


def write_strip(top: np.ndarray, bottom: np.ndarray, path: Path) -> None:
    """Two rows (top, bottom), one column per frame."""
    strip = grid(np.concatenate([_upscale(top, 64), _upscale(bottom, 64)]), nrow=len(top))
    atomic_write(Path(path), lambda p: pil_image(strip).save(p, format="PNG"))


def write_growth(g: Growth, out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"growth_gif": out_dir / "growth.gif", "growth_png": out_dir / "growth.png",
             "denoise_gif": out_dir / "denoise.gif", "denoise_png": out_dir / "denoise.png"}
    write_gif(g.nca_eps, g.nca_x0, paths["growth_gif"])
    write_strip(g.nca_eps, g.nca_x0, paths["growth_png"])
    write_gif(g.trajectory_xt, g.trajectory_x0, paths["denoise_gif"], ms_per_frame=120)
    write_strip(g.trajectory_xt, g.trajectory_x0, paths["denoise_png"])
    return paths
