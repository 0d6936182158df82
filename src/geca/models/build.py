"""Build a denoiser from its config, and measure it (parameters, multiply-accumulates per call)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from geca.models.base import Denoiser
from geca.models.config import DiTConfig, GeCAConfig, ModelConfig, UNetConfig
from geca.utils.hardware import quiet_compile


def build_model(config: ModelConfig, in_channels: int, num_classes: int, resolution: int,
                compile: bool = False) -> Denoiser:
    """The denoiser of `config`; `compile`: model.compile as resolved for the job (geca.training.compile)."""
    if isinstance(config, DiTConfig):
        return _build_dit(config, in_channels, num_classes, resolution, compile)
    if isinstance(config, UNetConfig):
        return _build_unet(config, in_channels, num_classes, resolution, compile)
    if not isinstance(config, GeCAConfig):
        raise TypeError(f"no model family for config {type(config).__name__}")
    from geca.models.geca import GeCA

    whole_step = compile and not config.skip_idle
    model = GeCA(
        in_channels=in_channels,
        num_classes=num_classes,
        resolution=resolution,
        hidden_size=config.hidden_size,
        heads=config.heads,
        mlp_hidden=config.mlp_hidden,
        hidden_channels=config.hidden_channels,
        nca_steps=config.nca_steps,
        pos_channels=config.pos_channels,
        update_prob=config.update_prob,
        learn_sigma=config.learn_sigma,
        label_dropout=config.label_dropout,
        # With idle cells skipped only the attention compiles (a cell count per call would recompile the rest, which
        # on a CPU is matmuls near peak anyway); with every cell's update computed the whole NCA step compiles,
        # fusing the dozens of small kernels a GPU launches per step, and its attention is the plain-op `sliced`.
        attention=("sliced" if whole_step else "compiled") if compile else config.attention,
        checkpointing=config.checkpointing,
        block=config.block,
        heredity=config.heredity,
        skip_idle=config.skip_idle,
        compile_step=whole_step,
    )
    return model


def _build_dit(config: DiTConfig, in_channels: int, num_classes: int, resolution: int, compile: bool) -> Denoiser:
    from geca.models.dit import DiT

    model = DiT(in_channels, num_classes, resolution, hidden_size=config.hidden_size, depth=config.depth,
                heads=config.heads, mlp_hidden=config.mlp_hidden, patch_size=config.patch_size,
                learn_sigma=config.learn_sigma, label_dropout=config.label_dropout)
    if compile:
        quiet_compile()
        for block in model.blocks:
            block.compile()
    return model


def _build_unet(config: UNetConfig, in_channels: int, num_classes: int, resolution: int, compile: bool
                ) -> Denoiser:
    from geca.models.unet import UNet

    model = UNet(in_channels, num_classes, resolution, block_channels=list(config.block_channels),
                 layers_per_block=config.layers_per_block, attention_resolutions=list(config.attention_resolutions),
                 learn_sigma=config.learn_sigma, label_dropout=config.label_dropout)
    if compile:
        quiet_compile()
        model.unet.compile()
    return model


def count_parameters(model: Denoiser) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: Denoiser, in_channels: int, num_classes: int, resolution: int, executed: bool = False) -> int:
    """Multiply-accumulates of one denoiser call on a batch of 1 (FLOPs / 2, torch's FlopCounterMode).

    By default every GeCA cell's update is counted, as the published code computes them; `executed`: what this model
    computes on average, where a GeCA that skips idle cells computes p of an update. The counter sees matmuls and
    convolutions; on the CPU it does not see attention's score and value products (SDPA's CPU kernel, GeCA's 3×3
    window), which is the convention of the paper's 88 vs 5.4 GMAC.
    """
    with _set(model, skip_idle=False):
        dense = _macs(model, in_channels, num_classes, resolution)
    return executed_macs(model, in_channels, num_classes, resolution, dense) if executed else dense


@torch.no_grad()
def executed_macs(model: Denoiser, in_channels: int, num_classes: int, resolution: int, dense: int) -> int:
    """`count_macs(..., executed=True)` given the `dense` count already made (a forward pass under the counter
    takes seconds for the larger configs)."""
    if not getattr(model, "skip_idle", False):
        return dense
    with _set(model, update_prob=0.0):  # no cell fires: what every cell computes whether it fires or not
        shared = _macs(model, in_channels, num_classes, resolution)
    return round(shared + model.update_prob * (dense - shared))


@contextmanager
def _set(model: Denoiser, **values: object) -> Iterator[None]:
    """Set `model`'s attributes for the duration; names the model does not have are ignored."""
    saved = {k: getattr(model, k) for k in values if hasattr(model, k)}
    for k in saved:
        setattr(model, k, values[k])
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(model, k, v)


def _macs(model: Denoiser, in_channels: int, num_classes: int, resolution: int) -> int:
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
