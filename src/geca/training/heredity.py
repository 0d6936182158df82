"""Heredity-aware training (ours; README, "Gene Heredity Guidance that helps"): a training call starts, as a
`--ghg hidden` sampling call does, from the C_h that a previous call handed over, so the sampler never feeds the
model a state it has not learnt from."""

from __future__ import annotations

import torch

from geca.models.base import CellState, Denoiser


@torch.no_grad()
def handed_over(model: Denoiser, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null: torch.Tensor,
                keep: torch.Tensor) -> CellState:
    """The final C_h of a call at (x_t, t) — what GHG `hidden` passes to the next reverse step — for the rows in
    `keep`, and zero (a fresh seed: nothing inherited) elsewhere. `t` is in the model's timesteps."""
    b, _, h, w = xt.shape
    hidden = torch.zeros(b, h, w, model.hidden_channels, device=xt.device)  # (B, H, W, |C_h|)
    if keep.any():
        state = model(xt[keep], t[keep], y[keep], null=null[keep]).state
        hidden[keep] = state.hidden.float()
    return CellState(hidden=hidden)
