"""The interface every denoiser (GeCA and the baselines) offers to the diffusion and the samplers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class CellState:
    """The evolving channels of a GeCA grid, channels-last (B, H, W, C); either may be absent."""

    out: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    def chunk2(self) -> tuple[CellState, CellState]:
        """Split a CFG-doubled batch into its conditional and unconditional halves."""
        halves = [t.chunk(2) if t is not None else (None, None) for t in (self.out, self.hidden)]
        return CellState(halves[0][0], halves[1][0]), CellState(halves[0][1], halves[1][1])


@dataclass
class DenoiserOutput:
    """`output` is (B, C_out, H, W): ε, then (with learned σ) the variance interpolation values."""

    output: torch.Tensor
    state: CellState | None = None


class Denoiser(nn.Module):
    """A class-conditional ε-predictor. Subclasses set the attributes below in __init__."""

    in_channels: int
    num_classes: int
    learn_sigma: bool
    has_cell_state: bool = False
    ghg_default: str | None = None  # a cellular model's own default GHG mode (None: the paper's, hidden)

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        null: torch.Tensor | None = None,
        carry: CellState | None = None,
        nca_steps: int | None = None,
    ) -> DenoiserOutput:
        """ε (and variance values) for noisy `x` (B, C, H, W) at timesteps `t` (B,) with label vectors `y` (B, K).

        `null` (B,) forces the null label (classifier-free guidance); `carry` is the cell state inherited from the
        previous reverse step and `nca_steps` overrides M (GeCA only).
        """
        raise NotImplementedError
