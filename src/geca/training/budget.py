"""The time budget (`train.max_minutes`): training stops where one more step and the final checkpoint, preview and
validation would no longer fit, each as long as it took so far or, before the first, as estimated."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from geca.config import RunConfig
from geca.sampling.config import SamplerConfig
from geca.sampling.samplers import autocast_dtype

# Until a checkpoint has been timed, writing one (fp32 weights, their EMA and AdamW's two moments, then hashing them)
# is guessed at a slow disk's speed.
CHECKPOINT_BYTES_PER_PARAMETER, SLOW_DISK_BYTES_PER_S = 16, 100e6
# (images, sampler, autocast dtype): one guided denoiser call of the EMA model, as a preview or validation makes it
GuidedCall = Callable[[int, SamplerConfig, "torch.dtype | None"], None]


class Budget:
    """One invocation's budget (a resumed run gets it afresh): what the periodic work took, and timed denoiser calls
    for the estimates before the first preview or validation."""

    def __init__(self, config: RunConfig, n_parameters: int, num_classes: int, validating: bool, previewing: bool,
                 device: torch.device, guided_call: GuidedCall) -> None:
        self.config, self.n_parameters, self.num_classes = config, n_parameters, num_classes
        self.validating, self.previewing, self.device, self.guided_call = validating, previewing, device, guided_call
        self.calls: dict[tuple[int, torch.dtype | None, bool], float] = {}  # see call_s
        self.start()

    def start(self) -> None:
        self.t_start, self.step_s = time.time(), 0.0
        self.work_s: dict[str, float] = {}

    def elapsed_s(self) -> float:
        return time.time() - self.t_start

    def timed(self, work: str, run: Callable[[], None]) -> None:
        """Run periodic work, keeping the longest time it took: its final turn must fit in the budget too."""
        started = time.time()
        run()
        self.work_s[work] = max(self.work_s.get(work, 0.0), time.time() - started)

    def over(self) -> bool:
        """Whether one more step (timed as the last one), then the final work, would overrun the budget."""
        budget = self.config.train.max_minutes
        return budget is not None and self.elapsed_s() + self.step_s + self.final_work_s() > budget * 60

    @property
    def checkpoint_guess_s(self) -> float:
        return CHECKPOINT_BYTES_PER_PARAMETER * self.n_parameters / SLOW_DISK_BYTES_PER_S

    def final_work_s(self) -> float:
        """What the final checkpoint, preview and validation will take: the longest of each seen so far or, before
        the first, an estimate: a checkpoint's bytes at a slow disk's speed; sampling as one timed denoiser call per
        sampler step and batch."""
        need = self.work_s.get("checkpoint", self.checkpoint_guess_s)
        if self.previewing and self.config.train.sample_every and self.preview_kept_back():
            need += self.preview_s()
        return need + self.validation_s()

    def preview_kept_back(self) -> bool:
        """A budget is for training: a final preview of more than half of it is not kept back in it (it is drawn at
        the end only where it still fits: `preview_skipped`)."""
        budget = self.config.train.max_minutes
        return budget is None or self.preview_s() <= budget * 30

    def preview_skipped(self, step: int, final: bool, checkpointed: bool) -> bool:
        """A preview not kept back runs only where it still fits with the work after it (`after_preview`)."""
        if self.preview_kept_back():
            return False
        left = self.config.train.max_minutes * 60 - self.elapsed_s()
        return self.preview_s() + sum(self.after_preview(step, final, checkpointed).values()) > left

    def after_preview(self, step: int, final: bool, checkpointed: bool) -> dict[str, float]:
        """What must still run after a preview at step `step` (what → seconds): after the final one, the final
        validation unless that step validated; after a periodic one, a validation (due now or at the end) and,
        unless that step was checkpointed (then a run that stops there writes none), the final checkpoint."""
        after = {}
        if self.validating and (not final or step % self.config.validation.every):
            after["the final validation" if final else "a validation"] = self.validation_s()
        if not final and not checkpointed:
            after["the final checkpoint"] = self.work_s.get("checkpoint", self.checkpoint_guess_s)
        return after

    def preview_s(self) -> float:
        """What a preview took (the longest so far) or, before the first, will take."""
        if "preview" in self.work_s:
            return self.work_s["preview"]
        pc = self.config.preview
        return self.call_s(min(self.num_classes, pc.max_classes) * pc.per_class, pc.sampler) * pc.sampler.steps

    def validation_s(self) -> float:
        """What a validation took (the longest so far) or, before the first, will take; 0 where there is none."""
        if not self.validating:
            return 0.0
        if "validation" in self.work_s:
            return self.work_s["validation"]
        v = self.config.validation
        batches, last = divmod(v.num_samples, v.batch_size)
        return v.sampler.steps * (batches * self.call_s(v.batch_size, v.sampler) +
                                  (self.call_s(last, v.sampler) if last else 0.0))

    def call_s(self, images: int, sampler: SamplerConfig) -> float:
        """One guided call on `images` images as `sampler` makes it, timed once per shape and precision. Measured
        rather than derived from the training step: an fp32 call after bf16 training, CFG's doubled batch and the batch
        size each change it by more than a rule of thumb could say. The second of two calls counts: the first may set
        up kernels."""
        dtype = autocast_dtype(sampler.precision, self.device)
        key = (images, dtype, sampler.guidance_scale != 1)
        if key not in self.calls:
            for _ in range(2):
                started = time.time()
                self.guided_call(images, sampler, dtype)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.calls[key] = time.time() - started
        return self.calls[key]
