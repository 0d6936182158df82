"""Shared fixtures: offline, two threads, tiny models and data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests see no weights the machine happens to have in torch's hub cache.
os.environ["TORCH_HOME"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), "geca-tests-no-torch-home")
# Built kernels and cached features go to a folder of the tests' own, not the user's ~/.cache/geca.
os.environ.setdefault("GECA_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "geca-tests-cache"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton's CPU interpreter runs the `triton` attention kernels; it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from geca.data.imageset import ImageSet  # noqa: E402
from geca.models.config import GeCAConfig  # noqa: E402

torch.set_num_threads(2)

RETINAMNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "retinamnist.npz"


@pytest.fixture
def retinamnist_path() -> Path:
    if not RETINAMNIST.exists():
        pytest.skip(f"RetinaMNIST not found at {RETINAMNIST} (the shared data folder is absent)")
    return RETINAMNIST


def tiny_model_config(**overrides: object) -> GeCAConfig:
    """A GeCA small enough for a test step to take milliseconds."""
    base = dict(name="tiny", hidden_size=32, heads=2, mlp_hidden=64, hidden_channels=8, nca_steps=3,
                pos_channels=8)
    base.update(overrides)
    return GeCAConfig(**base)


class FakeClock:
    """Stands in for a module's `time` (monkeypatched): `time()` moves only when a test moves `now`."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def blob_images(n: int = 8, size: int = 8, channels: int = 3, classes: int = 2, seed: int = 0) -> ImageSet:
    """A tiny, learnable class-conditional set: a bright square whose position depends on the class."""
    rng = np.random.default_rng(seed)
    images = np.full((n, size, size, channels), 30, np.uint8)
    cls = np.arange(n) % classes
    for i, c in enumerate(cls):
        off = 1 + c * (size // 2 - 1)
        images[i, off:off + size // 3, 1:1 + size // 3] = 220
        images[i] += rng.integers(0, 10, images[i].shape, dtype=np.uint8)
    return ImageSet(images=images, labels=np.eye(classes, dtype=np.float32)[cls],
                    class_names=[f"c{k}" for k in range(classes)], multilabel=False, source="blobs")


@pytest.fixture
def blobs() -> ImageSet:
    return blob_images()


@pytest.fixture
def blobs_npz(tmp_path: Path) -> Path:
    """The blob set as a MedMNIST-format npz (so CLI tests go through the real loader)."""
    parts = {}
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        s = blob_images(n=8, seed=seed)
        parts[f"{split}_images"] = s.images
        parts[f"{split}_labels"] = s.labels.argmax(1)[:, None].astype(np.uint8)
    path = tmp_path / "blobs.npz"
    np.savez(path, **parts)
    return path
