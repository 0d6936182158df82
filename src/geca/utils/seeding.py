"""Seeds derived from several integers, so that every random draw is a pure function of what it belongs to."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from (seed, step, rank), (seed, image, flipped), …: resuming or re-batching never shifts one."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
