"""Feature Likelihood Divergence and the generalization gap (Jiralerspong et al., NeurIPS 2023).

Written here because FLD is not on PyPI. It follows the authors' code (github.com/marcojira/fld, `fld/MoG.py`,
`fld/metrics/FLD.py`) choice for choice:

- features are normalised by the test set's per-dimension mean and (unbiased) std;
- a mixture of isotropic Gaussians with equal weights sits on the generated features (at most 10,000, a seeded
  random subset beyond that); each component's log-variance starts at log((d²_min + 1e-3) / dim), with d²_min
  its squared distance to the nearest training feature (the single-point maximum-likelihood variance);
- the log-variances are fitted by Adam (lr 0.5, at most 50 epochs, batches of 10,000 training features, clamped
  to [−40, 40]) to maximise the likelihood of the training features, stopping once an epoch's mean loss is within
  5e-4 of each of the four before it (after epoch 6); during the fit only, an extra "origin"
  component centred on the training mean, at 0.9× the distance and with weight 1 (not 1/n), with its own fitted
  log-variance, guarantees each training point some likelihood so that no gradient vanishes; scoring uses the
  generated components alone;
- NLLs are divided by the feature dimension;
- GG = 100 × (mean NLL(train) − mean NLL(test)) under the fitted mixture: positive is good, strongly negative
  means the generated samples sit on top of training images (memorisation);
- FLD = 100 × (mean NLL(test) − baseline NLL). The baseline NLL is what a perfect "generator" that returns
  fresh real images scores: the mean test NLL under a mixture centred on a seeded random part of the training
  set (min(n_generated, n_train // 2) images) and fitted to the rest of it. FLD ≈ 0 means as good as real data
  of that size; lower is better.

Distances are computed in float64 (the reference uses float32 `cdist`), which only matters for near-copies; the
fit iterates in float32 like the reference, and scoring is in float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

MAX_GENERATED = 10_000
LR = 0.5
EPOCHS = 50
BATCH = 10_000
ORIGIN_SHRINK = 0.9
LOG_VAR_RANGE = (-40.0, 40.0)
# The reference stops once an epoch's mean loss moves less than this from each of the previous four.
STOP_CHANGE = 5e-4
STOP_AFTER = 5


@dataclass
class FLDResult:
    fld: float
    gg: float
    nll_train: float
    nll_test: float
    nll_baseline: float
    components: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sq_dists(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, centres).square_()


def _component_lls(sq_dists: torch.Tensor, log_var: torch.Tensor, dim: int, log_weight: float = 0.0
                   ) -> torch.Tensor:
    """log(w·N(x_i | μ_j, σ_j² I)) for every pair, from squared distances and log σ_j²."""
    bias = log_weight - 0.5 * dim * (log_var + math.log(2 * math.pi))
    # One fused pass over the (N, M) matrix: this is the whole cost of the fit.
    return torch.addcmul(bias, sq_dists, torch.exp(-log_var), value=-0.5)


class IsotropicMixture:
    """Equal-weight isotropic Gaussians on fixed centres; only the per-component log-variances are fitted."""

    def __init__(self, centres: torch.Tensor) -> None:
        self.centres = centres
        self.dim = centres.shape[1]
        self.log_var = torch.zeros(len(centres), dtype=centres.dtype)

    def fit(self, x: torch.Tensor, generator: torch.Generator, epochs: int = EPOCHS, lr: float = LR,
            batch: int = BATCH) -> list[float]:
        """Maximise the mean log-likelihood of `x`; returns each epoch's mean loss (NLL / dim)."""
        x = x[torch.randperm(len(x), generator=generator)]
        # Distances in float64 (exact for near-copies); the 50 epochs over them in float32, as the reference.
        sq = _sq_dists(x, self.centres).float()
        log_var = ((sq.min(0).values + 1e-3) / self.dim).log().requires_grad_(True)
        origin_log_var = torch.zeros((), requires_grad=True)
        origin_sq = (ORIGIN_SHRINK**2 * _sq_dists(x, x.mean(0, keepdim=True))).float()
        opt = torch.optim.Adam([log_var, origin_log_var], lr=lr)
        losses: list[float] = []
        for epoch in range(epochs):
            batch_losses = []
            for start in range(0, len(x), batch):
                opt.zero_grad()
                lls = _component_lls(sq[start:start + batch], log_var, self.dim, -math.log(len(self.centres)))
                origin = _component_lls(origin_sq[start:start + batch], origin_log_var, self.dim)[:, 0]
                loss = -torch.logaddexp(torch.logsumexp(lls, 1), origin).mean() / self.dim
                loss.backward()
                opt.step()
                with torch.no_grad():
                    log_var.clamp_(*LOG_VAR_RANGE)
                batch_losses.append(loss.item())
            losses.append(sum(batch_losses) / len(batch_losses))
            if epoch > STOP_AFTER and max(abs(losses[-1] - prev) for prev in losses[-STOP_AFTER:-1]) < STOP_CHANGE:
                break
        self.log_var = log_var.detach().to(self.centres.dtype)
        return losses

    def nll(self, x: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
        """Per-sample NLL divided by the dimension."""
        out = []
        for chunk in x.split(batch):
            lls = _component_lls(_sq_dists(chunk, self.centres), self.log_var, self.dim, -math.log(len(self.centres)))
            out.append(-torch.logsumexp(lls, 1) / self.dim)
        return torch.cat(out)


def _as_features(a: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    if t.ndim != 2 or len(t) < 2:
        raise ValueError(f"FLD: {what} features must be (N ≥ 2, F), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"FLD: {what} features contain NaN or inf")
    return t


def fld(train: np.ndarray | torch.Tensor, test: np.ndarray | torch.Tensor, generated: np.ndarray | torch.Tensor,
        seed: int = 0) -> FLDResult:
    """FLD, the generalization gap GG and the NLLs behind them (see the module docstring)."""
    tr, te, ge = _as_features(train, "train"), _as_features(test, "test"), _as_features(generated, "generated")
    if not tr.shape[1] == te.shape[1] == ge.shape[1]:
        raise ValueError(f"FLD: feature widths differ: train {tr.shape[1]}, test {te.shape[1]}, "
                         f"generated {ge.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    mean, std = te.mean(0), te.std(0)
    # A dimension that is constant on the test set would divide by zero (the reference gives NaN); leave it unscaled.
    std = torch.where(std > 0, std, torch.ones_like(std))
    tr, te, ge = (tr - mean) / std, (te - mean) / std, (ge - mean) / std
    if len(ge) > MAX_GENERATED:
        ge = ge[torch.randperm(len(ge), generator=g)[:MAX_GENERATED]]

    mog = IsotropicMixture(ge)
    mog.fit(tr, g)
    nll_train, nll_test = mog.nll(tr).mean().item(), mog.nll(te).mean().item()

    shuffled = tr[torch.randperm(len(tr), generator=g)]
    split = min(len(ge), len(tr) // 2)
    base = IsotropicMixture(shuffled[:split])
    base.fit(shuffled[split:], g)
    nll_baseline = base.nll(te).mean().item()
    return FLDResult(fld=100 * (nll_test - nll_baseline), gg=100 * (nll_train - nll_test), nll_train=nll_train,
                     nll_test=nll_test, nll_baseline=nll_baseline, components=len(ge))
