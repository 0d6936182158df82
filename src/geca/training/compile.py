"""model.compile resolved for a training run: `auto` compiles GeCA's attention where it was measured to win."""

from __future__ import annotations

import torch

from geca.config import TrainConfig
from geca.errors import ConfigError
from geca.models.build import count_macs
from geca.models.config import GeCAConfig, ModelConfig
from geca.run import ModelSpec
from geca.utils.hardware import can_compile, cpp_compiler

# The model maths (6 × the forward's multiply-accumulates per image, every cell counted) of a step budget above which
# `auto` compiles on a CPU. Measured on a 2-core AVX2 EPYC, GeCA-T at 28×28, batch 32: a cold compile of the attention
# costs ≈ 45 s and a step then takes ≈ 0.78× as long (3.2 vs 4.1 s in `geca demo`), so it pays for itself after ≈ 50
# steps ≈ 7 TFLOP; 20 leaves margin.
AUTO_MIN_TFLOP = 20.0
# A shorter time budget does not earn a cold compile back: the 5-minute demo reached step 71 compiled, 72 eager.
AUTO_MIN_MINUTES = 15.0


def check_compile(config: ModelConfig, device: torch.device) -> None:
    """`model.compile: true` where nothing can compile is refused before a run starts (it fails at the first call)."""
    if config.compile == "true" and not can_compile(device):
        raise ConfigError("--compile (model.compile: true) needs a C++ compiler on a CPU and none was found "
                          "(install g++ or set CXX), or use --no-compile")


def compile_for_run(spec: ModelSpec, train: TrainConfig, device: torch.device) -> tuple[bool, str]:
    """Whether the run compiles, and why (for its start-up line)."""
    setting = spec.model.compile
    if setting == "false":
        return False, ""
    if setting == "true":
        return True, "compiled (model.compile: true)"
    config = spec.model
    if not isinstance(config, GeCAConfig) or config.attention not in ("fast", "sliced"):
        return False, ""  # DiT's and the UNet's blocks, reference and triton: not measured to win
    if device.type != "cpu":
        return False, ""  # unmeasured on GPUs (bench/gpu.sh compares compiled, fast and triton)
    if cpp_compiler() is None:
        return False, "not compiled (model.compile: auto; no C++ compiler)"
    if train.max_minutes is not None and train.max_minutes < AUTO_MIN_MINUTES:
        return False, ""
    tflop = 6 * dense_macs(spec) * train.batch_size * train.max_steps / 1e12
    if tflop < AUTO_MIN_TFLOP:
        return False, ""
    return True, "compiled (model.compile: auto; the first run on this machine compiles for about a minute)"


def dense_macs(spec: ModelSpec) -> int:
    """Multiply-accumulates of one denoiser call on one image, counted on the meta device (nothing is computed)."""
    with torch.device("meta"):
        model = spec.build()
    return count_macs(model, spec.in_channels, spec.num_classes, spec.resolution)
