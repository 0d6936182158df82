"""Image conversions and grids."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# the per-channel statistics torchvision's ImageNet networks were trained with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def fit_square(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, C) centre-cropped to a square and resized to (N, size, size, C), bicubic and antialiased on
    uint8 (torchvision's): how every loader and the SD-VAE codec bring images to a size, so one dataset stored two
    ways gives the same pixels."""
    h, w = images.shape[1:3]
    side = min(h, w)
    top, left = round((h - side) / 2), round((w - side) / 2)  # torchvision's center_crop: half pixels to even
    images = images[:, top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(images)
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # a copy: a decoded PIL image is read-only
    # on uint8, as torchvision resizes it (the same pixels) without importing it: torchvision imports torch._dynamo
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] → (B, H, W, C) uint8."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def pil_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def grid(images: np.ndarray, nrow: int, pad: int = 2, upscale: int = 1) -> np.ndarray:
    """Tile (B, H, W, C) uint8 images into one (H', W', C) array, `nrow` images per row."""
    from torchvision.utils import make_grid  # here: importing torchvision imports torch._dynamo (≈ 1.5 s)

    t = torch.from_numpy(images).permute(0, 3, 1, 2)
    if upscale > 1:
        t = t.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    g = make_grid(t, nrow=nrow, padding=pad, pad_value=255)
    out = g.permute(1, 2, 0).numpy()
    return out[..., :1] if images.shape[-1] == 1 else out
