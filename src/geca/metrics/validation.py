"""Training-time validation: KID of EMA, conditional, CFG samples against a held-out split; keeps the best checkpoint.

Fixes the published selection (method.md §5): EMA weights rather than raw, conditional samples with CFG rather
than unconditional, a metric computed afresh at every validation rather than an accumulator never reset, and a
selection split (`val` by default) that is never the final evaluation split (`test` is refused).
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from geca.config import ConfigError, RunConfig
from geca.data import load_split
from geca.data.imageset import ImageSet
from geca.diffusion.gaussian import GaussianDiffusion
from geca.metrics.features import build_extractor
from geca.metrics.kid import kid, kid_subset_size
from geca.sampling.samplers import sample
from geca.training.checkpoint import ModelSpec, checkpoint_dir
from geca.training.trainer import step_seed
from geca.utils.io import atomic_write_text, replace_dir, staging_dir

FIELDS = ["step", "kid", "kid_std", "subset_size", "num_samples", "best", "seconds"]
BEST = "best"


def check_validation(cfg: RunConfig) -> None:
    v = cfg.validation
    if v.every < 0 or v.num_samples < 2 or v.batch_size < 1:
        raise ConfigError(f"validation: every must be ≥ 0, num_samples ≥ 2 and batch_size ≥ 1, got {v.every}, "
                          f"{v.num_samples}, {v.batch_size}")
    if v.split == "test":
        raise ConfigError("validation.split must not be 'test': selecting checkpoints on the split you report "
                          "would bias the final evaluation; use 'val'")
    v.sampler.validate()


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(path))) if path.exists() else []


class Validator:
    """Built once before training (loads the split, the features and their real-image statistics)."""

    def __init__(self, cfg: RunConfig, spec: ModelSpec, train_set: ImageSet, run_dir: Path, device: torch.device,
                 to_images: Callable[[torch.Tensor], np.ndarray], log: Callable[[str], None] = print) -> None:
        check_validation(cfg)
        self.cfg, self.spec, self.device, self.to_images, self.log = cfg, spec, device, to_images, log
        self.v = cfg.validation
        self.csv = Path(run_dir) / "validation.csv"
        self.best_dir = checkpoint_dir(run_dir) / BEST
        size = spec.latent.image_size if spec.latent is not None else spec.resolution
        d = cfg.data
        real = load_split(d.spec, self.v.split, image_size=size, folds_file=d.folds_file, fold=d.fold)
        if real.class_names != spec.class_names:
            raise ConfigError(f"validation split {d.spec}:{self.v.split} has classes {real.class_names}, the run "
                              f"trains on {spec.class_names}")
        self.extractor = build_extractor(self.v.features, self.v.features_file, seed=cfg.train.seed,
                                         train=train_set, log=log, device=device)
        self.real_features = self.extractor.extract(real.images, self.v.batch_size, device)
        # The split's own label vectors (its joint label distribution), in a fixed seeded order.
        order = np.random.default_rng(self.v.seed).permutation(len(real))
        self.labels = torch.from_numpy(real.labels[np.resize(order, self.v.num_samples)])
        self.best = math.inf

    def resume(self, step: int) -> None:
        """Forget validations after `step` (the checkpoint resumed from), and a best checkpoint newer than it."""
        kept = [r for r in _rows(self.csv) if int(r["step"]) <= step]
        if self.csv.exists():
            buf = io.StringIO()
            writer = csv.DictWriter(buf, FIELDS)
            writer.writeheader()
            writer.writerows(kept)
            atomic_write_text(self.csv, buf.getvalue())
        state = self.best_dir / "state.json"
        best = json.loads(state.read_text()) if state.exists() else None
        if best is not None and int(best["step"]) <= step:
            self.best = float(best["kid"])
        elif best is not None:
            shutil.rmtree(self.best_dir)  # it came from the discarded steps after the checkpoint

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, diffusion: GaussianDiffusion) -> np.ndarray:
        """Seeded samples, one per label vector; batch b uses seed (seed, b) like `geca sample`."""
        spec, sampler = self.spec, self.spec.sampling(self.v.sampler)
        shape = (spec.in_channels, spec.resolution, spec.resolution)
        rng = torch.get_rng_state()
        out = []
        for b, y in enumerate(self.labels.split(self.v.batch_size)):
            torch.manual_seed(step_seed(self.v.seed, b, 0))
            out.append(self.to_images(sample(model, diffusion, y.to(self.device), shape, sampler)))
        torch.set_rng_state(rng)
        return np.concatenate(out)

    def __call__(self, step: int, model: torch.nn.Module, ema_model: torch.nn.Module,
                 diffusion: GaussianDiffusion) -> float:
        """Validate the EMA model at `step`; append to validation.csv; replace checkpoints/best if KID improved."""
        t0 = time.time()
        fake = self.extractor.extract(self.generate(ema_model, diffusion), self.v.batch_size, self.device)
        n = kid_subset_size("standard", len(self.real_features), len(fake))
        # A pure function of the features: every validation starts from a fresh (reset) metric.
        res = kid(self.real_features, fake, n, seed=self.v.seed)
        improved = res.mean < self.best
        if improved:
            self.best = res.mean
            self._save_best(step, model, ema_model, res.mean)
        row = {"step": step, "kid": f"{res.mean:.6g}", "kid_std": f"{res.std:.6g}", "subset_size": n,
               "num_samples": len(fake), "best": int(improved), "seconds": f"{time.time() - t0:.1f}"}
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        self.log(f"validation at step {step}: KID×10³ {res.mean * 1e3:.2f} ± {res.std * 1e3:.2f}"
                 + (" (best so far)" if improved else f" (best {self.best * 1e3:.2f})"))
        return res.mean

    def _save_best(self, step: int, model: torch.nn.Module, ema_model: torch.nn.Module, value: float) -> None:
        """checkpoints/best/ holds the weights (no optimizer state) of the lowest-KID step, written whole."""
        tmp = staging_dir(self.best_dir)
        try:
            for name, m in (("model", model), ("ema", ema_model)):
                save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp / f"{name}.safetensors")
            (tmp / "state.json").write_text(json.dumps({"step": step, "kid": value, "split": self.v.split,
                                                        "features": self.extractor.name}, indent=2))
            replace_dir(tmp, self.best_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
