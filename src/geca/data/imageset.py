"""The in-memory labelled image set every loader returns."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from geca.errors import DataError


@dataclass
class ImageSet:
    """Images as uint8 (N, H, W, C) with C in {1, 3}; labels as float32 0/1 (N, K).

    Multi-class data is stored one-hot so that every consumer sees label vectors.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    multilabel: bool
    source: str
    ids: list[str] = field(default_factory=list)
    patient_ids: np.ndarray | None = None
    eye_ids: np.ndarray | None = None
    # the smallest side the images had before a loader resized them (None: never resized); a resize up from it makes
    # blurrier images than the source holds, which `geca evaluate` warns about
    native_size: int | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] not in (1, 3):
            raise DataError(f"{self.source}: images must be uint8 (N,H,W,1|3), got {self.images.dtype} "
                            f"{self.images.shape}")
        if self.labels.ndim != 2 or len(self.labels) != len(self.images):
            raise DataError(f"{self.source}: labels must be (N,K) with N={len(self.images)}, got {self.labels.shape}")
        if self.labels.shape[1] != len(self.class_names):
            raise DataError(f"{self.source}: {self.labels.shape[1]} label columns but "
                            f"{len(self.class_names)} class names")
        self.labels = self.labels.astype(np.float32)
        if not self.ids:
            self.ids = [str(i) for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return self.labels.shape[1]

    @property
    def channels(self) -> int:
        return self.images.shape[-1]

    @property
    def resolution(self) -> int:
        return self.images.shape[1]

    def class_indices(self) -> np.ndarray:
        """Class index per image (multi-class data only)."""
        if self.multilabel:
            raise DataError(f"{self.source}: class indices are undefined for multi-label data")
        return self.labels.argmax(1)

    def subset(self, index: np.ndarray) -> ImageSet:
        index = np.asarray(index)
        if index.dtype == np.bool_:  # a mask would otherwise index ids by True/False, i.e. as 1/0
            index = np.flatnonzero(index)
        return ImageSet(
            images=self.images[index],
            labels=self.labels[index],
            class_names=list(self.class_names),
            multilabel=self.multilabel,
            source=self.source,
            ids=[self.ids[i] for i in index],
            patient_ids=None if self.patient_ids is None else self.patient_ids[index],
            eye_ids=None if self.eye_ids is None else self.eye_ids[index],
            native_size=self.native_size,
        )

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) float images in [-1, 1] and (N, K) float labels."""
        x = torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return x.contiguous(), torch.from_numpy(self.labels)


def image_hashes(images: np.ndarray) -> np.ndarray:
    """Sorted int64 fingerprints of uint8 (N, H, W, C) images, one per image: two sets share an image exactly when
    they share its fingerprint (up to a 2⁻⁶⁴ chance), so a network can record what it was trained on in 8 bytes a
    picture."""
    prints = [hashlib.blake2b(np.ascontiguousarray(im).tobytes() + str(im.shape).encode(), digest_size=8).digest()
              for im in images]
    return np.sort(np.frombuffer(b"".join(prints), dtype=np.int64)) if prints else np.zeros(0, np.int64)
