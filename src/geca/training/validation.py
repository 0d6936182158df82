"""Training-time validation: KID of EMA, conditional, CFG samples against a held-out split; keeps the best checkpoint.

Fixes the checkpoint selection of the authors' code: EMA weights rather than raw, conditional samples with CFG
rather than unconditional, a metric computed afresh at every validation rather than an accumulator never reset, and a
selection split (`val` by default) that is never the final evaluation split (`test` is refused).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from geca.config import RunConfig
from geca.data.imageset import ImageSet
from geca.data.registry import load_split
from geca.diffusion.gaussian import GaussianDiffusion
from geca.errors import ConfigError
from geca.metrics.faithfulness import faithfulness, judge, predict
from geca.metrics.features import build_extractor
from geca.metrics.kid import kid, kid_subset_size
from geca.run import BEST, ModelSpec, checkpoint_dir, read_state, save_weights, write_state
from geca.sampling.generate import sample_images
from geca.utils.io import CsvLog, staged_dir

FIELDS = ["step", "kid", "kid_std", "subset_size", "num_samples", "faithfulness", "best", "seconds"]


class Validator:
    """Built once before training (loads the split, the features and their real-image statistics)."""

    def __init__(self, config: RunConfig, spec: ModelSpec, train_set: ImageSet, run_dir: Path, device: torch.device,
                 to_images: Callable[[torch.Tensor], np.ndarray], log: Callable[[str], None] = print) -> None:
        self.spec, self.device, self.to_images, self.log = spec, device, to_images, log
        self.v = config.validation
        self.csv = CsvLog(Path(run_dir) / "validation.csv", FIELDS)
        self.best_dir = checkpoint_dir(run_dir) / BEST
        size = spec.latent.image_size if spec.latent is not None else spec.resolution
        d = config.data
        real = load_split(d.spec, self.v.split, image_size=size, folds_file=d.folds_file, fold=d.fold,
                          cv_val=d.cv_val)
        if len(real) < 2:
            where = f" (fold {d.fold} of {d.folds_file}, cv_val {d.cv_val})" if d.folds_file else ""
            raise ConfigError(f"validation split {d.spec}:{self.v.split}{where} holds {len(real)} image(s); validating "
                              "needs at least 2 (with few patients per fold try --cv-val next-fold or fewer folds)")
        if real.class_names != spec.class_names:
            raise ConfigError(f"validation split {d.spec}:{self.v.split} has classes {real.class_names}, the run "
                              f"trains on {spec.class_names}")
        self.extractor = build_extractor(self.v.features, self.v.features_file, seed=config.train.seed,
                                         train=train_set, log=log, device=device)
        self.real_features = self.extractor.extract(real.images, self.v.batch_size, device)
        self.judge = judge(self.extractor, train_set, config.train.seed, log, device)
        # The split's own label vectors (its joint label distribution), in a fixed seeded order.
        order = np.random.default_rng(self.v.seed).permutation(len(real))
        self.labels = torch.from_numpy(real.labels[np.resize(order, self.v.num_samples)])
        self.best = math.inf

    def resume(self, step: int) -> None:
        """Forget validations after `step` (the checkpoint resumed from), and a best checkpoint newer than it."""
        self.csv.keep_until(step)
        best = read_state(self.best_dir) or None
        if best is not None and int(best["step"]) <= step:
            self.best = float(best["kid"])
        elif best is not None:
            shutil.rmtree(self.best_dir)  # it came from the discarded steps after the checkpoint

    def generate(self, model: torch.nn.Module, diffusion: GaussianDiffusion) -> np.ndarray:
        """Seeded samples, one per label vector, as `geca sample --seed <validation seed>` draws them."""
        spec = self.spec
        sampler = self.v.sampler.for_model(model.has_cell_state, spec.latent is not None,
                                           ghg_default=model.ghg_default)
        return sample_images(model, diffusion, self.labels, spec.shape, sampler, self.v.seed, self.v.batch_size,
                             self.device, self.to_images)

    def __call__(self, step: int, model: torch.nn.Module, ema_model: torch.nn.Module,
                 diffusion: GaussianDiffusion) -> dict[str, float]:
        """Validate the EMA model at `step`; append to validation.csv; replace checkpoints/best if KID improved.
        Returns the numbers (KID, its std, class-faithfulness where defined)."""
        t0 = time.time()
        images = self.generate(ema_model, diffusion)
        fake = self.extractor.extract(images, self.v.batch_size, self.device)
        faithful = faithfulness(predict(self.judge, images, self.v.batch_size, self.device), self.labels.numpy(),
                                self.spec.class_names, self.spec.multilabel)["value"]
        n = kid_subset_size("standard", len(self.real_features), len(fake))
        # A pure function of the features: every validation starts from a fresh (reset) metric.
        res = kid(self.real_features, fake, n, seed=self.v.seed)
        improved = res.mean < self.best
        if improved:
            self.best = res.mean
            self._save_best(step, model, ema_model, res.mean)
        row = {"step": step, "kid": f"{res.mean:.6g}", "kid_std": f"{res.std:.6g}", "subset_size": n,
               "num_samples": len(fake), "faithfulness": "" if faithful is None else f"{faithful:.4g}",
               "best": int(improved), "seconds": f"{time.time() - t0:.1f}"}
        self.csv.append(row)
        self.log(f"validation at step {step}: KID×10³ {res.mean * 1e3:.2f} ± {res.std * 1e3:.2f}, class-faithfulness "
                 f"{'—' if faithful is None else f'{faithful:.3f}'}"
                 + (" (best so far)" if improved else f" (best {self.best * 1e3:.2f})"))
        return {"kid": res.mean, "kid_std": res.std, **({} if faithful is None else {"faithfulness": faithful})}

    def _save_best(self, step: int, model: torch.nn.Module, ema_model: torch.nn.Module, value: float) -> None:
        """checkpoints/best/ holds the weights (no optimizer state) of the lowest-KID step, written whole."""
        with staged_dir(self.best_dir) as tmp:
            save_weights(tmp, model, ema_model)
            write_state(tmp, {"step": step, "kid": value, "split": self.v.split, "features": self.extractor.name})
