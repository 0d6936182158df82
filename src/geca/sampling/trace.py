"""The GHG trace: what the cell state and the prediction do along one reverse chain, for each GHG mode.

A raw `hidden` chain shows |C_h| growing step after step and the predicted ε collapsing; a model trained with
heredity keeps both in range. Every mode starts from the same noise.
"""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from geca.diffusion.gaussian import GaussianDiffusion
from geca.models.base import CellState, Denoiser
from geca.run import LoadedRun
from geca.sampling.config import GHG_MODES, SamplerConfig
from geca.sampling.labels import per_class_labels
from geca.sampling.samplers import sample
from geca.utils.io import atomic_write_text
from geca.utils.plots import plot_ghg_trace
from geca.utils.seeding import derive_seed, kept_random_state

FIELDS = ["ghg", "step", "t", "hidden_mean", "hidden_max", "out_mean", "out_max", "eps_std", "x0_min", "x0_max"]


def _abs_stats(x: torch.Tensor | None) -> tuple[float, float]:
    return (x.abs().mean().item(), x.abs().max().item()) if x is not None else (0.0, 0.0)


@torch.no_grad()
def ghg_trace(model: Denoiser, diffusion: GaussianDiffusion, labels: torch.Tensor, shape: tuple[int, int, int],
              sampler: SamplerConfig, seed: int, modes: tuple[str, ...] = GHG_MODES) -> list[dict[str, Any]]:
    """One row per (mode, reverse step): mean and max |C_h| and |C_out| after the call, the predicted ε's std and
    the range of x̂0 before clipping. `step` counts calls from 1 (t = T−1 first)."""
    if not model.has_cell_state:
        raise ValueError("a GHG trace needs a cellular model (GeCA); this one has no cell state")
    rows: list[dict[str, Any]] = []
    with kept_random_state(labels.device):
        for mode in modes:
            calls = [0]

            def record(t: int, x: torch.Tensor, p: dict[str, torch.Tensor], state: CellState | None,
                       mode: str = mode, calls: list[int] = calls) -> None:
                calls[0] += 1
                x0 = p["pred_x0_raw"]  # before any clipping
                h_mean, h_max = _abs_stats(state.hidden if state else None)
                o_mean, o_max = _abs_stats(state.out if state else None)
                rows.append({"ghg": mode, "step": calls[0], "t": t, "hidden_mean": h_mean, "hidden_max": h_max,
                             "out_mean": o_mean, "out_max": o_max, "eps_std": p["eps"].float().std().item(),
                             "x0_min": x0.min().item(), "x0_max": x0.max().item()})

            torch.manual_seed(derive_seed(seed, 0, 0))
            sample(model, diffusion, labels, shape, replace(sampler, ghg=mode), callback=record)
    return rows


def write_trace(run: LoadedRun, sampler: SamplerConfig, seed: int, device: torch.device | str, path: Path) -> Path:
    """`ghg_trace` on one image per class of a loaded run: `path` (CSV) and its plot beside it (.png)."""
    labels = per_class_labels(run.spec.num_classes, 1).to(device)
    rows = ghg_trace(run.model, run.diffusion, labels, run.spec.shape, sampler, seed)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, FIELDS)
    writer.writeheader()
    writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    atomic_write_text(Path(path), buf.getvalue())
    plot_ghg_trace(rows, Path(path).with_suffix(".png"), title=f"{run.run_dir.name}: {sampler.sampler} "
                   f"{sampler.steps} steps, CFG {sampler.guidance_scale} (model.heredity: "
                   f"{getattr(run.model, 'heredity', 'off')})")
    return Path(path)
