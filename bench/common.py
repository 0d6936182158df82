"""What the model benchmarks share: the input-shape flags and the torch set-up they imply."""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from typing import Any

import torch

from geca.errors import ConfigError
from geca.models.config import ModelConfig, named_model
from geca.utils import hardware
from geca.utils.allocator import keep_freed_memory
from geca.utils.schema import Checks, apply_set

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precisions' names


def positive(text: str) -> int:
    """An argparse type: an integer ≥ 1 (argparse then names the flag, with exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def configs(text: str) -> str:
    """An argparse type: comma-separated named configs, each one geca knows."""
    names = [name.strip() for name in text.split(",")]
    for name in names:
        try:
            named_model(name)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return ",".join(names)


def precisions(ap: argparse.ArgumentParser, text: str, device: torch.device) -> list[str]:
    """--precisions as a list, each known, once, and runnable on `device` (fp16: CUDA only)."""
    chosen = [p.strip() for p in text.split(",")]
    if unknown := [p for p in chosen if p not in DTYPES]:
        ap.error(f"--precisions: {', '.join(map(repr, unknown))} is not one of {', '.join(DTYPES)}")
    if len(set(chosen)) < len(chosen):
        ap.error(f"--precisions: each precision once, got {text}")
    if "fp16" in chosen and device.type != "cuda":
        ap.error("--precisions: fp16 needs a CUDA device")
    return chosen


def model_parser(doc: str | None, batch: int, batch_help: str) -> argparse.ArgumentParser:
    """Flags for named configs at an input shape on a device; scripts add their own after these."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", type=configs, default="GeCA-T,DiT-T,LDM-T",
                    help="Comma-separated named configs (any family).")
    ap.add_argument("--batch", type=positive, default=batch, help=batch_help)
    ap.add_argument("--resolution", type=positive, default=32, help="Grid size (32 = SD-VAE latent of 256² images).")
    ap.add_argument("--channels", type=positive, default=4, help="Input channels (4 = SD-VAE latents).")
    ap.add_argument("--classes", type=positive, default=11, help="Label entries.")
    ap.add_argument("--threads", type=positive, default=2, help="torch CPU threads.")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N].")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="tuned: glibc keeps freed memory, as the geca command does; default: glibc as it comes.")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="Change a model setting of every config that has it, e.g. --set hidden_size=192 (repeatable).")
    ap.add_argument("--json", action="store_true", help="Print JSON only.")
    return ap


# Chosen by --configs and each variant (train_step's --attention), not by --set.
FIXED = ("name", "family", "attention", "skip_idle", "compile")


def model_config(name: str, args: argparse.Namespace) -> ModelConfig:
    """The named config with the run's --set changes (values read as YAML and checked as a config file's are; a
    key that none of the chosen configs has is an error, one that only some have changes those)."""
    config = named_model(name)
    chosen = [named_model(n) for n in args.configs.split(",")]
    own = []
    for item in args.set:
        key = item.partition("=")[0]
        if key in FIXED:
            raise SystemExit(f"error: --set {key}: chosen by --configs and the variants, not by --set")
        if key and not any(hasattr(c, key) for c in chosen):
            raise SystemExit(f"error: --set {key}: none of {args.configs} has that setting")
        if not key or hasattr(config, key):  # a malformed item is named by apply_set
            own.append(item)
    try:
        names = apply_set(config, own)
        config.validate(Checks({f"model.{key}": flag for key, flag in names.items()}))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    return config


def device_of(args: argparse.Namespace) -> torch.device:
    if args.malloc == "tuned":
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    return torch.device(args.device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's matmul throughput measured now (best of a few square products): MFU's denominator, taken in
    the same run and under the same load as the model it divides."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def reset_peak_memory(device: torch.device) -> float:
    """Start a peak-memory window; returns the memory held now (MiB): CUDA tensors, or this process's RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    gc.collect()
    hardware.reset_peak_memory(device)
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else _status("VmRSS")


def peak_memory(device: torch.device) -> float:
    """The peak (MiB) since `reset_peak_memory`: `torch.cuda.max_memory_allocated`, or Linux VmHWM on a CPU."""
    return _known(hardware.peak_memory_mib(device))


def _status(field: str) -> float:
    return _known(hardware.proc_status_mib(field))


def _known(mib: float | None) -> float:
    if mib is None:
        raise RuntimeError("CPU memory is measured through Linux's /proc/self/status, which this system lacks")
    return mib


def fresh_process(script: str, worker: list[str]) -> Any:
    """Run `script --worker …` with this run's flags (less --json) in a new Python process, so that no setting
    inherits another's allocator pools, caches or threads; returns the JSON it prints last."""
    flags = [a for a in sys.argv[1:] if a != "--json"]
    out = subprocess.run([sys.executable, script, *flags, "--worker", *worker], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def worker_error(e: subprocess.CalledProcessError) -> str:
    """What a `fresh_process` worker said last before it failed."""
    return ((e.stderr or "").strip().splitlines()[-1:] or [f"exit {e.returncode}"])[0]


def failed(rows: list[dict], label: str, why: str, **fields: Any) -> None:
    """Record and print why `label` has no timing: one setting that fails, or a config that cannot be built here
    (LDM-B without diffusers), must not cost the others (GPU time)."""
    rows.append({**fields, "error": why})
    print(f"{label} {why}", flush=True)
