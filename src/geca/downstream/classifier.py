"""The downstream classifier: torchvision's ResNet-34 trained with Adam, the epoch picked on validation AUC."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet34
from tqdm.auto import tqdm

from geca.downstream.metrics import score
from geca.errors import ConfigError, TrainingError
from geca.utils.images import IMAGENET_MEAN, IMAGENET_STD
from geca.utils.pretrained import load_state_dict_file

STEMS = ("imagenet", "cifar")
IMAGENET_URL = "https://download.pytorch.org/models/resnet34-b627a593.pth"


@dataclass
class ClassifierConfig:
    """How one classifier is trained; ``equal_steps`` gives every arm the optimizer steps of the real set alone."""

    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    stem: str = "imagenet"
    imagenet_weights: Path | None = None
    equal_steps: bool = True
    device: str = "cpu"
    progress: bool = True

    def validate(self) -> None:
        if self.stem not in STEMS:
            raise ConfigError(f"unknown stem {self.stem!r}; valid: {', '.join(STEMS)}")
        if self.epochs < 1 or self.batch_size < 2 or not self.lr > 0:
            raise ConfigError(f"need epochs ≥ 1, batch size ≥ 2 and lr > 0; got {self.epochs}, {self.batch_size}, "
                              f"{self.lr}")
        if self.imagenet_weights is not None and self.stem == "cifar":
            raise ConfigError("ImageNet weights need the ImageNet stem (--stem imagenet): the cifar stem's 3×3 "
                              "first convolution has no pretrained counterpart")
        if self.imagenet_weights is not None:
            build_resnet34(2, 3, self.stem, self.imagenet_weights)  # a file that is no ResNet-34 fails before training


def _missing_weights(path: Path) -> ConfigError:
    return ConfigError(f"{path}: ImageNet weights file not found; download torchvision's ResNet-34 weights "
                       f"({IMAGENET_URL}) on a machine with internet and pass the file's path")


def load_imagenet_weights(path: Path, in_channels: int) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-34 ImageNet state dict from a local file, its head dropped and conv1 fitted to grey."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder; give the ImageNet weights file itself (resnet34-b627a593.pth)")
    if not path.is_file():
        raise _missing_weights(path)
    state = load_state_dict_file(path, "torchvision ResNet-34")
    if "conv1.weight" not in state:
        raise ConfigError(f"{path}: not a torchvision ResNet-34 state dict (no conv1.weight)")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if in_channels == 1:  # grey input: the RGB filters summed respond to grey as they did to colour
        state["conv1.weight"] = state["conv1.weight"].sum(1, keepdim=True)
    return state


def build_resnet34(num_classes: int, in_channels: int, stem: str = "imagenet",
                   imagenet_weights: Path | None = None) -> nn.Module:
    """torchvision's ResNet-34 with ``num_classes`` outputs and ``in_channels`` inputs.

    ``stem="cifar"`` replaces the 7×7/2 convolution and max-pool by one 3×3/1 convolution, as MedMNIST v2's 28-px
    ResNets do: the ImageNet stem divides a 28-px image by 4 before the first block (layer 4 then sees 1×1),
    which costs accuracy on tiny images but is 13× cheaper (71 vs 937 MMAC per 28-px image).
    """
    model = resnet34(weights=None, num_classes=num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    if imagenet_weights is not None:
        state = load_imagenet_weights(imagenet_weights, in_channels)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"{imagenet_weights}: weights do not fit ResNet-34 ({first})") from None
        if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
            raise ConfigError(f"{imagenet_weights}: not a ResNet-34 state dict (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model


def geometric_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip, rotation ±10°, scale 0.9–1.1 and shift ±5 % per image; black fill.

    Written with affine_grid because torchvision's transforms draw one set of parameters per call, i.e. per
    batch. No vertical flips: an upside-down fundus or OCT B-scan is not a plausible image.
    """
    b = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    angle, scale = uniform(-math.pi / 18, math.pi / 18), uniform(0.9, 1.1)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    tx, ty = uniform(-0.1, 0.1), uniform(-0.1, 0.1)  # ±5 % of the side in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([flip * cos, -sin, tx], 1), torch.stack([flip * sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) → uint8 (N, C, H, W); converted to float per batch to keep 224-px sets small."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


class Normalise:
    """[0, 1] images → the network's input scale: ImageNet statistics with ImageNet weights, else [-1, 1]."""

    def __init__(self, channels: int, imagenet: bool, device: torch.device) -> None:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else ((0.5,) * 3, (0.5,) * 3)
        if channels == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, multilabel: bool, normalise: Normalise, device: torch.device,
            batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, K): sigmoid for multi-label, softmax for multi-class."""
    model.eval()
    out = []
    for xb in torch.split(images, batch_size):
        logits = model(normalise(xb.to(device).float() / 255)).float()
        out.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).cpu())
    return torch.cat(out).numpy()


@dataclass
class TrainedClassifier:
    """The model at its best validation epoch, and what happened on the way."""

    model: nn.Module
    normalise: Normalise
    best_epoch: int
    best_val_auc: float
    history: list[dict[str, float]] = field(default_factory=list)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """An endless stream of full batches: consecutive seeded permutations of range(n)."""
    buffer = torch.empty(0, dtype=torch.long)
    while True:
        while len(buffer) < batch_size:
            buffer = torch.cat([buffer, torch.randperm(n, generator=generator)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, n_real: int, val_x: torch.Tensor,
                     val_y: np.ndarray, multilabel: bool, augment: bool, config: ClassifierConfig, seed: int,
                     desc: str = "train") -> TrainedClassifier:
    """Train from ``seed`` (initialisation, batch order, augmentation) and return the best-validation-AUC epoch.

    ``train_x`` holds the real images first (``n_real`` of them) and any synthetic ones after; an epoch is
    ``ceil(n_real / batch)`` steps with ``equal_steps``, else a pass over everything. Adam, with the learning rate
    divided by 10 at 50 % and 75 % of the epochs (MedMNIST v2's schedule).
    """
    config.validate()
    device = torch.device(config.device)
    torch.manual_seed(seed)
    model = build_resnet34(train_y.shape[1], train_x.shape[1], config.stem, config.imagenet_weights).to(device)
    normalise = Normalise(train_x.shape[1], config.imagenet_weights is not None, device)
    generator = torch.Generator().manual_seed(seed)
    batch = min(config.batch_size, len(train_x))
    if batch < 2:
        raise ConfigError(f"{desc}: need at least 2 training images, got {len(train_x)}")
    steps = math.ceil((n_real if config.equal_steps else len(train_x)) / batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    milestones = sorted({int(0.5 * config.epochs), int(0.75 * config.epochs)} - {0})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    loss_fn = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
    targets = train_y.float() if multilabel else train_y.argmax(1)
    stream = _batches(len(train_x), batch, generator)
    best: tuple[float, int, dict] = (-math.inf, 0, {})
    history = []
    bar = tqdm(total=config.epochs * steps, desc=desc, disable=not config.progress, leave=False)
    for epoch in range(1, config.epochs + 1):
        model.train()
        total = 0.0
        for _ in range(steps):
            idx = next(stream)
            x = train_x[idx].to(device).float() / 255
            if augment:
                x = geometric_augment(x, generator)
            loss = loss_fn(model(normalise(x)), targets[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                raise TrainingError(f"{desc}: the loss became {float(loss)} at epoch {epoch}; lower --lr")
            loss.backward()
            optimizer.step()
            total += loss.item()
            bar.update()
        scheduler.step()
        val_auc = score(val_y, predict(model, val_x, multilabel, normalise, device), multilabel)["macro"]["auc"]
        history.append({"epoch": epoch, "loss": total / steps, "val_auc": val_auc})
        bar.set_postfix(loss=f"{total / steps:.3f}", val_auc=f"{val_auc:.3f}")
        if np.isfinite(val_auc) and val_auc > best[0]:
            best = (val_auc, epoch, copy.deepcopy(model.state_dict()))
    bar.close()
    if best[1] == 0:  # validation AUC undefined throughout (e.g. one class only): keep the last epoch
        return TrainedClassifier(model, normalise, config.epochs, float("nan"), history)
    model.load_state_dict(best[2])
    return TrainedClassifier(model, normalise, best[1], best[0], history)
