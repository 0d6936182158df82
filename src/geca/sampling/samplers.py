"""Ancestral DDPM, DDIM and DPM-Solver++(2M) (ODE and SDE) sampling with classifier-free guidance and Gene Heredity
Guidance."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from geca.diffusion.gaussian import GaussianDiffusion
from geca.errors import ConfigError
from geca.models.base import CellState, Denoiser, DenoiserOutput
from geca.sampling.config import SamplerConfig
from geca.utils.hardware import resolve_precision


def inherit(state: CellState | None, mode: str) -> CellState | None:
    """What step t takes from step t+1 (paper §2.3); None means a fresh training seed."""
    if state is None or mode == "none":
        return None
    return CellState(out=state.out if mode in ("out", "both") else None,
                     hidden=state.hidden if mode in ("hidden", "both") else None)


def guided_output(model: Denoiser, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float,
                  carry: CellState | None = None, nca_steps: int | None = None, double: bool | None = None,
                  dtype: torch.dtype | None = None) -> DenoiserOutput:
    """Classifier-free guidance on ε only: uncond + s·(cond − uncond); variance channels from the conditional half.

    With `double` (default: scale ≠ 1) the conditional and null-label passes run as one doubled batch, and the
    returned state covers both halves so that heredity keeps each half's own lineage. With `dtype` the model runs
    under autocast to it; its output, its cell state and the guidance are float32.
    """
    kwargs = {"nca_steps": nca_steps} if model.has_cell_state else {}
    if double is None:
        double = scale != 1.0
    b = x.shape[0]
    if double:
        null = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
        x, t, y, kwargs = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), {**kwargs, "null": null}
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        res = model(x, t, y, carry=carry, **kwargs)
    output, state = res.output.float(), res.state
    if state is not None and dtype is not None:  # what a trace or a fp32 call downstream reads
        state = CellState(*(None if s is None else s.float() for s in (state.out, state.hidden)))
    if not double:
        return DenoiserOutput(output=output, state=state)
    cond, uncond = output.chunk(2)
    c = model.in_channels
    eps = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
    return DenoiserOutput(output=torch.cat([eps, cond[:, c:]], dim=1), state=state)


StepCallback = Callable[[int, torch.Tensor, dict[str, torch.Tensor], CellState | None], None]


@torch.no_grad()
def sample(model: Denoiser, diffusion: GaussianDiffusion, labels: torch.Tensor, shape: tuple[int, int, int],
           sampler: SamplerConfig, noise: torch.Tensor | None = None, callback: StepCallback | None = None,
           progress: bool = False) -> torch.Tensor:
    """Generate one image per label vector; returns x_0 of shape (B, *shape).

    `callback(t, x_t, p, state)` sees every reverse step, t the model timestep (0…T−1) for every sampler (p holds
    pred_x0, eps, mean, log_variance).
    """
    if sampler.clip_x0 is None:
        # only the caller knows whether the model works on latents, which have no [-1, 1] range to clip to
        raise ValueError("sampler.clip_x0 is unset: set it, or resolve the settings with "
                         "SamplerConfig.for_model(cellular, latent) (latents are not clipped)")
    if sampler.ghg is None or sampler.schedule is None:  # neither depends on pixels or latents
        sampler = sampler.for_model(model.has_cell_state, latent=False, ghg_default=model.ghg_default)
    sampler.validate()
    device = labels.device
    dtype = autocast_dtype(sampler.precision, device)
    b = labels.shape[0]
    x = torch.randn(b, *shape, device=device) if noise is None else noise.to(device)
    stepper = _stepper(diffusion, sampler, device)
    process, state = stepper.process, None
    for i in tqdm(stepper.indices, desc="sampling", disable=not progress, leave=False):
        t = torch.full((b,), i, device=device, dtype=torch.long)  # an index into `process`
        carry = inherit(state, sampler.ghg) if model.has_cell_state else None
        res = guided_output(model, x, process.model_timesteps(t), labels, sampler.guidance_scale, carry,
                            sampler.nca_steps, dtype=dtype)
        state = res.state
        p = process.p_mean_variance(res.output, x, t, clip_x0=sampler.clip_x0)
        if callback is not None:
            callback(process.timestep_map[i], x, p, state)
        x = stepper.step(x, i, t, p)
    return x


def resolved_precision(precision: str, device: torch.device | str, name: str = "--precision") -> str:
    """A sampler's `precision` as it runs on `device` (`auto`: bf16 where native, else fp32); one it cannot run is
    a ConfigError naming the flag or config key `name`."""
    try:
        return resolve_precision(precision, cuda=torch.device(device).type == "cuda")
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The denoiser calls' autocast dtype for a sampler's `precision` on `device`; None for float32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved_precision(precision, device))


class _DDPM:
    """Ancestral sampling on the process respaced to `steps`: x_{t-1} ~ p(x_{t-1} | x_t)."""

    def __init__(self, diffusion: GaussianDiffusion, sampler: SamplerConfig) -> None:
        self.process = diffusion.respaced(sampler.steps)
        self.indices = list(range(self.process.num_timesteps - 1, -1, -1))

    def step(self, x: torch.Tensor, i: int, t: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        nonzero = (t > 0).float().view(-1, *([1] * (x.ndim - 1)))
        return p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * torch.randn_like(x)


class _DDIM(_DDPM):
    """DDIM with η on the respaced process; η = 0 is deterministic."""

    def __init__(self, diffusion: GaussianDiffusion, sampler: SamplerConfig) -> None:
        super().__init__(diffusion, sampler)
        self.eta = sampler.eta

    def step(self, x: torch.Tensor, i: int, t: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        d = self.process
        eps = d.predict_eps(x, t, p["pred_x0"])  # ε re-derived from the (possibly clipped) x0, as IDDPM's DDIM does
        ac, ac_prev = d.at("alphas_cumprod", t, x.ndim), d.at("alphas_cumprod_prev", t, x.ndim)
        sigma = self.eta * torch.sqrt((1 - ac_prev) / (1 - ac)) * torch.sqrt(1 - ac / ac_prev)
        mean = p["pred_x0"] * torch.sqrt(ac_prev) + torch.sqrt(1 - ac_prev - sigma**2) * eps
        nonzero = (t > 0).float().view(-1, *([1] * (x.ndim - 1)))
        return mean + nonzero * sigma * torch.randn_like(x)


class _DPMSolver:
    """DPM-Solver++(2M) through diffusers' scheduler on the full process; the loop stays ours (`sample`), so that
    each call inherits the previous call's cell state (GHG) and CFG and x̂0 clipping act as in DDPM/DDIM. `dpm++sde`
    is its SDE form, which adds fresh noise each step as DDPM does."""

    def __init__(self, diffusion: GaussianDiffusion, sampler: SamplerConfig, device: torch.device) -> None:
        from diffusers import DPMSolverMultistepScheduler

        if diffusion.timestep_map != list(range(diffusion.num_timesteps)):
            raise ValueError("dpm++ needs the full (unrespaced) diffusion process")
        self.process, self.sde = diffusion, sampler.sampler == "dpm++sde"
        # DPM-Solver++ steps on x̂0 alone, so it takes ours ("sample"): clipped or not, exactly what the other
        # samplers use. Given ε it would re-derive x̂0 at its own σ, which for λ or Karras steps is not the σ of the
        # integer t the model was called at.
        self.scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.betas.tolist(),
            algorithm_type="sde-dpmsolver++" if self.sde else "dpmsolver++", solver_order=2,
            prediction_type="sample", lower_order_final=True, use_lu_lambdas=sampler.schedule == "lambda",
            use_karras_sigmas=sampler.schedule == "karras")
        self.scheduler.set_timesteps(sampler.steps, device=device)
        self.indices = [int(step_t) for step_t in self.scheduler.timesteps]
        repeated = sampler.steps - len(set(self.indices))
        if repeated:  # diffusers rounds λ- or Karras-spaced steps to integer t: dense steps at low noise share one
            warnings.warn(f"--steps {sampler.steps} on the {sampler.schedule} schedule: {repeated} of the steps "
                          "repeat an integer timestep, where the model is told another noise level than its input "
                          "has; DPM-Solver++ needs 10-25 steps (for more, --schedule uniform)", stacklevel=4)

    def step(self, x: torch.Tensor, i: int, t: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        # The SDE's noise from torch's global generator, so that `--seed` fixes it as it fixes DDPM's.
        noise = torch.randn_like(x) if self.sde else None
        return self.scheduler.step(p["pred_x0"], i, x, variance_noise=noise).prev_sample


def _stepper(diffusion: GaussianDiffusion, sampler: SamplerConfig, device: torch.device
             ) -> _DDPM | _DDIM | _DPMSolver:
    """The sampler as a small object: the process it steps on (whose `p_mean_variance` reads the model's output),
    the indices into that process it visits, and its update x_t → x_{t-1}."""
    if sampler.sampler.startswith("dpm++"):
        return _DPMSolver(diffusion, sampler, device)
    return _DDIM(diffusion, sampler) if sampler.sampler == "ddim" else _DDPM(diffusion, sampler)
