"""An LDM-style class-conditional UNet baseline: diffusers' UNet2DModel with GeCA's label embedding."""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DModel
from torch import nn

from geca.models.base import CellState, DenoiserOutput
from geca.models.baseline import StatelessDenoiser
from geca.models.embeddings import LabelEmbedder

HEAD_CHANNELS = 32  # channels per attention head (LDM's num_head_channels)


def norm_groups(widths: list[int]) -> int:
    """LDM's 32 GroupNorm groups, or fewer so that every group holds at least 2 channels.

    The ResNet blocks add the time + label embedding as a per-channel bias right before a GroupNorm; with one
    channel per group the norm would subtract it again and the UNet would ignore t and the labels.
    """
    groups = math.gcd(32, *widths)
    while groups > 1 and min(widths) // groups < 2:
        groups //= 2
    return groups


class UNet(StatelessDenoiser):
    """ResNet levels of `block_channels` with self-attention at the given downsampling factors (LDM convention).

    The label vector goes through our LabelEmbedder (whole-vector CFG dropout, learned null) to the size of the
    UNet's time embedding and is added to it (`class_embed_type="identity"`).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        resolution: int,
        block_channels: list[int],
        layers_per_block: int,
        attention_resolutions: list[int],
        learn_sigma: bool = True,
        label_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        levels = len(block_channels)
        factors = [2**i for i in range(levels)]
        if not block_channels or resolution % factors[-1]:
            raise ValueError(f"a UNet with {levels} levels needs a resolution divisible by {factors[-1]}, "
                             f"got {resolution}")
        bad = sorted(set(attention_resolutions) - set(factors))
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not downsampling factors of this UNet ({factors})")
        attn = [f in attention_resolutions for f in factors]
        if any(a and c % HEAD_CHANNELS for a, c in zip(attn, block_channels, strict=True)):
            raise ValueError(f"levels with attention need a multiple of {HEAD_CHANNELS} channels: {block_channels}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.factor = factors[-1]
        emb_dim = 4 * block_channels[0]
        self.unet = UNet2DModel(
            sample_size=resolution,
            in_channels=in_channels,
            out_channels=self.out_channels,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            block_out_channels=tuple(block_channels),
            layers_per_block=layers_per_block,
            attention_head_dim=HEAD_CHANNELS,
            norm_num_groups=norm_groups(block_channels),
            class_embed_type="identity",
        )
        self.y_embedder = LabelEmbedder(num_classes, emb_dim, label_dropout)
        # Zero output convolution (LDM's zero_module): like GeCA and DiT, training starts from a zero prediction.
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null: torch.Tensor | None = None,
                carry: CellState | None = None, nca_steps: int | None = None) -> DenoiserOutput:
        self.check_call(x, carry, nca_steps)
        if x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise ValueError(f"input {x.shape[-2]}×{x.shape[-1]} is not divisible by {self.factor}, the UNet's "
                             "total downsampling")
        return DenoiserOutput(output=self.unet(x, t, class_labels=self.y_embedder(y, null)).sample)
