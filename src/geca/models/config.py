"""Model configs, one per family (`family` picks it), and the named configs. Imports nothing heavy."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from geca.errors import ConfigError
from geca.utils.schema import MAX_NCA_STEPS, Checks, key_in

# geca.models.attention.IMPLEMENTATIONS (no torch here) but `compiled`, which model.compile selects, and `auto`: the
# C kernels on a CPU, `fast` elsewhere (geca.models.attention.runnable).
ATTENTIONS = ("auto", "fast", "sliced", "reference", "triton", "cpu")
HEREDITY = ("off", "gated")
# true/false as set (GeCA: the attention where idle cells are skipped, else the whole NCA step); auto: training
# compiles GeCA's attention where that was measured to win (geca.training.compile).
COMPILE = ("auto", "true", "false")
MAX_WIDTH = 2**16  # channels, heads, steps: far beyond any model here, far below what overflows torch


@dataclass
class ModelConfig:
    """What every family shares; input channels, classes and resolution come from the data (paper §2.1)."""

    name: str = ""
    family: str = ""
    learn_sigma: bool = True
    label_dropout: float = 0.1
    compile: str = "auto"

    def validate(self, check: Checks) -> None:
        """Every value of the config in range; the family's own checks extend these."""
        check(0 <= self.label_dropout < 1, "model.label_dropout", "in [0, 1)", self.label_dropout)
        for f in dataclasses.fields(self):  # a typo's width would overflow torch's sizes rather than fail clearly
            value = getattr(self, f.name)
            for v in value if isinstance(value, list) else [value]:
                check(not isinstance(v, int) or isinstance(v, bool) or v <= MAX_WIDTH, f"model.{f.name}",
                      f"at most {MAX_WIDTH}", value)
        check.choice(self.compile, "model.compile", COMPILE)

    @classmethod
    def from_mapping(cls, value: Any, where: str) -> ModelConfig:
        """The config of `value["family"]` (default geca); a key that family does not have is an error."""
        from geca.utils.schema import from_dict

        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        family = value.get("family", "geca")
        if family not in FAMILIES:
            raise ConfigError(f"{key_in(where, 'family')}: unknown model family {family!r}; available: "
                              f"{', '.join(FAMILIES)}")
        return from_dict(FAMILIES[family], {**value, "family": family}, where)


@dataclass
class TransformerConfig(ModelConfig):
    """The width of an adaLN-Zero transformer block (GeCA's one, DiT's `depth`)."""

    hidden_size: int = 96
    heads: int = 3
    mlp_hidden: int = 384

    def validate(self, check: Checks) -> None:
        super().validate(check)
        check(self.heads >= 1, "model.heads", "≥ 1", self.heads)
        check(self.hidden_size >= 1 and self.hidden_size % max(self.heads, 1) == 0, "model.hidden_size",
              f"a positive multiple of the {self.heads} heads", self.hidden_size)
        check(self.mlp_hidden >= 1, "model.mlp_hidden", "≥ 1", self.mlp_hidden)


@dataclass
class GeCAConfig(TransformerConfig):
    """One adaLN-Zero block with 3×3 neighbourhood attention, applied `nca_steps` (M) times."""

    name: str = "GeCA-T"
    family: str = "geca"
    hidden_channels: int = 32
    nca_steps: int = 8
    pos_channels: int = 16
    update_prob: float = 0.5
    attention: str = "auto"
    checkpointing: bool = False
    # Compute an NCA step's projection, MLP and final layer only for the cells that fire (the same result: an idle
    # cell's update is discarded). False computes every cell's, as published.
    skip_idle: bool = True
    block: str = "published"  # the authors' block; "v0.1": geca 0.1's DiT-style block (its runs load with it)
    # How a carried C_h enters the next call: "gated" (ours, the default: LayerNorm → zero-init Linear, added to the
    # seed, and trained on what GHG hands over) or "off" as published (raw, it replaces the zero seed, and training
    # never shows it). Runs saved without the key are "off".
    heredity: str = "gated"

    def validate(self, check: Checks) -> None:
        super().validate(check)
        check(self.hidden_channels >= 1, "model.hidden_channels", "≥ 1", self.hidden_channels)
        check(1 <= self.nca_steps <= MAX_NCA_STEPS, "model.nca_steps", f"in [1, {MAX_NCA_STEPS}]", self.nca_steps)
        check(self.pos_channels >= 4 and self.pos_channels % 4 == 0, "model.pos_channels", "a positive multiple of 4",
              self.pos_channels)
        check(0 < self.update_prob <= 1, "model.update_prob", "in (0, 1]", self.update_prob)
        check.choice(self.attention, "model.attention", ATTENTIONS)
        # model.compile compiles the plain-op `sliced` attention; the Triton and C kernels are fused already.
        check(not (self.compile == "true" and self.attention in ("triton", "cpu")), "model.attention",
              "auto, fast, sliced or reference with model.compile (the Triton and C kernels are compiled already)",
              self.attention)
        check.choice(self.block, "model.block", ("published", "v0.1"))
        check.choice(self.heredity, "model.heredity", HEREDITY)


@dataclass
class DiTConfig(TransformerConfig):
    """`depth` adaLN-Zero blocks with global attention over `patch_size`² patches."""

    name: str = "DiT"
    family: str = "dit"
    depth: int = 5
    patch_size: int = 2

    def validate(self, check: Checks) -> None:
        super().validate(check)
        check(self.depth >= 1, "model.depth", "≥ 1", self.depth)
        check(self.patch_size >= 1, "model.patch_size", "≥ 1", self.patch_size)


@dataclass
class UNetConfig(ModelConfig):
    """An LDM-style UNet: channels per resolution level, ResNet blocks per level, attention at downsampling factors."""

    name: str = "LDM"
    family: str = "unet"
    block_channels: list[int] = field(default_factory=lambda: [16, 24, 32])
    layers_per_block: int = 1
    attention_resolutions: list[int] = field(default_factory=lambda: [4])

    def validate(self, check: Checks) -> None:
        super().validate(check)
        check(bool(self.block_channels) and min(self.block_channels) >= 1, "model.block_channels",
              "a non-empty list of positive widths", self.block_channels)
        check(self.layers_per_block >= 1, "model.layers_per_block", "≥ 1", self.layers_per_block)


FAMILIES: dict[str, type[ModelConfig]] = {"geca": GeCAConfig, "dit": DiTConfig, "unet": UNetConfig}

NAMED_MODELS: dict[str, ModelConfig] = {
    # The published GeCA-S: 13.3 M parameters at a 32×32×4 latent with 11 classes.
    "GeCA-S": GeCAConfig(name="GeCA-S", hidden_size=768, heads=12, mlp_hidden=3072, hidden_channels=64,
                         nca_steps=12),
    "GeCA-XS": GeCAConfig(name="GeCA-XS", hidden_size=384, heads=6, mlp_hidden=64, hidden_channels=32,
                          nca_steps=12),
    # Sized for 2 CPU cores: tests and the demo.
    "GeCA-T": GeCAConfig(),
    # The published DiT-S/2 baseline: 32.7 M parameters at a 32×32×4 latent with 11 classes.
    "DiT-S/2": DiTConfig(name="DiT-S/2", hidden_size=384, heads=6, mlp_hidden=1536, depth=12, patch_size=2),
    # LDM-B: the paper's 17.3 M-parameter UNet (its layout is unpublished; this one has that size at 32×32×4).
    "LDM-B": UNetConfig(name="LDM-B", block_channels=[64, 128, 128, 256], layers_per_block=2,
                        attention_resolutions=[4]),
    # CPU baselines matched to GeCA-T's parameter count (≈ 0.24 M at 28×28×3, 5 classes) for fair comparisons.
    "DiT-T": DiTConfig(name="DiT-T", hidden_size=48, heads=2, mlp_hidden=192, depth=5, patch_size=2),
    "LDM-T": UNetConfig(name="LDM-T", block_channels=[16, 24, 32], layers_per_block=1, attention_resolutions=[4]),
}


def named_model(name: str) -> ModelConfig:
    try:
        return copy.deepcopy(NAMED_MODELS[name])
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; named models: {', '.join(NAMED_MODELS)}") from None


def with_named_defaults(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """A model mapping whose `name` is a named config: that config's fields first, then the mapping's own keys."""
    if "name" not in raw:
        return raw
    if not isinstance(raw["name"], str):
        raise ConfigError(f"{where}: model.name: expected a model name, got {raw['name']!r}")
    try:
        base = dataclasses.asdict(named_model(raw["name"]))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return {**base, **raw}


def from_geca_0_1(raw: dict[str, Any]) -> dict[str, Any]:
    """A model mapping written by geca 0.1: it held every family's fields (keep the run's own family's) and its GeCA
    block had DiT's details (`block: v0.1`)."""
    family = FAMILIES.get(raw.get("family", "geca"), GeCAConfig)
    keep = {f.name for f in dataclasses.fields(family)}
    upgraded = {k: v for k, v in raw.items() if k in keep}
    return {**upgraded, "block": "v0.1"} if family is GeCAConfig else upgraded
