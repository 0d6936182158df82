"""model.compile resolved for a training run: `auto` compiles GeCA's attention where it was measured to win."""

from __future__ import annotations

import torch

from geca.config import TrainConfig
from geca.errors import ConfigError
from geca.models.build import count_macs
from geca.models.config import GeCAConfig, ModelConfig
from geca.run import ModelSpec
from geca.utils.hardware import c_compiler, can_compile, cpp_compiler

# The model maths (6 × the forward's multiply-accumulates per image, every cell counted) of the steps a process has
# left above which `auto` compiles on a CPU. Measured on a 2-core AVX2 EPYC, GeCA-T at 28×28, batch 32: a cold compile
# of the attention costs ≈ 45 s and a step then takes ≈ 0.8× as long (3.2 vs 4.0 s in `geca demo`), so it pays for
# itself after ≈ 50 steps ≈ 7 TFLOP; 20 leaves margin (previews and validation compile their own batch shapes).
AUTO_MIN_TFLOP = 20.0
# A shorter time budget does not earn a cold compile back: the 5-minute demo reached step 71 compiled, 72 eager.
AUTO_MIN_MINUTES = 15.0


def check_toolchain(config: ModelConfig, device: torch.device) -> None:
    """`model.compile: true`, or `model.attention: cpu` on a CPU, where nothing can build them is refused before a run
    starts (`auto` falls back to `fast` with a warning instead)."""
    if config.compile == "true" and not can_compile(device):
        raise ConfigError("--compile (model.compile: true) needs a C++ compiler and Python's headers on a CPU, and "
                          "they were not found (install g++ and python3-dev, or set CXX), or use --no-compile")
    if getattr(config, "attention", None) == "cpu" and device.type == "cpu" and c_compiler() is None:
        raise ConfigError("--attention cpu (model.attention: cpu) needs a C compiler, and none was found (install "
                          "gcc or clang, or set CC), or use --attention fast")


def compile_for_run(spec: ModelSpec, train: TrainConfig, device: torch.device, steps_left: int, batch: int
                    ) -> tuple[bool, str]:
    """Whether a run with `steps_left` steps of `batch` images per process compiles, and what its start-up line
    says about it."""
    config = spec.model
    geca = isinstance(config, GeCAConfig)
    what = "blocks" if not geca else "attention" if config.skip_idle else "NCA step"
    eager = False, f"{what} not compiled (model.compile: {config.compile})"  # the start-up line always says which
    if config.compile != "auto":
        return (True, f"{what} compiled (model.compile: true)") if config.compile == "true" else eager
    if not geca or config.attention not in ("fast", "sliced") or not config.skip_idle:
        # GeCA's default attention `auto` is the C kernels on a CPU, faster than the compiled attention with no
        # compile to wait for. DiT's and the UNet's blocks, reference and triton: not measured to win. The whole dense
        # NCA step (skip_idle off) compiled was 1.27× eager for GeCA-T at 28×28, batch 32, on a CPU, but its cold
        # compile takes ≈ 75 s (the attention's ≈ 35 s) and skipping idle cells is faster still: left to --compile.
        return eager
    if device.type != "cpu":
        return eager  # unmeasured on GPUs (bench/gpu.sh compares compiled, fast and triton)
    if train.max_minutes is not None and train.max_minutes < AUTO_MIN_MINUTES:
        return eager
    if 6 * dense_macs(spec) * batch * steps_left < AUTO_MIN_TFLOP * 1e12:
        return eager
    if cpp_compiler() is None:
        return False, "attention not compiled (model.compile: auto, but no C++ compiler or Python headers here)"
    return True, "attention compiled (model.compile: auto; the first run on this machine compiles for about a minute)"


def dense_macs(spec: ModelSpec) -> int:
    """Multiply-accumulates of one denoiser call on one image, counted on the meta device (nothing is computed)."""
    with torch.device("meta"):
        model = spec.build()
    return count_macs(model, spec.in_channels, spec.num_classes, spec.resolution)
