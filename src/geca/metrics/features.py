"""Feature extractors behind one interface: uint8 images (N, H, W, C) → float features (N, F), batched.

- `inception`: the FID Inception-v3 (torch-fidelity's port of the TF graph, 2048-d pool features, uint8
  input resized inside the network), weights `weights-inception-2015-12-05-6726825d.pth`;
- `dinov2`: DINOv2 ViT-B/14 through timm (`vit_base_patch14_dinov2`, 768-d final-norm CLS token, images resized
  to 224 (bicubic) and ImageNet-normalised as in the FLD code), weights either Meta's
  `dinov2_vitb14_pretrain.pth` or timm's `model.safetensors` (timm converts the first on load);
- `domain`: the small classifier of `geca.metrics.domain`, trained on the real training split (128-d);
- `random`: the domain architecture with a seeded random initialisation, for tests (values mean nothing).
Grey images are repeated to three channels for the RGB networks.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from geca.data.imageset import ImageSet
from geca.errors import DataError
from geca.metrics.domain import DomainMeta, DomainNet, data_digest, load_domain_net, save_domain_net, train_domain_net
from geca.utils.images import IMAGENET_MEAN, IMAGENET_STD
from geca.utils.paths import cache_dir
from geca.utils.pretrained import check_published, load_state_dict_file, resolve_weights

FEATURES = ("domain", "inception", "dinov2", "random")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_SHA256 = "6726825d"  # the prefix its torch.hub-style name publishes
DINOV2_FILE = "dinov2_vitb14_pretrain.pth"
DINOV2_URL = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/{DINOV2_FILE}"


class FeatureExtractor(nn.Module):
    """Subclasses implement `embed` on uint8 (B, in_channels, H, W); this class adapts channels and batches."""

    def __init__(self, name: str, dim: int, in_channels: int, source: str) -> None:
        super().__init__()
        self.name, self.dim, self.in_channels, self.source = name, dim, in_channels, source

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) → float64 (B, dim)."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"{self.name} features take uint8 (B, C, H, W) images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        c = images.shape[1]
        if c == 1 and self.in_channels == 3:
            images = images.expand(-1, 3, -1, -1)
        elif c != self.in_channels:
            raise DataError(f"{self.name} features ({self.source}) take {self.in_channels}-channel images, "
                            f"got {c}-channel ones")
        return self.embed(images).double()

    def extract(self, images: np.ndarray, batch_size: int = 64, device: str | torch.device = "cpu",
                progress: bool = False) -> np.ndarray:
        """uint8 (N, H, W, C) numpy → float64 (N, dim) numpy."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 (N, H, W, C) images, got {images.dtype} {images.shape}")
        self.to(device).eval()
        out = [np.zeros((0, self.dim))]
        starts = range(0, len(images), batch_size)
        for s in tqdm(starts, desc=f"{self.name} features", disable=not progress, leave=False):
            batch = torch.from_numpy(images[s:s + batch_size]).to(device).permute(0, 3, 1, 2)
            out.append(self(batch).cpu().numpy())
        return np.concatenate(out)


class DomainFeatures(FeatureExtractor):
    def __init__(self, net: DomainNet, name: str, source: str) -> None:
        super().__init__(name, net.feature_dim, net.meta.in_channels, source)
        self.net = net.eval()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.net.prepare(images))


class InceptionFeatures(FeatureExtractor):
    def __init__(self, path: Path) -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        what = "Inception-v3 (FID)"
        digest = check_published(path, INCEPTION_SHA256, INCEPTION_FILE, what)
        super().__init__("inception", 2048, 3, f"{path} (sha256 {digest[:16]}…)")
        state = load_state_dict_file(path, what)
        # torch-fidelity reads its weights with torch.load(weights_only=False), which would run a crafted file's
        # code: it gets our own serialisation of the tensors read safely above, never the user's file.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=buffer)
        except RuntimeError as e:
            raise DataError(f"{path}: not the torch-fidelity Inception-v3 weights ({str(e).splitlines()[0]})") from None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[0]


class DinoV2Features(FeatureExtractor):
    SIZE = 224

    def __init__(self, path: Path, arch: str = "vit_base_patch14_dinov2") -> None:
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        net = timm.create_model(arch, pretrained=False, img_size=self.SIZE, num_classes=0)
        # Read here rather than by timm's pretrained loader, whose torch.load is not weights-only in every version.
        state = load_state_dict_file(path, f"DINOv2 {arch}")
        try:
            net.load_state_dict(checkpoint_filter_fn(state, net))
        except (RuntimeError, KeyError, ValueError) as e:
            raise DataError(f"{path}: not DINOv2 {arch} weights ({str(e).splitlines()[0]})") from None
        super().__init__("dinov2", net.num_features, 3, str(path))
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.SIZE, self.SIZE):
            # The reference resizes uint8 PIL images (bicubic) before ToTensor; antialiased bicubic matches PIL.
            x = F.interpolate(x, size=(self.SIZE, self.SIZE), mode="bicubic", align_corners=False, antialias=True)
            x = x.round().clamp(0, 255)
        return self.net((x / 255.0 - self.mean) / self.std)


def random_features(seed: int = 0) -> DomainFeatures:
    torch.manual_seed(seed)
    net = DomainNet(DomainMeta(in_channels=3, input_size=None, num_classes=1, data="random init", seed=seed))
    return DomainFeatures(net.eval().requires_grad_(False), "random", f"random init, seed {seed}")


def domain_features(file: str | Path | None, train: ImageSet | Callable[[], ImageSet] | None, seed: int = 0,
                    log: Callable[[str], None] = print, device: str | torch.device = "cpu") -> DomainFeatures:
    """Domain features from `file`, or trained on `train` (on `device`) and cached under the geca cache directory."""
    if file is not None:
        return DomainFeatures(load_domain_net(Path(file)), "domain", str(file))
    if train is None:
        raise DataError("domain features need --features-file FILE (from `geca features train`) or a training "
                        "split to train them on")
    data = train() if callable(train) else train
    path = cache_dir() / "features" / f"domain-{data_digest(data, seed, device)}.safetensors"
    if path.is_file():
        log(f"domain features: cached network {path}")
        return DomainFeatures(load_domain_net(path), "domain", str(path))
    log(f"domain features: training on {data.source} ({len(data)} images); caching at {path}")
    net = train_domain_net(data, seed=seed, device=device)
    save_domain_net(net, path)
    return DomainFeatures(net, "domain", str(path))


def weights_path(name: str, file: str | Path | None, flag: str = "--features-file") -> Path | None:
    """The pretrained weights file of network `name` (found, or a MissingWeightsError naming `flag`); None for the
    networks that need none (`domain` trains its own, `random`). Checked before any slow work."""
    if name not in FEATURES:
        raise ValueError(f"unknown features {name!r}; choose from {', '.join(FEATURES)}")
    if name == "inception":
        return resolve_weights(file, INCEPTION_FILE, "Inception-v3 (FID)", INCEPTION_URL, flag)
    if name == "dinov2":
        return resolve_weights(file, DINOV2_FILE, "DINOv2 ViT-B/14", DINOV2_URL, flag)
    if name == "domain" and file is not None and not Path(file).is_file():
        load_domain_net(Path(file))  # says what is wrong with it, before any slow work
    return None


def build_extractor(name: str, file: str | Path | None = None, *, seed: int = 0,
                    train: ImageSet | Callable[[], ImageSet] | None = None, log: Callable[[str], None] = print,
                    device: str | torch.device = "cpu", flag: str = "--features-file") -> FeatureExtractor:
    """The extractor called `name`; `file` names its weights (see the module docstring for each), `flag` the
    option a missing file is asked for with; `device` is where a domain network without a file is trained."""
    path = weights_path(name, file, flag)
    if name == "domain":
        return domain_features(file, train, seed, log, device)
    if name == "random":
        return random_features(seed)
    return InceptionFeatures(path) if name == "inception" else DinoV2Features(path)
