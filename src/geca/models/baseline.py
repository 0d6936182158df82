"""What the baseline denoisers (DiT, UNet) share: no cell state, one input check."""

from __future__ import annotations

import torch

from geca.models.base import CellState, Denoiser


class StatelessDenoiser(Denoiser):
    """A denoiser without cell state: `carry` and `nca_steps` (GeCA's heredity and M) do not apply."""

    has_cell_state = False

    def check_call(self, x: torch.Tensor, carry: CellState | None, nca_steps: int | None) -> None:
        name = type(self).__name__
        if carry is not None or nca_steps is not None:
            raise ValueError(f"{name} has no cell state: carry (GHG) and nca_steps (M) apply to GeCA only")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{name} expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
