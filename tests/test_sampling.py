"""Samplers: Gene Heredity Guidance, classifier-free guidance, and denoisers without cell state."""

from __future__ import annotations

import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch
import typer
from conftest import tiny_model_config
from torch import nn
from typer.testing import CliRunner

from geca.config import RunConfig
from geca.diffusion.config import DiffusionConfig
from geca.diffusion.gaussian import GaussianDiffusion
from geca.errors import ConfigError
from geca.models.base import CellState, Denoiser, DenoiserOutput
from geca.models.build import build_model
from geca.sampling.config import GHG_MODES, SamplerConfig, settings_key
from geca.sampling.growth import grow
from geca.sampling.labels import per_class_labels, replicate_labels
from geca.sampling.samplers import guided_output, sample
from geca.utils.hardware import resolve_precision
from geca.utils.schema import apply_set


class Spy(Denoiser):
    """Wraps a GeCA and records what each call inherited and what it returned."""

    has_cell_state = True

    def __init__(self, inner: Denoiser) -> None:
        super().__init__()
        self.inner = inner
        self.in_channels, self.num_classes, self.learn_sigma = inner.in_channels, inner.num_classes, True
        self.calls: list[tuple[CellState | None, CellState]] = []

    def forward(self, x, t, y, null=None, carry=None, nca_steps=None) -> DenoiserOutput:
        res = self.inner(x, t, y, null=null, carry=carry, nca_steps=nca_steps)
        self.calls.append((carry, res.state))
        return res


class ConvDenoiser(Denoiser):
    """A denoiser with no cell state, standing in for the baselines."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.learn_sigma = channels, classes, True
        self.conv = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.y = nn.Linear(classes, 2 * channels)

    def forward(self, x, t, y, null=None, carry=None, nca_steps=None) -> DenoiserOutput:
        assert carry is None and nca_steps is None
        scale = 0.0 if null is None else (~null).float()[:, None]
        return DenoiserOutput(output=self.conv(x) + (self.y(y) * (1 if null is None else scale))[:, :, None, None])


@pytest.fixture
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion.from_config(DiffusionConfig())


def _geca(update_prob: float = 0.5) -> Denoiser:
    torch.manual_seed(0)
    model = build_model(tiny_model_config(update_prob=update_prob), 3, 4, 6).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("mode", GHG_MODES)
@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_each_ghg_mode_carries_exactly_the_intended_tensors(diffusion, mode: str, cfg_scale: float) -> None:
    spy = Spy(_geca())
    labels = per_class_labels(4, 1)
    sample(spy, diffusion, labels, (3, 6, 6),
           SamplerConfig(sampler="ddpm", steps=5, guidance_scale=cfg_scale, ghg=mode, clip_x0=True))
    assert len(spy.calls) == 5
    assert spy.calls[0][0] is None, "the first step (t=T) has nothing to inherit: the training seed is used"
    for (carry, _), (_, previous) in zip(spy.calls[1:], spy.calls[:-1], strict=True):
        if mode == "none":
            assert carry is None
            continue
        assert (carry.hidden is previous.hidden) == (mode in ("hidden", "both"))
        assert (carry.out is previous.out) == (mode in ("out", "both"))
        assert (carry.hidden is None) == (mode == "out") and (carry.out is None) == (mode == "hidden")


def test_ghg_changes_the_samples(diffusion) -> None:
    labels = per_class_labels(4, 1)
    outs = {}
    for mode in ("none", "hidden"):
        torch.manual_seed(3)
        outs[mode] = sample(_geca(), diffusion, labels, (3, 6, 6), SamplerConfig(steps=4, ghg=mode, clip_x0=True))
    assert not torch.allclose(outs["none"], outs["hidden"])


def test_cfg_scale_one_equals_the_conditional_model() -> None:
    model = _geca(update_prob=1.0)
    torch.manual_seed(0)
    x, t, y = torch.randn(4, 3, 6, 6), torch.randint(0, 1000, (4,)), per_class_labels(4, 1)
    seed = model.seed(4, 6, 6, torch.device("cpu"))
    both = CellState(out=torch.cat([seed.out, seed.out]), hidden=torch.cat([seed.hidden, seed.hidden]))
    doubled = guided_output(model, x, t, y, 1.0, carry=both, double=True).output
    conditional = model(x, t, y, carry=seed).output
    torch.testing.assert_close(doubled[:, :3], conditional[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(doubled[:, 3:], conditional[:, 3:], rtol=1e-5, atol=1e-5)
    stronger = guided_output(model, x, t, y, 3.0, carry=both).output
    assert not torch.allclose(stronger[:, :3], conditional[:, :3], atol=1e-3)
    torch.testing.assert_close(stronger[:, 3:], conditional[:, 3:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_denoiser_without_cell_state_uses_the_same_samplers(diffusion, sampler: str) -> None:
    torch.manual_seed(0)
    model = ConvDenoiser(3, 4)
    out = sample(model, diffusion, per_class_labels(4, 2), (3, 6, 6),
                 SamplerConfig(sampler=sampler, steps=6, guidance_scale=2.0, ghg="hidden",
                                                  clip_x0=True))
    assert out.shape == (8, 3, 6, 6) and torch.isfinite(out).all()


def test_ddim_eta0_is_deterministic_given_the_noise(diffusion) -> None:
    model = ConvDenoiser(3, 4)
    noise = torch.randn(4, 3, 6, 6)
    cfg = SamplerConfig(sampler="ddim", steps=7, guidance_scale=1.5, ghg="none", clip_x0=True)
    a = sample(model, diffusion, per_class_labels(4, 1), (3, 6, 6), cfg, noise=noise)
    b = sample(model, diffusion, per_class_labels(4, 1), (3, 6, 6), cfg, noise=noise)
    assert torch.equal(a, b)


def test_m_at_sampling_reaches_the_model(diffusion) -> None:
    spy = Spy(_geca())
    sample(spy, diffusion, per_class_labels(4, 1), (3, 6, 6), SamplerConfig(steps=2, nca_steps=9, guidance_scale=1.0,
                                                                                clip_x0=True))
    model = spy.inner
    x, t, y = torch.randn(1, 3, 6, 6), torch.tensor([10]), per_class_labels(4, 1)[:1]
    assert len(list(model.grow(x, t, y, nca_steps=9))) == 9


def test_replicated_labels_repeat_every_vector_exactly_ratio_times() -> None:
    labels = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0]], dtype=np.float32)
    rep = replicate_labels(labels, 5).numpy()
    assert rep.shape == (20, 3)
    rows, counts = np.unique(rep, axis=0, return_counts=True)
    for row, count in zip(rows, counts, strict=True):
        assert count == 5 * int((labels == row).all(axis=1).sum())


def test_bad_sampler_settings_are_rejected() -> None:
    for bad in (SamplerConfig(sampler="euler"), SamplerConfig(ghg="inherit"), SamplerConfig(nca_steps=0),
                SamplerConfig(sampler="dpm++", schedule="cosine"), SamplerConfig(sampler="ddim", schedule="lambda"),
                SamplerConfig(sampler="ddpm", schedule="karras")):
        with pytest.raises(ValueError):
            bad.validate()


def test_each_sampler_gets_its_default_step_count() -> None:
    """250 (the paper's DDPM) where no steps are given, 25 for DPM-Solver++, which needs 10-25; given steps stay."""
    from geca.cli.options import SamplingFlags, sampling_flags

    assert [SamplerConfig(sampler=s).steps for s in ("ddpm", "ddim", "dpm++", "dpm++sde")] == [250, 250, 25, 25]
    assert SamplerConfig(sampler="dpm++", steps=10).steps == 10
    config = RunConfig()
    apply_set(config, ["preview.sampler.steps=null", "preview.sampler.sampler=dpm++"])  # null: the default
    config.validate()
    assert config.preview.sampler.steps == 25
    seen: list[SamplingFlags] = []
    command = typer.Typer()
    command.command()(sampling_flags(("sampler", "steps"))(lambda *, flags: seen.append(flags)))
    for args, steps in ((["--sampler", "dpm++sde"], 25), (["--sampler", "ddim"], 250), ([], 250),
                        (["--sampler", "dpm++", "--steps", "12"], 12)):
        assert CliRunner().invoke(command, args).exit_code == 0
        assert seen[-1].sampling.steps == steps, args


def test_each_sampler_gets_its_default_schedule() -> None:
    resolved = {name: SamplerConfig(sampler=name).for_model(True, False).schedule
                for name in ("ddpm", "ddim", "dpm++", "dpm++sde")}
    assert resolved == {"ddpm": "uniform", "ddim": "uniform", "dpm++": "lambda", "dpm++sde": "lambda"}
    assert SamplerConfig(sampler="dpm++", schedule="karras").for_model(True, False).schedule == "karras"


class _Oracle(Denoiser):
    """The exact ε for data that is one constant image c: any correct solver lands on c."""

    def __init__(self, diffusion: GaussianDiffusion, c: float) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.learn_sigma, self.c = 3, 4, False, c
        self.ac = torch.tensor(diffusion.alphas_cumprod, dtype=torch.float64)
        self.calls = 0

    def forward(self, x, t, y, null=None, carry=None, nca_steps=None) -> DenoiserOutput:
        self.calls += 1
        ac = self.ac[t].view(-1, 1, 1, 1)
        return DenoiserOutput(output=((x.double() - ac.sqrt() * self.c) / (1 - ac).sqrt()).float())


@pytest.mark.parametrize("sampler", ["dpm++", "dpm++sde"])
@pytest.mark.parametrize(("steps", "schedule"), [(10, "uniform"), (20, "uniform"), (10, "lambda"), (10, "karras")])
def test_dpm_solver_lands_on_the_data_with_few_calls(diffusion, steps: int, schedule: str, sampler: str) -> None:
    oracle = _Oracle(GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=False)), 0.3)
    d = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=False))
    torch.manual_seed(0)
    x = sample(oracle, d, per_class_labels(4, 1), (3, 6, 6),
               SamplerConfig(sampler=sampler, steps=steps, guidance_scale=1.0, clip_x0=False, schedule=schedule))
    assert oracle.calls == steps
    torch.testing.assert_close(x, torch.full_like(x, 0.3), atol=2e-3, rtol=0)


def test_dpm_solver_says_when_its_steps_repeat_a_timestep() -> None:
    """Past ~30 λ-spaced steps of a 1000-step diffusion, diffusers rounds several low-noise steps to one integer t."""
    d = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=False))
    for steps, schedule, repeats in ((30, "lambda", False), (40, "lambda", True), (60, "uniform", False)):
        oracle = _Oracle(d, 0.3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sample(oracle, d, per_class_labels(4, 1), (3, 2, 2),
                   SamplerConfig(sampler="dpm++", steps=steps, guidance_scale=1.0, clip_x0=False, schedule=schedule))
        said = [str(w.message) for w in caught if "repeat an integer timestep" in str(w.message)]
        assert bool(said) == repeats and oracle.calls == steps, (steps, schedule, said)


@pytest.mark.parametrize(("sampler", "algorithm"), [("dpm++", "dpmsolver++"), ("dpm++sde", "sde-dpmsolver++")])
def test_dpm_solver_is_diffusers_scheduler_driven_by_our_loop(diffusion, sampler: str, algorithm: str) -> None:
    from diffusers import DPMSolverMultistepScheduler

    model = ConvDenoiser(3, 4)
    labels, noise = per_class_labels(4, 1), torch.randn(4, 3, 6, 6)
    torch.manual_seed(1)
    ours = sample(model, diffusion, labels, (3, 6, 6), SamplerConfig(sampler=sampler, steps=8, guidance_scale=1.0,
                                                                     clip_x0=False, schedule="uniform"), noise=noise)
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                        beta_end=0.02, algorithm_type=algorithm, solver_order=2)
    sched.set_timesteps(8)
    x = noise.clone()
    torch.manual_seed(1)  # the SDE's noise: one draw of x's shape per step, from torch's global generator
    with torch.no_grad():
        for t in sched.timesteps:
            eps = model(x, torch.full((4,), int(t)), labels).output[:, :3]
            step_noise = torch.randn_like(x) if algorithm.startswith("sde") else None
            x = sched.step(eps, t, x, variance_noise=step_noise).prev_sample
    # Diffusers derives x̂0 from ε, we hand it over: float32 rounding at t ≈ T, where 1/√ᾱ ≈ 160, is all that differs.
    torch.testing.assert_close(ours, x, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("schedule", ["lambda", "karras"])
@pytest.mark.parametrize(("sampler", "algorithm"), [("dpm++", "dpmsolver++"), ("dpm++sde", "sde-dpmsolver++")])
def test_dpm_solver_schedules_are_diffusers_own(diffusion, sampler: str, algorithm: str, schedule: str) -> None:
    """λ and Karras steps fall between integer timesteps: the model is called at diffusers' rounded t, and the
    solver steps on the x̂0 of that call."""
    from diffusers import DPMSolverMultistepScheduler

    model = ConvDenoiser(3, 4)
    labels, noise = per_class_labels(4, 1), torch.randn(4, 3, 6, 6)
    seen: list[int] = []
    torch.manual_seed(1)
    ours = sample(model, diffusion, labels, (3, 6, 6),
                  SamplerConfig(sampler=sampler, steps=12, guidance_scale=1.0, clip_x0=False, schedule=schedule),
                  noise=noise, callback=lambda t, x, p, state: seen.append(t))
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                        beta_end=0.02, algorithm_type=algorithm, solver_order=2,
                                        prediction_type="sample", use_lu_lambdas=schedule == "lambda",
                                        use_karras_sigmas=schedule == "karras")
    sched.set_timesteps(12)
    assert seen == [int(t) for t in sched.timesteps] and seen[-1] < 5  # dense at low noise, unlike 999…83
    ac = torch.tensor(diffusion.alphas_cumprod, dtype=torch.float32)
    x = noise.clone()
    torch.manual_seed(1)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = model(x, torch.full((4,), int(t)), labels).output[:, :3]
            x0 = (x - (1 - ac[int(t)]).sqrt() * eps) / ac[int(t)].sqrt()
            step_noise = torch.randn_like(x) if algorithm.startswith("sde") else None
            x = sched.step(x0, t, x, variance_noise=step_noise).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-3, rtol=1e-3)  # our x̂0 in float64 then float32; this one float32


def test_dpm_solver_steps_in_log_snr_unless_told_otherwise(diffusion) -> None:
    seen: dict[str | None, list[int]] = {}
    for schedule in (None, "lambda", "uniform"):
        seen[schedule] = []
        sample(ConvDenoiser(3, 4), diffusion, per_class_labels(4, 1), (3, 6, 6),
               SamplerConfig(sampler="dpm++", steps=10, guidance_scale=1.0, schedule=schedule, clip_x0=True),
               callback=lambda t, x, p, state, k=schedule: seen[k].append(t))
    assert seen[None] == seen["lambda"] != seen["uniform"]
    assert seen["lambda"][-3:] == [22, 5, 0] and seen["uniform"][-1] == 100


def test_keys_made_before_schedules_existed_stay_valid() -> None:
    """Stage and resume keys: a uniform schedule (DDPM/DDIM's, and DPM-Solver++'s before `lambda`) and fp32 add
    nothing, so finished work stays done; DPM-Solver++ by default now draws other images, so its keys change, as
    do those of bf16 sampling."""
    def before(config: SamplerConfig) -> dict:
        return {k: v for k, v in asdict(config).items() if k not in ("schedule", "precision")}

    ddim, dpm = SamplerConfig(sampler="ddim", steps=50), SamplerConfig(sampler="dpm++", steps=20)
    study = {"preview": {"per_class": 4, "sampler": asdict(ddim)}, "samplers": [asdict(ddim), asdict(dpm)]}
    assert settings_key(study) == {"preview": {"per_class": 4, "sampler": before(ddim)},
                                   "samplers": [before(ddim), {**before(dpm), "schedule": "lambda"}]}
    assert settings_key(asdict(SamplerConfig(sampler="dpm++", steps=250, schedule="uniform"))) == \
        before(dpm) | {"steps": 250}
    assert settings_key(asdict(ddim.for_model(True, False))) == before(ddim.for_model(True, False))
    assert settings_key(asdict(SamplerConfig(sampler="ddim", steps=50, precision="bf16"))) == before(ddim) | {
        "precision": "bf16"}
    # `auto` keyed as it resolves here: a study resumed on a machine where it means another precision redoes the work
    here = resolve_precision("auto")
    assert settings_key(asdict(SamplerConfig(sampler="ddim", steps=50, precision="auto"))) == before(ddim) | (
        {"precision": here} if here != "fp32" else {})


def test_bf16_sampling_runs_the_denoiser_under_autocast_and_the_sampler_in_float32(diffusion) -> None:
    """`precision: bf16` runs each denoiser call under bf16 autocast (its linear layers see bf16) and hands back
    float32 output and cell state, so guidance, heredity and the sampler's steps stay float32: the samples differ
    from fp32's by what bf16 rounding makes of the chain."""
    model, labels, noise = _geca(), per_class_labels(4, 1), torch.randn(4, 3, 6, 6)
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for m in model.modules()
             if isinstance(m, nn.Linear)]
    states: list[CellState | None] = []
    runs = {}
    for precision in ("fp32", "bf16"):
        seen.clear()
        torch.manual_seed(0)
        runs[precision] = sample(model, diffusion, labels, (3, 6, 6), SamplerConfig(
            sampler="ddim", steps=5, ghg="hidden", clip_x0=True, precision=precision), noise=noise,
            callback=lambda t, x, p, state: states.append(state))
        assert set(seen) == {torch.float32 if precision == "fp32" else torch.bfloat16}
    seen.clear()  # `geca grow` replays its M updates as it sampled
    grow(model, diffusion, labels[:1], (3, 6, 6), SamplerConfig(sampler="ddim", steps=3, ghg="hidden", clip_x0=True,
                                                              precision="bf16"), at_t=500, frames=2)
    assert set(seen) == {torch.bfloat16}
    for hook in hooks:
        hook.remove()
    assert runs["bf16"].dtype == torch.float32 and {s.hidden.dtype for s in states} == {torch.float32}
    assert not torch.equal(runs["bf16"], runs["fp32"])
    # a few pixels of this random-weight model's chaotic chain move far (0.47 seen); on average 0.004 of 0.9
    assert (runs["bf16"] - runs["fp32"]).abs().mean() < 0.02 * runs["fp32"].abs().mean()
    if not torch.cuda.is_available():  # refused when the settings are checked, before any sampling
        with pytest.raises(ConfigError, match="--precision must be fp32, bf16 or auto without a CUDA GPU"):
            SamplerConfig(sampler="ddim", precision="fp16").validate()


class HalfDenoiser(Denoiser):
    """Answers in bf16, output and cell state, as a model whose last ops autocast to bf16 would."""

    has_cell_state = True

    def __init__(self) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.learn_sigma = 3, 4, True

    def forward(self, x, t, y, null=None, carry=None, nca_steps=None) -> DenoiserOutput:
        b, _, h, w = x.shape
        half = torch.bfloat16
        return DenoiserOutput(output=torch.ones(b, 6, h, w, dtype=half),
                              state=CellState(out=torch.ones(b, h, w, 6, dtype=half),
                                              hidden=torch.ones(b, h, w, 2, dtype=half)))


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_guided_output_under_autocast_hands_back_float32(scale: float) -> None:
    """Whatever dtype the denoiser answers in under autocast, guidance, heredity and the sampler get float32."""
    res = guided_output(HalfDenoiser(), torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), torch.eye(4)[:2],
                        scale, dtype=torch.bfloat16)
    assert res.output.dtype == res.state.out.dtype == res.state.hidden.dtype == torch.float32


def test_dpm_solver_sde_draws_fresh_noise_each_run(diffusion) -> None:
    model, labels, noise = ConvDenoiser(3, 4), per_class_labels(4, 1), torch.randn(4, 3, 6, 6)
    runs = {}
    for sampler, seed in (("dpm++", 0), ("dpm++", 1), ("dpm++sde", 0), ("dpm++sde", 1)):
        torch.manual_seed(seed)
        runs[sampler, seed] = sample(model, diffusion, labels, (3, 6, 6), SamplerConfig(
            sampler=sampler, steps=6, guidance_scale=1.0, clip_x0=False), noise=noise)
    torch.testing.assert_close(runs["dpm++", 0], runs["dpm++", 1])
    assert (runs["dpm++sde", 0] - runs["dpm++sde", 1]).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["dpm++", "dpm++sde"])
def test_dpm_solver_carries_the_cell_state(diffusion, sampler: str) -> None:
    spy = Spy(_geca())
    sample(spy, diffusion, per_class_labels(4, 1), (3, 6, 6),
           SamplerConfig(sampler=sampler, steps=4, guidance_scale=1.5, ghg="hidden", clip_x0=True))
    assert len(spy.calls) == 4 and spy.calls[0][0] is None
    for (carry, _), (_, previous) in zip(spy.calls[1:], spy.calls[:-1], strict=True):
        assert carry.hidden is previous.hidden and carry.out is None


def test_sampling_does_not_guess_whether_the_model_works_on_latents(diffusion) -> None:
    """Clipping x̂0 to [-1, 1] is right for pixels and wrong for latents; only the caller knows which it has."""
    with pytest.raises(ValueError, match="clip_x0 is unset"):
        sample(ConvDenoiser(3, 4), diffusion, per_class_labels(4, 1), (3, 6, 6), SamplerConfig(steps=2))
    latent = SamplerConfig(steps=2).for_model(cellular=False, latent=True)
    assert latent.clip_x0 is False and sample(ConvDenoiser(3, 4), diffusion, per_class_labels(4, 1), (3, 6, 6),
                                              latent).shape == (4, 3, 6, 6)


def test_a_set_no_machine_holds_is_refused_before_its_labels_are_allocated() -> None:
    from geca.errors import ConfigError

    with pytest.raises(ConfigError, match="--per-class 10000000 asks for 20,000,000 images; a set holds at most"):
        per_class_labels(2, 10_000_000)
    with pytest.raises(ConfigError, match="--ratio 5000000 asks for 20,000,000 images"):
        replicate_labels(np.zeros((4, 2)), 5_000_000)
    assert len(replicate_labels(np.zeros((4, 2)), 3)) == 12


def test_a_setting_is_labelled_as_sample_sets_have_always_been_named() -> None:
    """Study stages name their sets by these labels: a changed label would make a resumed study redo finished work."""
    assert SamplerConfig(sampler="ddim", steps=25).label() == "ddim25"
    assert SamplerConfig(sampler="dpm++", steps=20, schedule="karras").label() == "dpm++20-karras"
    assert SamplerConfig(sampler="ddim", steps=2, precision="bf16").label() == "ddim2-bf16"
    assert SamplerConfig(sampler="dpm++sde", steps=25, schedule="uniform", precision="fp32").label() == (
        "dpm++sde25-uniform")
    # settings a sampler-cost stage may compare: each named where not at its default, so no two sets share a name
    assert SamplerConfig(sampler="ddim", steps=25, guidance_scale=3.0, ghg="none", nca_steps=16, eta=0.5,
                         clip_x0=False).label() == "ddim25-cfg3-ghg_none-M16-eta0.5-noclip"
    assert SamplerConfig(sampler="ddpm", guidance_scale=1.5, clip_x0=True).label() == "ddpm250-clip"


def test_an_unfinished_sets_other_settings_are_named_as_given() -> None:
    """Defaults the resume key leaves out (fp32, the uniform schedule) are named by their values, not as None."""
    from geca.sampling.generate import _other, _work_settings

    labels = torch.eye(2)
    was = _work_settings("w", labels, SamplerConfig(sampler="ddpm", schedule="uniform", precision="fp32"), 0, 8)
    now = _work_settings("w", labels, SamplerConfig(sampler="ddpm", schedule="lambda", precision="bf16"), 0, 8)
    said = _other({"settings": was}, now)
    assert said == "sampling.schedule 'uniform' (now 'lambda'), sampling.precision 'fp32' (now 'bf16')", said
