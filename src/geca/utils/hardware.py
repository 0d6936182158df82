"""What the machine can do fast."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sysconfig
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DEVICE_HELP = "auto, cpu, cuda or cuda:N."


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them torch emulates bf16 matmul on the CPU, often 100× slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile would build CPU kernels with, or None where that would fail at the first call:
    no compiler, or no Python.h to build against (slim images ship g++ without python3-dev)."""
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # torch moved it: look where inductor has always looked
        return next((c for c in (os.environ.get("CXX"), "g++") if c and shutil.which(c)), None)
    try:
        return get_cpp_compiler()  # inductor's own search ($CXX, else g++ on Linux), so geca agrees with it
    except Exception:  # its "none found" errors are private types
        return None


def c_compiler() -> str | None:
    """The C compiler the CPU attention kernels are built with: $CC, else cc, gcc or clang on the PATH."""
    chosen = os.environ.get("CC")
    if chosen and not shutil.which(chosen):
        warnings.warn(f"$CC={chosen} is not found; building the CPU attention kernels with the first of cc, gcc, "
                      "clang on the PATH", stacklevel=2)
    return next((c for c in (chosen, "cc", "gcc", "clang") if c and shutil.which(c)), None)


def can_compile(device: torch.device) -> bool:
    """Whether torch.compile can build kernels for `device` (CUDA: Triton ships with torch's wheels)."""
    return device.type == "cuda" or cpp_compiler() is not None


def quiet_compile() -> None:
    """Inductor's CPU build looks for a CUDA toolkit and warns on CPU-only machines that have one; nothing is wrong."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(_not_no_cuda_runtime)


def _not_no_cuda_runtime(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No CUDA runtime is found")


def resolve_precision(name: str, cuda: bool | None = None) -> str:
    """`auto` is bf16 where the hardware runs it natively (CUDA with bf16, or a bf16-capable CPU), else fp32. `cuda`
    says whether the work runs on the GPU (default: wherever there is one)."""
    import torch

    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "auto":
        native = torch.cuda.is_bf16_supported(including_emulation=False) if cuda else cpu_has_native_bf16()
        return "bf16" if native else "fp32"
    if name == "fp16" and not cuda:
        raise ValueError("fp16 mixed precision needs a CUDA GPU; on a CPU use bf16, fp32 or auto")
    if name == "bf16" and not cuda and not cpu_has_native_bf16():
        warnings.warn("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 autocast will be far slower than fp32; "
                      "use --precision auto or fp32", stacklevel=2)
    return name


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU where there is one; anything but a CPU or an available CUDA device is a ConfigError."""
    import torch

    from geca.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use {DEVICE_HELP}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: geca runs on {DEVICE_HELP}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r} requested but no CUDA GPU is available")
    return device


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory window (CUDA's peak statistics, or Linux's VmHWM back to the current RSS)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then counts from the process's start


def peak_memory_mib(device: torch.device | str) -> float | None:
    """Peak memory since `reset_peak_memory`: tensors allocated on a CUDA device, or this process's resident set
    (Linux VmHWM)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return proc_status_mib("VmHWM")


def proc_status_mib(field: str) -> float | None:
    """A memory field of Linux's /proc/self/status (VmRSS, VmHWM, …) in MiB; None where there is none."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith(field + ":")), None)
