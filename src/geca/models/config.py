"""Model configuration and the named configs."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from geca.models.base import Denoiser


@dataclass
class ModelConfig:
    """Denoiser hyper-parameters (method.md §2). Input channels, classes and resolution come from the data.

    `family` picks the architecture: "geca", "dit" or "unet". GeCA uses hidden_size … pos_channels, update_prob,
    attention and checkpointing; DiT uses hidden_size, heads, mlp_hidden, depth and patch_size; the UNet uses
    block_channels, layers_per_block and attention_resolutions. The rest applies to all.
    """

    name: str = "GeCA-T"
    family: str = "geca"
    hidden_size: int = 96
    heads: int = 3
    mlp_hidden: int = 384
    hidden_channels: int = 32
    nca_steps: int = 8
    pos_channels: int = 16
    update_prob: float = 0.5
    learn_sigma: bool = True
    label_dropout: float = 0.1
    attention: str = "fast"
    checkpointing: bool = False
    compile: bool = False
    depth: int = 5  # DiT: number of transformer blocks
    patch_size: int = 2  # DiT: patch side, in input pixels
    block_channels: list[int] = field(default_factory=lambda: [16, 24, 32])  # UNet: channels per resolution level
    layers_per_block: int = 1  # UNet: ResNet blocks per level on the way down
    attention_resolutions: list[int] = field(default_factory=lambda: [4])  # UNet: downsampling factors with attention


NAMED_MODELS: dict[str, ModelConfig] = {
    # The published GeCA-S: 13.3 M parameters at a 32×32×4 latent with 11 classes.
    "GeCA-S": ModelConfig(name="GeCA-S", hidden_size=768, heads=12, mlp_hidden=3072, hidden_channels=64,
                          nca_steps=12),
    "GeCA-XS": ModelConfig(name="GeCA-XS", hidden_size=384, heads=6, mlp_hidden=64, hidden_channels=32,
                           nca_steps=12),
    # Sized for 2 CPU cores: tests and the demo.
    "GeCA-T": ModelConfig(),
    # The published DiT-S/2 baseline: 32.7 M parameters at a 32×32×4 latent with 11 classes.
    "DiT-S/2": ModelConfig(name="DiT-S/2", family="dit", hidden_size=384, heads=6, mlp_hidden=1536, depth=12,
                           patch_size=2),
    # LDM-B: the paper's 17.3 M-parameter UNet (its layout is unpublished; this one has that size at 32×32×4).
    "LDM-B": ModelConfig(name="LDM-B", family="unet", block_channels=[64, 128, 128, 256], layers_per_block=2,
                         attention_resolutions=[4]),
    # CPU baselines matched to GeCA-T's parameter count (≈ 0.24 M at 28×28×3, 5 classes) for fair comparisons.
    "DiT-T": ModelConfig(name="DiT-T", family="dit", hidden_size=48, heads=2, mlp_hidden=192, depth=5, patch_size=2),
    "LDM-T": ModelConfig(name="LDM-T", family="unet", block_channels=[16, 24, 32], layers_per_block=1,
                         attention_resolutions=[4]),
}
FAMILIES = ("geca", "dit", "unet")


def named_model(name: str) -> ModelConfig:
    try:
        return copy.deepcopy(NAMED_MODELS[name])
    except KeyError:
        raise ValueError(f"unknown model {name!r}; named models: {', '.join(NAMED_MODELS)}") from None


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int, resolution: int) -> Denoiser:
    if cfg.family == "dit":
        return _build_dit(cfg, in_channels, num_classes, resolution)
    if cfg.family == "unet":
        return _build_unet(cfg, in_channels, num_classes, resolution)
    if cfg.family != "geca":
        raise ValueError(f"unknown model family {cfg.family!r}; available: {', '.join(FAMILIES)}")
    from geca.models.geca import GeCA

    model = GeCA(
        in_channels=in_channels,
        num_classes=num_classes,
        resolution=resolution,
        hidden_size=cfg.hidden_size,
        heads=cfg.heads,
        mlp_hidden=cfg.mlp_hidden,
        hidden_channels=cfg.hidden_channels,
        nca_steps=cfg.nca_steps,
        pos_channels=cfg.pos_channels,
        update_prob=cfg.update_prob,
        learn_sigma=cfg.learn_sigma,
        label_dropout=cfg.label_dropout,
        # Inductor fuses the plain-op "sliced" attention; the hand-written autograd.Function would stay opaque.
        attention="sliced" if cfg.compile else cfg.attention,
        checkpointing=cfg.checkpointing,
    )
    if cfg.compile:
        model.block.compile()
    return model


def _build_dit(cfg: ModelConfig, in_channels: int, num_classes: int, resolution: int) -> Denoiser:
    from geca.models.dit import DiT

    model = DiT(in_channels, num_classes, resolution, hidden_size=cfg.hidden_size, depth=cfg.depth, heads=cfg.heads,
                mlp_hidden=cfg.mlp_hidden, patch_size=cfg.patch_size, learn_sigma=cfg.learn_sigma,
                label_dropout=cfg.label_dropout)
    if cfg.compile:
        for block in model.blocks:
            block.compile()
    return model


def _build_unet(cfg: ModelConfig, in_channels: int, num_classes: int, resolution: int) -> Denoiser:
    from geca.models.unet import UNet

    model = UNet(in_channels, num_classes, resolution, block_channels=list(cfg.block_channels),
                 layers_per_block=cfg.layers_per_block, attention_resolutions=list(cfg.attention_resolutions),
                 learn_sigma=cfg.learn_sigma, label_dropout=cfg.label_dropout)
    if cfg.compile:
        model.unet.compile()
    return model


def count_parameters(model: Denoiser) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: Denoiser, in_channels: int, num_classes: int, resolution: int) -> int:
    """Multiply-accumulates of one denoiser call on a batch of 1 (FLOPs / 2, torch's FlopCounterMode).

    The counter sees matmuls and convolutions; on the CPU it does not see attention's score and value products
    (SDPA's CPU kernel, GeCA's 3×3 window), which is the convention of the paper's 88 vs 5.4 GMAC.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x = torch.zeros(1, in_channels, resolution, resolution, device=device)
    t = torch.full((1,), 500, device=device)
    y = torch.zeros(1, num_classes, device=device)
    y[0, 0] = 1
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(x, t, y)
    model.train(was_training)
    return counter.get_total_flops() // 2
