"""Conditioning embeddings shared by every denoiser family."""

from __future__ import annotations

import math

import torch
from torch import nn


class TimestepEmbedder(nn.Module):
    """256-d sinusoid of t, then Linear→SiLU→Linear (as DiT)."""

    def __init__(self, dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t, self.frequency_dim))


class LabelEmbedder(nn.Module):
    """Multi-hot (or one-hot) label vector → Linear(K→D) → Linear(D→D), with a learned null embedding.

    The published code drops label elements independently and uses the all-zero vector as "null", which collides
    with real all-negative label vectors; here the whole vector is dropped and replaced by a dedicated embedding.
    """

    def __init__(self, num_classes: int, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.proj = nn.Sequential(nn.Linear(num_classes, dim), nn.Linear(dim, dim))
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, y: torch.Tensor, null: torch.Tensor | None = None) -> torch.Tensor:
        """`null` (B,) bool forces the null embedding; without it, in training mode, rows are dropped with
        p=dropout (a caller that passes `null` in training has drawn the drops itself)."""
        if y.shape[-1] != self.num_classes:
            raise ValueError(f"label vectors have {y.shape[-1]} entries, the model expects {self.num_classes}")
        drop = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device) if null is None else null.to(y.device)
        if self.training and self.dropout > 0 and null is None:
            drop = drop | (torch.rand(y.shape[0], device=y.device) < self.dropout)
        emb = self.proj(y.to(self.proj[0].weight.dtype))
        return torch.where(drop[:, None], self.null.to(emb.dtype).expand_as(emb), emb)


def sincos_2d(height: int, width: int, channels: int) -> torch.Tensor:
    """Fixed 2-D sinusoidal positional encoding, (H, W, channels); half the channels encode y, half x."""
    if channels % 4:
        raise ValueError(f"positional channels must be a multiple of 4, got {channels}")
    quarter = channels // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1)))

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = pos.double()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    ey = encode(torch.arange(height))[:, None, :].expand(height, width, 2 * quarter)
    ex = encode(torch.arange(width))[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([ey, ex], dim=-1).float()
