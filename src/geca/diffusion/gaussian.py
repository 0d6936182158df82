"""Gaussian diffusion with ε-prediction and learned variance (IDDPM / DiT).

Written here rather than taken from diffusers because diffusers has no loss for learned variances (the IDDPM
variational-bound term) and training and sampling must share one posterior; a test checks the forward process and
posterior against diffusers' DDPMScheduler.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch

from geca.diffusion.config import DiffusionConfig


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def spaced_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` of the T timesteps, spaced as DiT's `space_timesteps(T, [steps])` spaces them: the stride
    (T − 1)/(steps − 1) is accumulated in floating point and rounded at each step. One step is the last timestep
    (DiT's rule would give t = 0, a denoiser told that pure noise is clean)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"sampling steps must be in [1, {timesteps}], got {steps}")
    if steps == 1:
        return [timesteps - 1]
    stride = (timesteps - 1) / (steps - 1)
    taken, position = [], 0.0
    for _ in range(steps):
        taken.append(round(position))
        position += stride
    return sorted(set(taken))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (Ho et al.)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


class GaussianDiffusion:
    """A (possibly respaced) diffusion; `timestep_map[i]` is the original t the model sees at index i."""

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True, timestep_map: list[int] | None = None) -> None:
        self.betas = np.asarray(betas, dtype=np.float64)
        self.learn_sigma = learn_sigma
        self.num_timesteps = len(self.betas)
        self.timestep_map = list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; clip the log to the next value (as IDDPM).
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]) if self.num_timesteps > 1
            else self.betas)
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    @functools.cached_property
    def log_betas(self) -> np.ndarray:
        return np.log(self.betas)

    @functools.cached_property
    def fixed_log_variance(self) -> np.ndarray:
        """log of the fixed ("large") variance of a model that does not learn it: β_t, β̃_1 at t=0 (β_0 where a
        one-step process has no β̃_1; no noise is added at t=0 anyway)."""
        return np.log(np.append(self.posterior_variance[1], self.betas[1:]) if self.num_timesteps > 1
                      else self.betas)

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """Schedule array `name` on `device`, copied there once: a copy per use stalls a GPU a dozen times a step."""
        key = (name, device)
        if key not in self._tables:
            self._tables[key] = torch.as_tensor(np.asarray(getattr(self, name))).to(device)
        return self._tables[key]

    def at(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Schedule array `name` at timesteps t in float32, shaped (B, 1, …) to broadcast over `ndim` dimensions."""
        return self._table(name, t.device)[t].float().view(-1, *([1] * (ndim - 1)))

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> GaussianDiffusion:
        return cls(linear_betas(config.timesteps, config.beta_start, config.beta_end), config.learn_sigma)

    def respaced(self, steps: int) -> GaussianDiffusion:
        """The same process on `steps` evenly spaced timesteps (betas recomputed from ᾱ)."""
        use = spaced_timesteps(self.num_timesteps, steps)
        last = 1.0
        betas, tmap = [], []
        for i, ac in enumerate(self.alphas_cumprod):
            if i in use:
                betas.append(1.0 - ac / last)
                last = ac
                tmap.append(self.timestep_map[i])
        return GaussianDiffusion(np.array(betas), self.learn_sigma, tmap)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return self._table("timestep_map", t.device)[t]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (self.at("sqrt_alphas_cumprod", t, x0.ndim) * x0
                + self.at("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise)

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self.at("posterior_mean_coef1", t, xt.ndim) * x0
                + self.at("posterior_mean_coef2", t, xt.ndim) * xt)
        return mean, self.at("posterior_log_variance_clipped", t, xt.ndim)

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (self.at("sqrt_recip_alphas_cumprod", t, xt.ndim) * xt
                - self.at("sqrt_recipm1_alphas_cumprod", t, xt.ndim) * eps)

    def predict_eps(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return ((self.at("sqrt_recip_alphas_cumprod", t, xt.ndim) * xt - x0)
                / self.at("sqrt_recipm1_alphas_cumprod", t, xt.ndim))

    def split_output(self, output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ε, variance values or None) of a model output for `channels`-channel images."""
        if output.shape[1] != channels * (2 if self.learn_sigma else 1):
            raise ValueError(f"the model outputs {output.shape[1]} channels for {channels}-channel images, but the "
                             f"diffusion (learn_sigma {self.learn_sigma}) expects {channels * (1 + self.learn_sigma)}: "
                             "model.learn_sigma and diffusion.learn_sigma must agree")
        if not self.learn_sigma:
            return output, None
        return output.chunk(2, dim=1)

    def p_mean_variance(self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                        clip_x0: bool = False) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a model output; the learned variance interpolates log β_t and log β̃_t."""
        eps, var_values = self.split_output(output.float(), xt.shape[1])
        if var_values is None:
            log_var = self.at("fixed_log_variance", t, xt.ndim)
        else:
            min_log = self.at("posterior_log_variance_clipped", t, xt.ndim)
            max_log = self.at("log_betas", t, xt.ndim)
            frac = (var_values + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        raw = self.predict_x0(xt, t, eps)
        x0 = raw.clamp(-1, 1) if clip_x0 else raw
        mean, _ = self.q_posterior(x0, xt, t)
        return {"mean": mean, "log_variance": log_var, "pred_x0": x0, "eps": eps, "pred_x0_raw": raw}

    def training_losses(self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                        t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """ε-MSE plus (with learned σ) the variational-bound term on the variance channels, mean detached."""
        xt = self.q_sample(x0, t, noise)
        output = model_fn(xt, self.model_timesteps(t)).float()
        eps, var_values = self.split_output(output, x0.shape[1])
        mse = ((noise - eps) ** 2).mean(dim=tuple(range(1, x0.ndim)))
        terms = {"mse": mse}
        if var_values is not None:
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            terms["vb"] = self.vb_terms(frozen, x0, xt, t)
            terms["loss"] = mse + terms["vb"]
        else:
            terms["loss"] = mse
        return terms

    def vb_terms(self, output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dimension; the decoder NLL at t=0."""
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        p = self.p_mean_variance(output, xt, t)
        dims = tuple(range(1, x0.ndim))
        kl = normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]).mean(dim=dims) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]).mean(dim=dims)
        return torch.where(t == 0, nll / math.log(2.0), kl)
