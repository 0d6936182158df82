"""Class-faithfulness: does a generated image show the class it was asked for?

The judge is the `domain` classifier (trained on the real training split). Multi-class: top-1 accuracy against the
requested labels, overall and per requested class, beside `chance` — what a generator that ignores its label scores
on average with the same requested and predicted class frequencies. Multi-label: macro ROC-AUC over the labels that
occur both ways (chance 0.5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from geca.data.imageset import ImageSet
from geca.metrics.domain import DomainNet
from geca.metrics.features import DomainFeatures, FeatureExtractor, domain_features


def judge(extractor: FeatureExtractor, train: ImageSet, seed: int, log: Callable[[str], None],
          device: str | torch.device) -> DomainNet:
    """The domain classifier: the KID network itself where KID runs on domain features whose classes are the data's,
    else one trained (and cached) on the generators' training split."""
    if isinstance(extractor, DomainFeatures) and extractor.name == "domain":
        meta = extractor.net.meta
        if (meta.num_classes, meta.multilabel) == (train.num_classes, train.multilabel) and \
                meta.class_names in (None, train.class_names):
            return extractor.net  # a file written before class names were recorded is known by their count
        # its features still serve KID; its class head would score images against another list of classes
        log(f"{extractor.source}: its classes ({meta.class_names or meta.num_classes}"
            f"{', multi-label' if meta.multilabel else ''}) are not the data's ({train.class_names}"
            f"{', multi-label' if train.multilabel else ''}); class-faithfulness uses a judge trained on the "
            "training split")
    return domain_features(None, train, seed, log, device).net


@torch.no_grad()
def predict(net: DomainNet, images: np.ndarray, batch_size: int = 256, device: str | torch.device = "cpu"
            ) -> np.ndarray:
    """Logits (N, K) of uint8 images (N, H, W, C)."""
    net = net.to(device).eval()
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, C, H, W)
    out = [net(net.prepare(b.to(device))).float().cpu() for b in x.split(batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, net.meta.num_classes), np.float32)


def faithfulness(logits: np.ndarray, labels: np.ndarray, class_names: list[str], multilabel: bool) -> dict[str, Any]:
    """Score classifier outputs `logits` (N, K) against the requested label vectors `labels` (N, K)."""
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} predictions for {len(labels)} label vectors")
    if multilabel:
        per_class = {}
        for k, name in enumerate(class_names):
            y = labels[:, k] > 0
            if 0 < y.sum() < len(y):
                per_class[name] = float(roc_auc_score(y, logits[:, k]))
        value = float(np.mean(list(per_class.values()))) if per_class else None
        return {"metric": "macro_auc", "value": value, "chance": 0.5, "per_class": per_class, "n": len(labels)}
    asked, got = labels.argmax(1), logits.argmax(1)
    k = len(class_names)
    per_class = {class_names[c]: float((got[asked == c] == c).mean()) for c in range(k) if (asked == c).any()}
    chance = float(np.bincount(asked, minlength=k) @ np.bincount(got, minlength=k)) / max(len(asked), 1) ** 2
    return {"metric": "accuracy", "value": float((got == asked).mean()) if len(asked) else None, "chance": chance,
            "per_class": per_class, "n": len(labels)}
