"""DiT (Peebles & Xie, 2023) as a baseline denoiser, conditioned exactly as GeCA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geca.models.base import CellState, DenoiserOutput
from geca.models.baseline import StatelessDenoiser
from geca.models.blocks import AdaLNBlock, FinalLayer, adaln_zero_init
from geca.models.embeddings import LabelEmbedder, TimestepEmbedder, sincos_2d


class DiTBlock(AdaLNBlock):
    """The adaLN-Zero block with global attention over tokens (B, N, D) and its own modulation."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__(dim, heads, mlp_hidden)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, hd, N, d/hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, tuple(m[:, None] for m in self.ada(cond).chunk(6, dim=-1)))


class DiT(StatelessDenoiser):
    """Patchify → fixed 2-D sin-cos positions → `depth` adaLN-Zero blocks → adaLN final layer → unpatchify."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        resolution: int,
        hidden_size: int,
        depth: int,
        heads: int,
        mlp_hidden: int,
        patch_size: int = 2,
        learn_sigma: bool = True,
        label_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if resolution % patch_size:
            raise ValueError(f"resolution {resolution} is not divisible by the patch size {patch_size}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.grid = resolution // patch_size
        self.patch = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        # A frozen Parameter rather than a buffer, as in DiT: the published 32,731,424 parameters include it.
        pos = sincos_2d(self.grid, self.grid, hidden_size).flatten(0, 1)[None]
        self.pos = nn.Parameter(pos, requires_grad=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, label_dropout)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, heads, mlp_hidden) for _ in range(depth))
        self.final = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize()

    def initialize(self) -> None:
        adaln_zero_init(self, self.t_embedder, [b.ada[-1] for b in self.blocks] + [self.final.ada[-1],
                                                                                   self.final.linear])
        # The patch embedding is initialised like a Linear over the flattened patch (DiT).
        nn.init.xavier_uniform_(self.patch.weight.view(self.patch.weight.shape[0], -1))
        nn.init.zeros_(self.patch.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null: torch.Tensor | None = None,
                carry: CellState | None = None, nca_steps: int | None = None) -> DenoiserOutput:
        self.check_call(x, carry, nca_steps)
        b, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}×{w} is not divisible by the patch size {p}")
        gh, gw = h // p, w // p
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, D), N = gh·gw
        pos = self.pos if (gh, gw) == (self.grid, self.grid) else sincos_2d(gh, gw, tokens.shape[-1]).flatten(0, 1)
        tokens = tokens + pos.to(tokens)
        cond = self.t_embedder(t) + self.y_embedder(y, null)  # (B, D)
        for block in self.blocks:
            tokens = block(tokens, cond)  # (B, N, D)
        shift, scale = (m[:, None] for m in self.final.modulation(cond))
        out = self.final(tokens, shift, scale)  # (B, N, p·p·C_out)
        # (B, gh·gw, p·p·C) → (B, C, H, W), patch pixels in (row, column, channel) order.
        return DenoiserOutput(output=out.view(b, gh, gw, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
                              .reshape(b, -1, h, w))
