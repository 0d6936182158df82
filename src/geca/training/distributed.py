"""The processes of a run, through accelerate and torch.distributed: the Accelerator, the main process's work first,
failures that stop every process, and the check that data-parallel ranks ended with the same weights."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, broadcast

from geca.config import RunConfig
from geca.errors import ConfigError, DataError, TrainingError
from geca.utils.hardware import resolve_precision

ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# While the main process alone builds the latent cache, validates or draws the final preview, the others wait in a
# collective; NCCL's default 10 minutes is shorter than that work on a large dataset.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
T = TypeVar("T")


def make_accelerator(config: RunConfig, run_dir: Path, cpu: bool = False) -> Accelerator:
    on_gpu = not cpu and torch.cuda.is_available()
    try:
        precision = ACCELERATE_PRECISION[resolve_precision(config.train.precision, cuda=on_gpu)]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # Accelerate keeps mixed precision in a process-wide singleton; reset it (not the process group) so that
    # several runs with different precisions can share one Python process.
    AcceleratorState._reset_state(reset_partial_state=False)
    tensorboard = config.train.logger == "tensorboard"
    return Accelerator(mixed_precision=precision, cpu=not on_gpu,
                       log_with="tensorboard" if tensorboard else None, project_dir=run_dir if tensorboard else None,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)])


def main_first(accelerator: Accelerator, work: Callable[[bool], T], what: str) -> T:
    """`work(True)` on the main process, then `work(False)` on the others (which read what it downloaded or built).
    Unlike accelerate's main_process_first, a failure on any process stops them all: without torchrun's agent the
    others would wait at the next collective until its timeout."""
    result = None
    for main in (True, False):
        error = None
        if accelerator.is_main_process == main:
            try:
                result = work(main)
            except Exception as e:
                error = e
        fail_together(accelerator, error is not None, what)
        if error is not None:
            raise error
    return result  # type: ignore[return-value]


def same_folds_everywhere(accelerator: Accelerator, folds_file: str | None, digest: str | None) -> None:
    """Every process must have read the main process's folds (a file rewritten between their reads is refused)."""
    if digest is None or accelerator.num_processes == 1:
        return
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=accelerator.device)
    other = mine.ne(broadcast(mine.clone(), from_process=0)).any().item()
    fail_together(accelerator, other, "reading the folds file")
    if other:
        raise DataError(f"{folds_file}: this process read other folds than the main process (the file changed while "
                        "the processes started); rerun")


def fail_together(accelerator: Accelerator, failed: bool, what: str) -> None:
    """A collective every process reaches: where any process failed, the others raise too."""
    flag = max_over_processes(torch.tensor([float(failed)], device=accelerator.device))
    if flag.item() and not failed:
        raise TrainingError(f"another process failed {what}; see its error")


def max_over_processes(t: torch.Tensor) -> torch.Tensor:
    """The elementwise max over processes, in place. torch.distributed itself: accelerate's reduce does a max only
    since 2026 (older releases, which pyproject allows, sum anything but "mean")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def parameters_identical(accelerator: Accelerator, model: torch.nn.Module) -> float:
    """Check that data-parallel ranks ended with the same weights; a mismatch means broken gradient sync."""
    flat = torch.cat([p.detach().float().flatten() for p in accelerator.unwrap_model(model).parameters()])
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64) % 9973 + 1
    checksum = (flat.double() * weights).sum().reshape(1)
    sums = accelerator.gather(checksum)
    if not torch.all(sums == sums[0]):
        raise TrainingError(f"parameters differ between processes after training: checksums {sums.tolist()}")
    return checksum.item()
