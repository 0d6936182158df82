"""Model configuration and the named configs."""

from __future__ import annotations

from dataclasses import dataclass, replace

from geca.models.base import Denoiser


@dataclass
class ModelConfig:
    """GeCA hyper-parameters (method.md §2). Input channels, classes and resolution come from the data."""

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


NAMED_MODELS: dict[str, ModelConfig] = {
    # The published GeCA-S: 13.3 M parameters at a 32×32×4 latent with 11 classes.
    "GeCA-S": ModelConfig(name="GeCA-S", hidden_size=768, heads=12, mlp_hidden=3072, hidden_channels=64,
                          nca_steps=12),
    "GeCA-XS": ModelConfig(name="GeCA-XS", hidden_size=384, heads=6, mlp_hidden=64, hidden_channels=32,
                           nca_steps=12),
    # Sized for 2 CPU cores: tests and the demo.
    "GeCA-T": ModelConfig(),
}


def named_model(name: str) -> ModelConfig:
    try:
        return replace(NAMED_MODELS[name])
    except KeyError:
        raise ValueError(f"unknown model {name!r}; named models: {', '.join(NAMED_MODELS)}") from None


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int, resolution: int) -> Denoiser:
    if cfg.family != "geca":
        raise ValueError(f"unknown model family {cfg.family!r}; available: geca")
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


def count_parameters(model: Denoiser) -> int:
    return sum(p.numel() for p in model.parameters())
