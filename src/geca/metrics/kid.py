"""Kernel Inception Distance: unbiased MMD² with the cubic polynomial kernel over random subsets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

PROTOCOLS = ("paper", "standard")
KID_SUBSETS = 100
STANDARD_SUBSET_SIZE = 1000
# Below this subset size the estimate's spread across subsets usually exceeds the gaps between generators worth
# telling apart, so evaluate warns.
NOISY_SUBSET = 50
KERNEL_ELEMENTS = 1 << 18  # kernel-matrix entries per batch of subsets: 2 MiB in float64, so batches stay in cache


@dataclass
class KIDResult:
    mean: float
    std: float
    subset_size: int
    subsets: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


def kid_subset_size(protocol: str, n_real: int, n_fake: int) -> int:
    """paper: n_fake // 4 (GeCA's Table 1); standard: min(1000, n_real, n_fake). Never more than either set."""
    check_protocol(protocol)
    size = n_fake // 4 if protocol == "paper" else STANDARD_SUBSET_SIZE
    return min(size, n_real, n_fake)


def min_generated(protocol: str) -> int:
    """The fewest generated images whose KID subsets hold 2 (n // 4 under paper) and that leave 3 for FLD."""
    check_protocol(protocol)
    return 8 if protocol == "paper" else 3


def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KID's kernel k(a, b) = (a·b / d + 1)³ between the rows of (..., p, d) and (..., q, d): (..., p, q)."""
    return (a @ b.transpose(-1, -2) / a.shape[-1] + 1.0) ** 3


def poly_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² between equal-size feature sets (..., m, d) with `poly_kernel`; batched over (...)."""
    m = x.shape[-2]
    kxx, kyy, kxy = poly_kernel(x, x), poly_kernel(y, y), poly_kernel(x, y)

    def off_diagonal_sum(kk: torch.Tensor) -> torch.Tensor:
        return kk.sum((-2, -1)) - kk.diagonal(dim1=-2, dim2=-1).sum(-1)

    return (off_diagonal_sum(kxx) + off_diagonal_sum(kyy)) / (m * (m - 1)) - 2 * kxy.sum((-2, -1)) / m**2


def kid(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, subset_size: int,
        subsets: int = KID_SUBSETS, seed: int = 0) -> KIDResult:
    """KID mean and (population) std over `subsets` random subsets of `subset_size` from each set.

    Hand-written rather than torchmetrics' KernelInceptionDistance because we score precomputed features many
    times (overall, per class, during training) and importing torchmetrics costs seconds. The draws follow
    torchmetrics exactly (per subset: randperm of the real set, then of the generated set, from a generator
    seeded with `seed`), so with `torch.manual_seed(seed)` before its compute() both give the same numbers.
    Subsets are scored in batches: a few large matrix products instead of hundreds of small ones.
    """
    x = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs (N, F) feature sets of one width, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("KID: features contain NaN or inf")
    if not 2 <= subset_size <= min(len(x), len(y)):
        raise ValueError(f"KID subset size must be between 2 and the smaller set ({len(x)} real, {len(y)} "
                         f"generated), got {subset_size}")
    g = torch.Generator().manual_seed(seed)
    draws = [(torch.randperm(len(x), generator=g)[:subset_size], torch.randperm(len(y), generator=g)[:subset_size])
             for _ in range(subsets)]
    xi, yi = torch.stack([a for a, _ in draws]), torch.stack([b for _, b in draws])
    chunk = max(1, KERNEL_ELEMENTS // subset_size**2)
    scores = torch.cat([poly_mmd2(x[xi[s:s + chunk]], y[yi[s:s + chunk]]) for s in range(0, subsets, chunk)])
    return KIDResult(mean=scores.mean().item(), std=scores.std(unbiased=False).item(), subset_size=subset_size,
                     subsets=subsets)


def kid_standard_error(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor,
                       labels: np.ndarray | None = None, block: int = 1024) -> float:
    """Delete-one jackknife standard error of the unbiased MMD² between all real and all generated features, over
    the generated images: how far KID would move with another draw of as many images from the same generator.

    KID's ± (the spread over subsets, the field's convention) cannot say this once the subsets take every generated
    image, and the real set is shared by all generators compared, so its own spread does not separate them. With
    `labels` (one row per generated image) the jackknife is stratified by label, for another draw *with the same
    labels*, as every `geca sample` set is drawn; that needs ≥ 2 images per label, else it falls back to the plain
    jackknife. Kernel sums go block by block: memory stays O(block · n) for any set size.
    """
    x = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    m, n = len(x), len(y)
    if n < 3:
        raise ValueError(f"KID's standard error needs ≥ 3 generated images, got {n}")
    # Per generated image i: its kernel sum with the other generated images, and with the real ones.
    self_k = poly_kernel(y.unsqueeze(1), y.unsqueeze(1)).view(n)
    row_yy = torch.cat([poly_kernel(y[s:s + block], y).sum(1) for s in range(0, n, block)]) - self_k
    row_xy = torch.cat([poly_kernel(y[s:s + block], x).sum(1) for s in range(0, n, block)])
    s_yy, s_xy = row_yy.sum(), row_xy.sum()
    # The real-real term is the same for every deletion and drops out of the variance.
    left_out = (s_yy - 2 * row_yy) / ((n - 1) * (n - 2)) - 2 * (s_xy - row_xy) / (m * (n - 1))
    strata = np.zeros(n, dtype=np.int64)
    if labels is not None:
        by_label = np.unique(np.asarray(labels).reshape(n, -1), axis=0, return_inverse=True)[1].reshape(-1)
        if np.bincount(by_label).min() >= 2:
            strata = by_label
    variance = 0.0
    for c in np.unique(strata):
        group = left_out[torch.from_numpy(strata == c)]
        variance += (len(group) - 1) / len(group) * ((group - group.mean()) ** 2).sum().item()
    return math.sqrt(variance)
