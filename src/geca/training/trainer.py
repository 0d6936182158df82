"""The training loop: accelerate for devices, processes and mixed precision; exact resume.

`Trainer.__init__` sets up (data, model, optimizer, resume); `Trainer.run` reads top to bottom: the loop of
`Trainer.step` and `Trainer.periodic`, then the final checkpoint, preview and validation. What the run trains on is
in `data.py`, the processes' collectives in `distributed.py`, loading a checkpoint to resume in `resume.py`, the time
budget in `budget.py`.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from geca.config import RunConfig, load_config, save_config
from geca.data.imageset import ImageSet
from geca.errors import CheckpointError, ConfigError, TrainingError
from geca.models.attention import runnable
from geca.models.build import count_parameters
from geca.run import ModelSpec, find_checkpoint, prune_checkpoints, read_spec, save_checkpoint
from geca.sampling.config import SamplerConfig
from geca.sampling.generate import sample_images
from geca.sampling.labels import per_class_labels
from geca.sampling.samplers import guided_output, resolved_precision
from geca.training.budget import Budget
from geca.training.compile import check_toolchain, compile_for_run
from geca.training.data import BatchStream, training_data
from geca.training.distributed import make_accelerator, max_over_processes, parameters_identical
from geca.training.ema import EMA
from geca.training.heredity import handed_over
from geca.training.resume import latest_checkpoint, resume_from
from geca.utils.hardware import peak_memory_mib, reset_peak_memory
from geca.utils.io import CsvLog, atomic_write_json, few, other_files, output_dir
from geca.utils.plots import plot_class_grid, plot_loss_curve
from geca.utils.seeding import derive_seed

DIVERGED = 1e3  # the diffusion loss of a sane model is O(1); above this it has blown up
LOG_FIELDS = ["step", "epoch", "loss", "mse", "vb", "lr", "images_per_s", "peak_mem_mib", "elapsed_min"]


class LossWindow:
    """Loss terms averaged over the steps since the last log row."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.started = time.time()

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """Summed on the device: read back once per log row, not three times a step (each a GPU sync)."""
        self.steps += 1
        for k in ("loss", "mse", "vb"):
            if k in terms:
                mean = terms[k].detach().float().mean()
                self.sums[k] = self.sums[k] + mean if k in self.sums else mean

    def row(self, step: int, batch_size: int, epoch: float, lr: float, elapsed_s: float) -> dict[str, object]:
        ips = self.steps * batch_size / max(time.time() - self.started, 1e-9)
        row: dict[str, object] = {"step": step, "epoch": f"{epoch:.3f}", "lr": lr, "images_per_s": f"{ips:.2f}",
                                  "elapsed_min": f"{elapsed_s / 60:.3f}"}
        row.update({k: f"{v.item() / self.steps:.6g}" for k, v in self.sums.items()})
        self.reset()
        return row


def learning_rate(tc: Any, step: int) -> float:
    """The lr of optimizer step `step` (0-based): a pure function of the step, so resume needs no scheduler state."""
    if tc.warmup_steps and step < tc.warmup_steps:  # step −1: what a checkpoint before any step records
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "cosine":
        span = max(tc.max_steps - tc.warmup_steps, 1)
        return tc.lr * 0.5 * (1 + math.cos(math.pi * min(step - tc.warmup_steps, span) / span))
    return tc.lr


class Trainer:
    """One training run: set up in the constructor, then `step()` and `periodic()` until done."""

    def __init__(self, config: RunConfig, run_dir: Path, resume: bool, progress: bool,
                 train_set: ImageSet | None, cpu: bool = False) -> None:
        self.config, self.run_dir, self.progress, self.resumed = config, Path(run_dir), progress, resume
        config.validate()
        check_run_dir(self.run_dir, resume)
        tc = config.train
        self.accelerator = acc = make_accelerator(config, self.run_dir, cpu)
        check_toolchain(config.model, acc.device)
        check_sampler_precisions(config, acc.device)
        self.world, self.rank, self.main = acc.num_processes, acc.process_index, acc.is_main_process
        if tc.batch_size % self.world:
            raise ConfigError(f"batch size {tc.batch_size} is not divisible by {self.world} processes")
        self.local_batch = tc.batch_size // self.world
        self.heredity_prob = tc.heredity_prob if getattr(config.model, "heredity", "off") == "gated" else 0.0
        self.data = training_data(config, self.run_dir, acc, progress, train_set)
        if len(self.data.data) == 0:
            raise ConfigError(f"{config.data.spec}: the training split is empty")
        self.spec = self.data.spec(config)
        before = read_spec(self.run_dir) if resume else None
        changed = before.differences(self.spec) if before is not None else []
        self.notes = [] if before is None or before.folds_sha256 or not before.data.folds_file else [
            f"resume: model.json, written by an older geca, holds no SHA-256 of its folds file; recording that of "
            f"{self.spec.data.folds_file} as it is now (if the file was rewritten since the run began, the run's "
            "split has changed with it)"]
        if changed:
            raise CheckpointError(f"{run_dir}/model.json differs from this config at {'; '.join(changed)}; resume "
                                  "needs the same model, diffusion and data")
        ckpt, self.step_count, self.state = (latest_checkpoint(self.run_dir) if resume else
                                             (None, 0, {"elapsed_s": 0.0, "images_seen": 0}))
        self.saved_lr = self.state.pop("lr", None)  # the last step's, as checkpointed
        if before is not None and self.main and self.step_count >= tc.max_steps and \
                before.data.spec != self.spec.data.spec:
            self._repoint(before)
        compiled, self.compile_note = compile_for_run(self.spec, tc, acc.device, tc.max_steps - self.step_count,
                                                      self.local_batch)
        torch.manual_seed(tc.seed)
        model = self.spec.build(compiled)
        self.diffusion = self.spec.diffusion_process()
        self.ema = EMA(model, tc.ema_decay, tc.ema_warmup)
        self.n_parameters = count_parameters(model)
        # fused: one kernel for the whole update instead of a few per tensor (CPU and CUDA); a small GeCA on a GPU
        # is launch-bound
        optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
        if ckpt is not None:
            resume_from(ckpt, model, self.ema, optimizer, acc.scaler)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.device = acc.device
        asked = getattr(config.model, "attention", "auto")
        if asked != "auto" and (used := runnable(asked, self.device)) != asked:  # a moved run keeps its choice
            self.notes.append(f"model.attention {asked} runs as {used} on {self.device} (the same maths; {asked}'s "
                              f"kernels are for {'CUDA' if asked == 'triton' else 'CPUs'})")
        self.ema.model.to(self.device)
        self.images, self.labels = self.data.images.to(self.device), self.data.labels.to(self.device)
        self.stream = BatchStream(len(self.data.data), tc.seed)
        self.log = CsvLog(self.run_dir / "log.csv", LOG_FIELDS)
        self.validator = self._validator(resume)  # loads the val split and features: fails before files are written
        self.budget = Budget(config, self.n_parameters, self.spec.num_classes, self.validator is not None, self.main,
                             self.device, self._guided_call)
        if self.main and self.step_count < tc.max_steps:  # a finished run resumed to its step is left as it is
            self._write_run_files(resume)
        if tc.logger == "tensorboard":
            # events in RUN/tensorboard, beside log.csv; on resume the steps after the checkpoint are dropped there
            # as they are from log.csv
            acc.init_trackers("tensorboard", init_kwargs={"tensorboard": {"purge_step": self.step_count + 1}})
        acc.wait_for_everyone()
        self.window = LossWindow()

    def _repoint(self, before: ModelSpec) -> None:
        """A finished run resumed with its npz moved (the same arrays, as `differences` found): only where its data
        is recorded changes, so that sampling, `geca runs` and later resumes find it there."""
        data = replace(before.data, spec=self.spec.data.spec)
        atomic_write_json(self.run_dir / "model.json", replace(before, data=data).to_dict())
        self.notes.append(f"resume: the run's data is recorded as {data.spec} now (it was {before.data.spec})")
        try:
            config = load_config(self.run_dir / "config.yaml")
        except ConfigError:
            self.notes.append(f"resume: {self.run_dir / 'config.yaml'} is unreadable and stays as it is")
            return
        save_config(replace(config, data=replace(config.data, spec=data.spec)), self.run_dir / "config.yaml")

    def _write_run_files(self, resume: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resume and (self.run_dir / "model.json").is_file():
            # a run interrupted before its first checkpoint began here: what it wrote goes, nothing else
            for name in ("log.csv", "validation.csv", "loss.png"):
                (self.run_dir / name).unlink(missing_ok=True)
            for pattern in ("samples/step_*.png", "tensorboard/**/events.out.tfevents.*"):
                for stale in self.run_dir.glob(pattern):
                    stale.unlink()
        # files by their absolute paths (as model.json has them): a resume from another folder finds the data and folds
        save_config(replace(self.config, data=self.spec.data), self.run_dir / "config.yaml")
        atomic_write_json(self.run_dir / "model.json", self.spec.to_dict())
        if resume:
            self.log.keep_until(self.step_count)
        (self.run_dir / "samples").mkdir(exist_ok=True)

    def _validator(self, resume: bool) -> Any:
        if not self.config.validation.every:
            return None
        from geca.training.validation import Validator

        if not self.main:
            return None
        validator = Validator(self.config, self.spec, self.data.data, self.run_dir, self.device, self.data.to_images,
                              log=tqdm.write)
        if resume:
            validator.resume(self.step_count)
        return validator

    def step(self) -> dict[str, torch.Tensor]:
        """One optimizer step; every random draw comes from (seed, step, rank)."""
        tc, acc, b = self.config.train, self.accelerator, self.local_batch
        torch.manual_seed(derive_seed(tc.seed, self.step_count, self.rank))
        idx = self.stream.indices(self.step_count * tc.batch_size + self.rank * b, b).to(self.device)
        x0, y = self.images[idx], self.labels[idx]  # (b, C, H, W), (b, K)
        if self.config.data.flip:
            flip = torch.rand(b, device=self.device) < 0.5
            # latents: the cached encoding of the mirrored image (a mirrored latent is not one)
            mirrored = x0.flip(-1) if self.data.flipped is None else self.data.flipped[idx]
            x0 = torch.where(flip[:, None, None, None], mirrored, x0)
        t = torch.randint(0, self.diffusion.num_timesteps, (b,), device=self.device)
        noise = torch.randn_like(x0)
        with acc.autocast():
            terms = self.diffusion.training_losses(self._denoiser(x0, t, y, noise), x0, t, noise)
        loss = terms["loss"].mean()
        if not math.isfinite(value := self._worst(loss)) or value > DIVERGED:
            self._diverged(value)
        acc.backward(loss)
        if tc.grad_clip:
            acc.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(tc, self.step_count)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not acc.optimizer_step_was_skipped:  # fp16: the scaler skipped a step with inf/NaN gradients
            self.ema.update(acc.unwrap_model(self.model), self.step_count)
        self.step_count += 1
        self.state["images_seen"] += tc.batch_size
        self.window.add(terms)
        return terms

    def _worst(self, loss: torch.Tensor) -> float:
        """The loss's value, the worst over processes: one diverging process must stop them all, or the others wait
        for its gradients in the all-reduce until the collective times out."""
        if self.world == 1:
            return loss.item()
        v = loss.detach().float().reshape(1)
        worst = max_over_processes(torch.cat([v.isnan().float(), v.masked_fill(v.isnan(), 0)]))  # (2,)
        return math.nan if worst[0] > 0 else worst[1].item()

    def _denoiser(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, noise: torch.Tensor
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The model as the loss calls it: as published (C_h starts at zero), or heredity-aware, where a share of
        the calls start from what a no-grad call at (x_{t+Δ}, t+Δ) handed over, as `--ghg hidden` does."""
        if not self.heredity_prob:
            return lambda xt, tt: self.model(xt, tt, y).output
        b, tc = len(t), self.config.train
        # One label drop per sample, shared by both calls, as a CFG half keeps its own lineage when sampling.
        null = torch.rand(b, device=self.device) < self.config.model.label_dropout
        keep = torch.rand(b, device=self.device) < self.heredity_prob
        d = self.diffusion

        def denoise(xt: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            x_prev, t_prev = xt, tt
            if tc.heredity_offset:
                earlier = (t + tc.heredity_offset).clamp(max=d.num_timesteps - 1)
                x_prev, t_prev = d.q_sample(x0, earlier, noise), d.model_timesteps(earlier)
            carry = handed_over(self.accelerator.unwrap_model(self.model), x_prev, t_prev, y, null, keep)
            return self.model(xt, tt, y, null=null, carry=carry).output

        return denoise

    def _diverged(self, value: float) -> None:
        """Stop before a diverged model is checkpointed; name the last good checkpoint."""
        tc = self.config.train
        latest = self.run_dir / "checkpoints" / "latest.json"
        kept = f"the latest checkpoint ({find_checkpoint(self.run_dir)}) is kept" if latest.exists() else \
            "no checkpoint was written"
        hints = ["a lower --lr", "a gradient clip (train.grad_clip)"]
        if self.accelerator.mixed_precision != "no":
            hints.append("--precision fp32")
        raise TrainingError(f"loss became {value:.4g} at step {self.step_count} (lr {tc.lr}, precision "
                            f"{tc.precision}): training diverged; {kept}. Try {' or '.join(hints)}.")

    def elapsed_s(self) -> float:
        """Training time over every invocation of the run."""
        return self.state["elapsed_s"] + self.budget.elapsed_s()

    def log_row(self) -> None:
        tc = self.config.train
        row = self.window.row(self.step_count, tc.batch_size, self.state["images_seen"] / len(self.data.data),
                              learning_rate(tc, self.step_count - 1), self.elapsed_s())
        peak = peak_memory_mib(self.device)
        row["peak_mem_mib"] = "" if peak is None else f"{peak:.0f}"
        self.shown = f"loss {row['loss']}, {row['images_per_s']} img/s"
        self.bar.set_postfix_str(self._postfix())
        if self.main:
            self.log.append(row)
            self.accelerator.log({k: float(v) for k, v in row.items() if k not in ("step", "elapsed_min") and v != ""},
                                 step=self.step_count)
            if self.bar.disable and self._plain_due():  # a log file: a plain line now and then
                tqdm.write(f"step {self.step_count}/{tc.max_steps}: loss {row['loss']}, {row['images_per_s']} img/s, "
                           f"{row['elapsed_min']} min")

    def _plain_due(self) -> bool:
        """At most one plain progress line a minute (and the first one)."""
        now = time.time()
        if now - self._last_plain < 60:
            return False
        self._last_plain = now
        return True

    def checkpoint(self) -> None:
        if self.main:
            scaler = self.accelerator.scaler  # fp16 only: its loss scale is part of an exact resume
            save_checkpoint(self.run_dir, self.step_count, self.accelerator.unwrap_model(self.model), self.ema.model,
                            self.optimizer, {**self.state, "elapsed_s": self.elapsed_s(),
                                             "lr": learning_rate(self.config.train, self.step_count - 1),
                                             **({"grad_scaler": scaler.state_dict()} if scaler else {})})
            if self.config.train.keep_checkpoints is not None:
                prune_checkpoints(self.run_dir, self.config.train.keep_checkpoints)

    def preview(self, final: bool = False) -> None:
        """A grid of EMA samples, per_class per class: what `geca sample --seed <train seed>` would draw now. The
        final one says so (with a bar on a terminal): on a CPU it can take minutes."""
        pc, spec = self.config.preview, self.spec
        shown = min(spec.num_classes, pc.max_classes)
        labels = per_class_labels(spec.num_classes, pc.per_class, list(range(shown)))
        sampler = pc.sampler.for_model(self.ema.model.has_cell_state, spec.latent is not None,
                                       ghg_default=self.ema.model.ghg_default)
        if final:
            tqdm.write(f"final preview: {len(labels)} EMA samples at step {self.step_count} ({sampler.sampler} "
                       f"{sampler.steps} steps)")
        images = sample_images(self.ema.model, self.diffusion, labels, spec.shape, sampler, self.config.train.seed,
                               len(labels), self.device, self.data.to_images, progress=final and self.progress)
        plot_class_grid(images, spec.class_names[:shown], pc.per_class,
                        self.run_dir / "samples" / f"step_{self.step_count:07d}.png",
                        title=f"EMA samples at step {self.step_count} ({sampler.sampler} {sampler.steps}, "
                              f"CFG {sampler.guidance_scale}, GHG {sampler.ghg})")

    def validate(self) -> None:
        scores = self.validator(self.step_count, self.accelerator.unwrap_model(self.model), self.ema.model,
                                self.diffusion)
        self.accelerator.log({f"validation/{k}": v for k, v in scores.items()}, step=self.step_count)

    def periodic(self) -> None:
        """Log, checkpoint, preview and validate at their intervals."""
        tc, step = self.config.train, self.step_count
        if step % tc.log_every == 0:
            self.log_row()
        if self._checkpoint_due():
            self.budget.timed("checkpoint", self.checkpoint)
        if self.main and tc.sample_every and step % tc.sample_every == 0:
            self._preview_if_it_fits(checkpointed=self._checkpoint_due())
        if self.validator is not None and step % self.config.validation.every == 0:
            self.budget.timed("validation", self.validate)

    def _checkpoint_due(self) -> bool:
        every = self.config.train.checkpoint_every
        return bool(every) and self.step_count % every == 0

    @torch.no_grad()
    def _guided_call(self, images: int, sampler: SamplerConfig, dtype: torch.dtype | None) -> None:
        """What the budget times to estimate a preview or validation before the first: one call of the EMA model."""
        x = torch.randn(images, *self.spec.shape, device=self.device)
        t = torch.full((images,), self.diffusion.num_timesteps - 1, device=self.device)
        y = torch.zeros(images, self.spec.num_classes, device=self.device)
        guided_output(self.ema.model, x, t, y, sampler.guidance_scale, nca_steps=sampler.nca_steps, dtype=dtype)

    def finish(self) -> None:
        """The last step's log row, checkpoint, preview and validation, where the loop did not just write them."""
        tc, step = self.config.train, self.step_count
        if self.window.steps:
            self.log_row()
        self.bar.close()
        if self.resumed and step == self.first_step:  # no step fit: its files stay as its checkpoint left them
            if self.main:
                tqdm.write(f"no step fit --max-minutes {tc.max_minutes:g} beside the final work; the run stays at "
                           f"step {step}")
            return
        if not tc.checkpoint_every or step % tc.checkpoint_every:
            self.checkpoint()
        if self.main and tc.sample_every and step % tc.sample_every:
            self._preview_if_it_fits(final=True, checkpointed=True)
        if self.validator is not None and step % self.config.validation.every:
            self.validate()

    def _preview_if_it_fits(self, checkpointed: bool, final: bool = False) -> None:
        """A preview of more than half the budget, which the budget does not keep back, is drawn only where it still
        fits with the work after it; skipping one is said once."""
        if not self.budget.preview_skipped(self.step_count, final, checkpointed):
            self.budget.timed("preview", lambda: self.preview(final))
            return
        if not self.said_skipped:
            after = self.budget.after_preview(self.step_count, final, checkpointed)
            beside = f" beside {' and '.join(after)}" if after else ""
            tqdm.write(f"{'final ' if final else ''}preview skipped at step {self.step_count}: it would take about "
                       f"{self.budget.preview_s():.0f} s, more than --max-minutes has left{beside} (`geca sample --run "
                       f"{self.run_dir} --per-class 4 --out DIR` draws samples)")
        self.said_skipped = True

    def out_of_time(self) -> bool:
        """The budget is spent (`Budget.over`) in any process: all stop at once."""
        if self.config.train.max_minutes is None:
            return False
        over = torch.tensor([float(self.budget.over())], device=self.device)
        return max_over_processes(over).item() > 0

    def describe(self) -> str:
        """The start-up line: what trains, on what, from where."""
        d, s, m = self.data.data, self.spec, self.accelerator.unwrap_model(self.model)
        shape = f"{s.resolution}×{s.resolution}×{s.in_channels}" + (" latents" if s.latent else "")
        return (f"{self.config.model.name} ({count_parameters(m):,} parameters) on {self.device} × {self.world}, "
                f"precision {self.accelerator.mixed_precision if self.accelerator.mixed_precision != 'no' else 'fp32'}"
                f" (asked: {self.config.train.precision}); {self.config.data.spec}: {len(d)} training images, {shape},"
                f" {s.num_classes} classes; from step {self.step_count} to {self.config.train.max_steps}"
                + (f", at most {self.config.train.max_minutes:g} min" if self.config.train.max_minutes else "")
                + f"; {self.compile_note}")

    def _bar(self) -> tqdm:
        """Steps, or, under a time budget, the budget's seconds: its ETA is when the run ends at the latest (steps
        in the postfix)."""
        tc, disable = self.config.train, not (self.progress and self.main)
        if not self.timed:
            return tqdm(total=tc.max_steps, initial=self.step_count, desc="training", dynamic_ncols=True,
                        disable=disable)
        return tqdm(total=round(tc.max_minutes * 60), desc=f"training ({tc.max_minutes:g} min budget)", unit="s",
                    dynamic_ncols=True, disable=disable, bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}")

    def _advance(self) -> None:
        if not self.timed:
            self.bar.update(1)
            return
        self.bar.update(min(self.budget.elapsed_s(), self.bar.total) - self.bar.n)
        self.bar.set_postfix_str(self._postfix(), refresh=False)

    def _postfix(self) -> str:
        steps = [f"step {self.step_count}/{self.config.train.max_steps}"] if self.timed else []
        return ", ".join(steps + ([self.shown] if self.shown else []))

    def run(self, changes: list[str] | None = None) -> dict[str, Any]:
        """Train to max_steps; `changes` (what a resume changed) are printed once everything checked out."""
        tc = self.config.train
        if self.main:
            for line in [self.describe(), *(changes or []), *self.notes, *self._schedule_change()]:
                tqdm.write(line)
        if self.step_count >= tc.max_steps:  # a resumed run that is done: its files stay as they are
            if self.main:
                tqdm.write(f"nothing to train: the run is at step {self.step_count} and --max-steps is "
                           f"{tc.max_steps}")
            self.accelerator.end_training()
            return self._summary(None)
        self.budget.start()
        self.first_step, self._last_plain, self.said_skipped = self.step_count, 0.0, False
        self.timed, self.shown = tc.max_minutes is not None, ""
        reset_peak_memory(self.device)  # log.csv's peak is this run's, not an earlier one's in the same process
        self.bar = self._bar()
        self.model.train()
        with stop_between_steps(self.world == 1) as stop_asked:
            while self.step_count < tc.max_steps and not self.out_of_time():
                started = time.time()
                self.step()
                self.budget.step_s = time.time() - started
                self.periodic()
                self._advance()
                if stop_asked() and self.step_count < tc.max_steps:  # at the last step, the final work still runs
                    self._stop()
        self.finish()
        checksum = parameters_identical(self.accelerator, self.model) if self.world > 1 else None
        if self.main:
            plot_loss_curve(self.log.path, self.run_dir / "loss.png")
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return self._summary(checksum)

    def _stop(self) -> None:
        """Ctrl-C came during a step: log the steps since the last row and checkpoint the step just finished (unless
        done already), then stop."""
        if self.window.steps:
            self.log_row()
        if not self._checkpoint_due():  # periodic() wrote it already
            self.checkpoint()
        self.bar.close()
        tqdm.write(f"stopped after step {self.step_count}, checkpointed")
        raise KeyboardInterrupt

    def _schedule_change(self) -> list[str]:
        """A resume that changes max_steps under a cosine schedule (or the lr, warm-up or schedule) moves the lr of
        the step it continues from: said, as the user may not expect a jump."""
        if self.saved_lr is None or not self.step_count:
            return []
        tc = self.config.train
        now = learning_rate(tc, self.step_count - 1)
        if math.isclose(now, self.saved_lr, rel_tol=1e-9, abs_tol=1e-15):
            return []
        return [f"resume: the learning-rate schedule moved (it follows train.lr, warmup_steps, lr_schedule and "
                f"max_steps): step {self.step_count} trained at {self.saved_lr:.4g}, which the new schedule gives "
                f"{now:.4g}; step {self.step_count + 1} trains at {learning_rate(tc, self.step_count):.4g}"]

    def _summary(self, checksum: float | None) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "step": self.step_count, "processes": self.world,
                "parameter_checksum": checksum, "config": asdict(self.config)}


@contextmanager
def stop_between_steps(enabled: bool) -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C asks the loop to stop after the step it is in, whose checkpoint then loses nothing; a second
    stops at once. A single process only: torchrun's processes would each see it after another step."""
    previous = signal.getsignal(signal.SIGINT) or signal.default_int_handler  # None: set outside Python
    if not enabled or threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield lambda: False
        return
    asked: list[bool] = []

    def ask(signum: int, frame: object) -> None:
        asked.append(True)
        signal.signal(signal.SIGINT, previous)
        tqdm.write("Ctrl-C: stopping after this step, which is checkpointed (Ctrl-C again stops at once)")

    signal.signal(signal.SIGINT, ask)
    try:
        yield lambda: bool(asked)
    finally:
        signal.signal(signal.SIGINT, previous)


def check_sampler_precisions(config: RunConfig, device: torch.device) -> None:
    """The preview and validation samplers a run uses must run on its device (fp16 passes the settings' check on a
    GPU machine training on its CPU), found before the run is written rather than at the first preview."""
    used = {"preview.sampler": config.preview.sampler if config.train.sample_every else None,
            "validation.sampler": config.validation.sampler if config.validation.every else None}
    for key, sampler in used.items():
        if sampler is not None:
            resolved_precision(sampler.precision, device, f"{key}.precision")


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run goes into a new or empty folder; --resume needs a run with a checkpoint."""
    has_ckpt = (run_dir / "checkpoints" / "latest.json").exists()
    output_dir(run_dir)
    if has_ckpt and not resume:
        raise CheckpointError(f"{run_dir} already holds a trained run; pass --resume to continue it or choose "
                              "another --out")
    if resume and not has_ckpt:
        raise CheckpointError(f"{run_dir}: nothing to resume (no checkpoints/latest.json)")
    own = {"model.json", "config.yaml", "samples", "log.csv", "checkpoints", "latents", "validation.csv", "loss.png",
           "tensorboard"}
    # a run is never replaced whole, so a hidden folder (.ipynb_checkpoints) may stay beside it too
    others = other_files(run_dir, lambda p: p.name in own or p.name.startswith("."))
    if not resume and others:
        raise ConfigError(f"--out {run_dir}: exists and holds other files ({few(others)}); a new run needs a new "
                          "or empty folder")


def train(config: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
          train_set: ImageSet | None = None, cpu: bool = False, changes: list[str] | None = None) -> dict[str, Any]:
    """Train a denoiser into `run_dir`; returns a summary. Launch under torchrun for several processes.
    `cpu` keeps a GPU machine's GPU idle; `changes` are lines saying what a resume changed."""
    try:
        return Trainer(config, run_dir, resume, progress, train_set, cpu).run(changes)
    except BaseException:
        # a process group still alive at interpreter exit can abort the process ("terminate called without an
        # active exception", status -6) after the error was printed, instead of exiting with status 2
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise


