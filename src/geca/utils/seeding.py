"""Seeds derived from several integers, so that every random draw is a pure function of what it belongs to."""

from __future__ import annotations

from contextlib import AbstractContextManager

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from (seed, step, rank), (seed, image, flipped), …: resuming or re-batching never shifts one."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def kept_random_state(device: torch.device | str) -> AbstractContextManager[None]:
    """Leave the global random state as it was after the block: the CPU's, and the GPU's where `device` is one (the
    draws of a sampler on a GPU come from that device's generator)."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
