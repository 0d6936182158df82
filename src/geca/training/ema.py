"""Exponential moving average of the weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """DiT's EMA rule; with `warmup` the decay ramps as min(decay, (1+n)/(10+n)) so short CPU runs get a usable EMA."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup

    def current_decay(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.current_decay(step))
