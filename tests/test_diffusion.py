"""The diffusion process against diffusers' DDPMScheduler, respacing, and the learned-variance loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from geca.diffusion.config import DiffusionConfig
from geca.diffusion.gaussian import GaussianDiffusion, spaced_timesteps


@pytest.fixture
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion.from_config(DiffusionConfig())


def _scheduler(**kw) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         clip_sample=False, **kw)


def test_forward_process_matches_diffusers(diffusion: GaussianDiffusion) -> None:
    torch.manual_seed(0)
    x0, noise = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    ours = diffusion.q_sample(x0, t, noise)
    theirs = _scheduler().add_noise(x0, noise, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [None, 250, 17])
def test_posterior_matches_diffusers(diffusion: GaussianDiffusion, steps: int | None) -> None:
    """Posterior mean (x0 given) and learned-range variance, on the full and on respaced schedules."""
    d = diffusion if steps is None else diffusion.respaced(steps)
    sched = _scheduler(prediction_type="sample", variance_type="learned_range")
    if steps is not None:
        sched.set_timesteps(timesteps=list(reversed(d.timestep_map)))
    torch.manual_seed(1)
    x0, xt = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    v = torch.rand(1, 3, 4, 4) * 2 - 1
    for i in range(1, d.num_timesteps, max(1, d.num_timesteps // 9)):
        t_orig = d.timestep_map[i]
        out = sched.step(torch.cat([x0, v], 1), t_orig, xt,
                         generator=torch.Generator().manual_seed(0))
        # prev = mean + std · z with z drawn from the same generator.
        z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([i])
        mean, _ = d.q_posterior(x0, xt, t)
        p = d.p_mean_variance(torch.cat([d.predict_eps(xt, t, x0), v], 1), xt, t)
        torch.testing.assert_close(p["mean"], mean, rtol=1e-4, atol=1e-5)
        log_var_theirs = sched._get_variance(t_orig, predicted_variance=v)
        torch.testing.assert_close(p["log_variance"], log_var_theirs.float(), rtol=1e-4, atol=1e-5)
        # diffusers keeps ᾱ in float32, so allow float32 rounding of the coefficients.
        torch.testing.assert_close(out.prev_sample, mean + torch.exp(0.5 * p["log_variance"]) * z,
                                   rtol=1e-3, atol=5e-4)


def test_spaced_timesteps_cover_the_range() -> None:
    for steps in (1, 2, 25, 50, 250, 1000):
        ts = spaced_timesteps(1000, steps)
        assert len(ts) == steps and ts[-1] == 999 and (steps == 1 or ts[0] == 0)
    with pytest.raises(ValueError):
        spaced_timesteps(1000, 0)


def test_respacing_keeps_the_marginals(diffusion: GaussianDiffusion) -> None:
    d = diffusion.respaced(50)
    np.testing.assert_allclose(d.alphas_cumprod, diffusion.alphas_cumprod[d.timestep_map], rtol=1e-12)


def test_loss_is_zero_for_an_oracle_and_positive_otherwise(diffusion: GaussianDiffusion) -> None:
    torch.manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 100, 500, 900])

    def oracle(xt: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        # ε exact; variance value -1 selects the true posterior variance → KL 0.
        return torch.cat([noise, -torch.ones_like(noise)], 1)

    terms = diffusion.training_losses(oracle, x0, t, noise)
    assert terms["mse"].abs().max() < 1e-10
    assert terms["vb"].abs().max() < 1e-4
    wrong = diffusion.training_losses(lambda xt, tt: torch.zeros(4, 6, 8, 8), x0, t, noise)
    assert torch.all(wrong["mse"] > 0.5) and torch.all(wrong["vb"] > 0)


def test_variance_term_does_not_train_the_mean(diffusion: GaussianDiffusion) -> None:
    torch.manual_seed(0)
    x0, noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    out = torch.randn(2, 6, 4, 4, requires_grad=True)
    terms = diffusion.training_losses(lambda xt, tt: out, x0, torch.tensor([5, 600]), noise)
    terms["vb"].sum().backward()
    assert out.grad[:, :3].abs().max() == 0 and out.grad[:, 3:].abs().max() > 0


def test_decoder_nll_at_t0_is_used(diffusion: GaussianDiffusion) -> None:
    x0 = torch.zeros(1, 1, 2, 2)
    noise = torch.zeros_like(x0)
    terms = diffusion.training_losses(lambda xt, tt: torch.cat([noise, torch.zeros_like(noise)], 1), x0,
                                      torch.tensor([0]), noise)
    # The decoder NLL of a perfect mean is a few bits, never the ~0 of a matched KL.
    assert terms["vb"].item() > 0.1


def test_respacing_follows_dits_space_timesteps() -> None:
    """DiT accumulates the stride (T−1)/(steps−1) in floating point; rounding i·stride instead moves some steps by one
    (expected lists computed with DiT's `space_timesteps(1000, [steps])`; it differs for 278 of the counts 2–1000)."""
    assert spaced_timesteps(1000, 21) == [0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 499, 549, 599, 649, 699, 749,
                                          799, 849, 899, 949, 999]
    assert spaced_timesteps(1000, 31)[15] == 500 and spaced_timesteps(1000, 23)[11] == 499
    assert spaced_timesteps(1000, 7) == [0, 166, 333, 500, 666, 832, 999]
    fifty = spaced_timesteps(1000, 50)
    assert len(fifty) == 50 and fifty[:5] == [0, 20, 41, 61, 82] and fifty[-3:] == [958, 979, 999]


def test_a_model_output_of_another_width_than_the_diffusion_splits_is_refused() -> None:
    """With learned σ the model outputs 2C channels; a model and diffusion that disagree fail with a message, not a
    broadcast that trains 1-channel data on the wrong tensor."""
    x0, t = torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    fixed = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=False))
    with pytest.raises(ValueError, match="the model outputs 2 channels for 1-channel images.*expects 1"):
        fixed.training_losses(lambda x, s: torch.zeros(2, 2, 4, 4), x0, t, torch.randn_like(x0))
    learned = GaussianDiffusion.from_config(DiffusionConfig())
    with pytest.raises(ValueError, match="outputs 1 channels for 1-channel images.*expects 2"):
        learned.p_mean_variance(torch.zeros(2, 1, 4, 4), x0, t)


def test_one_sampling_step_works_with_a_fixed_variance() -> None:
    """A process respaced to one step has no β̃_1 to stand in at t=0; its one step predicts x̂0 all the same."""
    fixed = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=False)).respaced(1)
    xt, t = torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    out = fixed.p_mean_variance(torch.zeros_like(xt), xt, t)
    assert torch.isfinite(out["log_variance"]).all()
    torch.testing.assert_close(out["mean"], xt / float(np.sqrt(fixed.alphas_cumprod[0])))
