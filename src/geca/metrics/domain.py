"""The `domain` feature network: a small CNN classifier trained on the real training split.

Its penultimate layer (global-average-pooled, 128-d) gives features that know the domain, with no download:
the offline default for KID and FLD. Saved as safetensors with its settings in the file's metadata.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from geca.data.imageset import ImageSet, image_hashes
from geca.errors import ConfigError, DataError
from geca.utils.io import atomic_write
from geca.utils.schema import from_dict

ARCH = "geca-domain-cnn-v1"
MAX_INPUT = 64  # larger images are downsampled: domain features need shape and texture, not fine detail
TRAINED_ON = "trained_on.image_hashes"  # not a weight: what the network saw, to tell held-out data from it
# In the cache key: an older geca sharing the cache cannot read files with `trained_on` and `data_size`, and must
# not find them under its own key.
FILE_FORMAT = "trained_on-v1"
TRAINING = {"epochs": 10, "batch_size": 64, "lr": 2e-3, "width": 32}


@dataclass
class DomainMeta:
    in_channels: int
    input_size: int | None  # None: images keep their own size
    num_classes: int
    width: int = 32
    arch: str = ARCH
    class_names: list[str] | None = None
    multilabel: bool = False
    data: str = ""
    seed: int = 0
    epochs: int = 0
    val_accuracy: float | None = None
    data_size: int | None = None  # the training images' size, at which `trained_on` fingerprints them


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class DomainNet(nn.Module):
    """Three 3×3 conv stages (w, 2w, 4w channels; the first two stride 2), global average pool, linear head.

    Small on purpose: ≈ 5 MMAC per 28×28 image, so training takes seconds and features for thousands of images
    a second or two on a CPU.
    """

    def __init__(self, meta: DomainMeta, trained_on: np.ndarray | None = None) -> None:
        super().__init__()
        self.meta = meta
        self.trained_on = trained_on  # image_hashes of its training images (None in older files)
        w = meta.width
        self.body = nn.Sequential(_block(meta.in_channels, w, 2), _block(w, 2 * w, 2), _block(2 * w, 4 * w))
        self.head = nn.Linear(4 * w, meta.num_classes)
        self.feature_dim = 4 * w

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) → float in [−1, 1] at the network's input size."""
        x = images.float() / 127.5 - 1.0
        size = self.meta.input_size
        if size is not None and x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, y)
    return F.cross_entropy(logits, y.argmax(1))


@torch.no_grad()
def accuracy(net: DomainNet, data: ImageSet, batch_size: int = 256) -> float:
    """Top-1 accuracy (multi-class) or mean per-label accuracy at 0.5 (multi-label)."""
    net.eval()
    device = next(net.parameters()).device
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2)
    logits = torch.cat([net(net.prepare(b.to(device))).cpu() for b in x.split(batch_size)])
    y = torch.from_numpy(data.labels)
    if data.multilabel:
        return ((logits > 0).float() == y).float().mean().item()
    return (logits.argmax(1) == y.argmax(1)).float().mean().item()


def train_domain_net(data: ImageSet, seed: int = 0, epochs: int = TRAINING["epochs"],
                     batch_size: int = TRAINING["batch_size"], lr: float = TRAINING["lr"],
                     width: int = TRAINING["width"], val: ImageSet | None = None, source: str = "",
                     device: str | torch.device = "cpu") -> DomainNet:
    """Train the classifier on `data` (seeded, horizontal flips; bit-exact on a CPU) and return it, on the CPU, in
    eval mode."""
    if len(data) < 2:
        raise DataError(f"{data.source}: at least 2 images are needed to train domain features, got {len(data)}")
    if val is not None and (val.channels, val.class_names) != (data.channels, data.class_names):
        raise DataError(f"{val.source}: its validation images ({val.channels}-channel, classes {val.class_names}) "
                        f"do not match its training images ({data.channels}-channel, classes {data.class_names})")
    meta = DomainMeta(in_channels=data.channels, input_size=min(data.resolution, MAX_INPUT),
                      num_classes=data.num_classes, width=width, class_names=list(data.class_names),
                      multilabel=data.multilabel, data=source or data.source, seed=seed, epochs=epochs,
                      data_size=data.resolution)
    torch.manual_seed(seed)
    net = DomainNet(meta, image_hashes(data.images)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * -(-len(data) // batch_size))
    g = torch.Generator().manual_seed(seed)
    x_all = net.prepare(torch.from_numpy(data.images).permute(0, 3, 1, 2).to(device))
    y_all = torch.from_numpy(data.labels).to(device)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(data), generator=g).split(batch_size):
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            idx = idx.to(device)
            x = x_all[idx]
            flip = (torch.rand(len(idx), generator=g) < 0.5).to(device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = _loss(net(x), y_all[idx], data.multilabel)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    if val is not None and len(val):
        meta.val_accuracy = round(accuracy(net, val), 4)
    return net.cpu().requires_grad_(False)


def save_domain_net(net: DomainNet, path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    if net.trained_on is not None:
        tensors[TRAINED_ON] = torch.from_numpy(net.trained_on)
    metadata = {"geca_domain": json.dumps(asdict(net.meta))}
    atomic_write(Path(path), lambda p: save_file(tensors, p, metadata=metadata))


def is_domain_file(path: Path) -> bool:
    """Whether `path` is a safetensors file with `geca features train`'s metadata (not, say, a run's weights)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return "geca_domain" in (f.metadata() or {})
    except (SafetensorError, OSError):
        return False


def load_domain_net(path: Path) -> DomainNet:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder; give the .safetensors file that `geca features train` wrote")
    if not path.is_file():
        raise DataError(f"{path}: domain feature weights not found; create them with "
                        f"`geca features train --data SPEC --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("geca_domain")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        trained_on = tensors.pop(TRAINED_ON, None)
    except (SafetensorError, OSError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e})") from None
    if raw is None:
        raise DataError(f"{path}: not a `geca features train` file (no geca_domain metadata)")
    try:
        meta = from_dict(DomainMeta, json.loads(raw), "geca_domain metadata")
    except (json.JSONDecodeError, ConfigError) as e:
        raise DataError(f"{path}: corrupt geca_domain metadata ({e})") from None
    # bounds far beyond any trained network's, so that a crafted file cannot make us allocate gigabytes
    sizes = {"in_channels": (meta.in_channels, 64), "num_classes": (meta.num_classes, 10_000),
             "width": (meta.width, 1024), "input_size": (1 if meta.input_size is None else meta.input_size, 4096)}
    wrong = [f"{k} {v}" for k, (v, most) in sizes.items() if not 1 <= v <= most]
    if wrong or (meta.class_names is not None and len(meta.class_names) != meta.num_classes):
        raise DataError(f"{path}: corrupt geca_domain metadata ({', '.join(wrong) or 'class_names'} out of range)")
    if meta.arch != ARCH:
        raise DataError(f"{path}: architecture {meta.arch!r}, this version reads {ARCH!r}")
    if trained_on is not None and (trained_on.dtype != torch.int64 or trained_on.ndim != 1):
        raise DataError(f"{path}: {TRAINED_ON} must be a 1-D int64 tensor, got {trained_on.dtype} "
                        f"{tuple(trained_on.shape)}")
    net = DomainNet(meta, None if trained_on is None else trained_on.numpy())
    try:
        net.load_state_dict(tensors)
    except RuntimeError as e:
        raise DataError(f"{path}: weights do not fit the domain network ({str(e).splitlines()[0]})") from None
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise DataError(f"{path}: weights hold NaN or inf ({broken[0]})")
    return net.eval().requires_grad_(False)


def data_digest(data: ImageSet, seed: int, device: torch.device | str = "cpu") -> str:
    """A key for the cached network: the training images and labels, the seed, the training settings and the kind
    of device (from the same seed, a GPU trains a different network from a CPU)."""
    h = hashlib.sha256()
    for part in (ARCH, FILE_FORMAT, str(data.images.shape), json.dumps(TRAINING, sort_keys=True), str(seed),
                 str(data.class_names), torch.device(device).type):
        h.update(part.encode())
    h.update(np.ascontiguousarray(data.images).tobytes())
    h.update(np.ascontiguousarray(data.labels).tobytes())
    if data.multilabel and (data.labels.sum(1) == 1).all():
        # one-hot rows said to be multi-label (evaluate --multilabel): another loss and judging than as multi-class
        h.update(b"multilabel")
    return h.hexdigest()[:16]
