"""LPIPS diversity of a generated set: mean AlexNet-LPIPS distance over pairs of its images."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from geca.errors import DataError
from geca.metrics.kid import check_protocol
from geca.utils.pretrained import check_published, load_state_dict_file, resolve_weights

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_SHA256 = "7be5be79"  # the prefix its torch.hub name publishes
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
STANDARD_PAIRS = 2000
# AlexNet's third max-pool needs ≥ 3×3 inputs, i.e. images of ≥ ~64 px; smaller ones are upsampled to this.
MIN_LPIPS_SIZE = 64
# lpips' AlexNet keeps torchvision's feature indices, split into five slices.
_ALEX_SLICES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3, 8: 4, 9: 4, 10: 5, 11: 5}


@dataclass
class LPIPSResult:
    mean: float
    std: float
    pairs: int
    backbone: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def alexnet_weights(weights: str | Path | None, flag: str = "--lpips-weights") -> Path | None:
    """The AlexNet backbone file to use (`weights`, else $GECA_WEIGHTS_DIR/alexnet-owt-7be5be79.pth);
    None for "random". `flag` is how the user names the file (in the message when it is missing)."""
    if weights == "random":
        return None
    return resolve_weights(weights, ALEXNET_FILE, "LPIPS AlexNet backbone", ALEXNET_URL, flag)


def load_lpips(weights: str | Path | None, seed: int = 0) -> torch.nn.Module:
    """AlexNet LPIPS (v0.1 linear heads from the `lpips` wheel) with the torchvision AlexNet backbone from a file.

    `weights="random"` gives a seeded random backbone: the plumbing works, the values mean nothing (tests only).
    """
    import lpips

    path = alexnet_weights(weights)
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    if path is not None:
        check_published(path, ALEXNET_SHA256, ALEXNET_FILE, "torchvision AlexNet")
        state = load_state_dict_file(path, "torchvision AlexNet")
        try:
            mapped = {f"slice{_ALEX_SLICES[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v
                      for k, v in state.items() if k.startswith("features.")}
            model.net.load_state_dict(mapped)
        except (RuntimeError, KeyError, ValueError, AttributeError) as e:
            raise DataError(f"{path}: not torchvision AlexNet weights ({str(e).splitlines()[0]})") from None
    return model.eval().requires_grad_(False)


def lpips_pairs(n: int, protocol: str, seed: int = 0, max_pairs: int = STANDARD_PAIRS) -> np.ndarray:
    """(P, 2) image-index pairs. paper: the n−1 consecutive pairs of a seeded shuffle;
    standard: `max_pairs` distinct unordered pairs (i ≠ j) drawn at random, or all pairs if there are fewer."""
    check_protocol(protocol)
    if n < 2:
        raise ValueError(f"LPIPS diversity needs at least 2 images, got {n}")
    rng = np.random.default_rng(seed)
    if protocol == "paper":
        perm = rng.permutation(n)
        return np.stack([perm[:-1], perm[1:]], axis=1)
    total = n * (n - 1) // 2
    k = np.sort(rng.choice(total, size=min(max_pairs, total), replace=False))
    # Pair number k → (i, j), i < j, in row-major order over the upper triangle.
    row_start = np.concatenate([[0], np.cumsum(np.arange(n - 1, 0, -1))])[:-1]
    i = np.searchsorted(row_start, k, side="right") - 1
    return np.stack([i, k - row_start[i] + i + 1], axis=1)


def _lpips_input(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, C) → float (B, 3, H', W') in [0, 1]; grey repeated to RGB, small images upsampled."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if min(x.shape[-2:]) < MIN_LPIPS_SIZE:
        x = F.interpolate(x, size=(MIN_LPIPS_SIZE, MIN_LPIPS_SIZE), mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def lpips_diversity(images: np.ndarray, model: torch.nn.Module, protocol: str, seed: int = 0,
                    batch_size: int = 64, device: str | torch.device = "cpu", backbone: str = "") -> LPIPSResult:
    """Mean ± (population) std of LPIPS over the protocol's pairs of `images` (uint8 (N, H, W, C))."""
    pairs = lpips_pairs(len(images), protocol, seed)
    device = torch.device(device)
    model = model.to(device)
    dists = []
    for chunk in np.array_split(pairs, max(1, -(-len(pairs) // batch_size))):
        a, b = _lpips_input(images[chunk[:, 0]], device), _lpips_input(images[chunk[:, 1]], device)
        dists.append(model(a, b, normalize=True).flatten().double().cpu())
    d = torch.cat(dists)
    return LPIPSResult(mean=d.mean().item(), std=d.std(unbiased=False).item(), pairs=len(pairs), backbone=backbone)
