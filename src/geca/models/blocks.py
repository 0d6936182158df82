"""What GeCA and DiT share: the adaLN-Zero transformer block (attention left to the subclass) and the final layer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from geca.models.embeddings import TimestepEmbedder


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


@dataclass(frozen=True)
class BlockStyle:
    """The details in which the published blocks differ (the parameter counts hide them: they nearly cancel)."""

    qkv_bias: bool
    affine_norm: bool
    norm_eps: float
    gelu: str  # "none" (exact) or "tanh"


# DiT (facebookresearch/DiT): timm's Attention with a qkv bias, non-affine LayerNorms, tanh-approximated GELU.
DIT_STYLE = BlockStyle(qkv_bias=True, affine_norm=False, norm_eps=1e-6, gelu="tanh")
# GeCA (xmed-lab/GeCA `geca.py`): `to_qkv` without bias, PreNorm's affine LayerNorm(dim), exact GELU.
GECA_STYLE = BlockStyle(qkv_bias=False, affine_norm=True, norm_eps=1e-5, gelu="none")


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning; subclasses say how tokens attend to each other."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, style: BlockStyle = DIT_STYLE) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=style.affine_norm, eps=style.norm_eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=style.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=style.affine_norm, eps=style.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(approximate=style.gelu),
                                 nn.Linear(mlp_hidden, dim))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod
        x = x + gate_a * self.attend(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """Non-affine LayerNorm, adaLN shift/scale from the conditioning, then a Linear to the output channels."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale), each (B, D): computed once per denoiser call, reused by every token and NCA step."""
        shift, scale = self.ada(cond).chunk(2, dim=-1)
        return shift, scale

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.linear(modulate(self.norm(x), shift, scale))


def adaln_zero_init(module: nn.Module, t_embedder: TimestepEmbedder, zeroed: Iterable[nn.Linear]) -> None:
    """DiT's initialisation: Xavier-uniform Linears with zero bias, N(0, 0.02) timestep MLP, and zeroed adaLN and
    output layers, so every block starts as the identity and the first output is exactly 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for layer in (t_embedder.mlp[0], t_embedder.mlp[2]):
        nn.init.normal_(layer.weight, std=0.02)
    for layer in zeroed:
        nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
