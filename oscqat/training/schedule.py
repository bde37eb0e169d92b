"""QATSchedule: anneals the freezing threshold and the dampening strength, and arms tracking once per step."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..nn import step_hook, weight_check
from ..nn.config import QATConfig
from ..nn.layers import quant_layers, quantizers, weight_quantizers
from ..nn.wrappers import prepared, prepared_config
from ..ops.library import at_floor


def arm_tracking(model: nn.Module) -> None:
    """Make the next training forward the step's first one for every quantizer: weights are tracked in it, and
    inputs, weights and scales checked for NaN/Inf. Every `torch.optim` optimizer step that holds the model's
    weights or scales already does this (oscqat/nn/step_hook.py); call it yourself with another kind of update.
    It also accepts the weights as they are now (oscqat/nn/weight_check.py)."""
    model = prepared(model, "arm_tracking")
    for q in quantizers(model):
        q.arm()
    weight_check.record((m for _, m in quant_layers(model)), force=True)


def scales_at_floor(model: nn.Module) -> torch.Tensor:
    """How many learned scale values sit at their floor `scale_min` (docs/semantics.md): a 0-d int64 device
    tensor, no sync. Many of them means scales are being pushed towards zero (learning rate too high for them).
    `model`: prepared, or its DDP / FSDP / torch.compile wrapper."""
    model = prepared(model, "scales_at_floor")
    counts = [at_floor(q.scale, q.scale_min).sum() for q in quantizers(model)]
    if not counts:
        return torch.zeros((), dtype=torch.int64)
    return torch.stack(counts).sum()


def cosine_ramp(step: int, total: int, warmup: float) -> float:
    """0 until `warmup * total`, then (1 - cos) / 2 rising from 0 to 1 at `total` (as CosineTempDecay)."""
    start = warmup * total
    if step < start or total <= 0:
        return 0.0
    u = min(1.0, (step - start) / max(1e-12, total - start))
    return 0.5 * (1.0 - math.cos(math.pi * u))


class QATSchedule:
    """Step once per optimizer step, from any plain PyTorch loop:

        sched = QATSchedule(model, total_steps)
        for x, y in data:
            loss = F.cross_entropy(model(x), y) + sched.lam * oscqat.dampening_loss(model)
            loss.backward(); opt.step(); opt.zero_grad(); sched.step()

    f_th goes by a cosine from `freeze_start` to `freeze_end` after the warm-up (freezing off before it);
    lam from 0 to `damp_lambda` by the same shape.

    `model`: the prepared model or its DDP / FSDP / torch.compile wrapper; `config` defaults to the QATConfig
    `oscqat.prepare` recorded on it (a model without one is an error, not a default)."""

    def __init__(self, model: nn.Module, total_steps: int, config: QATConfig | None = None):
        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"QATSchedule: total_steps must be a positive integer, got {total_steps!r}")
        self.model = prepared(model, "QATSchedule")
        self.config = config if config is not None else prepared_config(self.model, "QATSchedule")
        if not isinstance(self.config, QATConfig):
            raise TypeError(f"QATSchedule: config must be a QATConfig, got {type(self.config).__name__}")
        self.total_steps = total_steps
        self.step_count = 0
        self._apply()

    @property
    def ramp(self) -> float:
        return cosine_ramp(self.step_count, self.total_steps, self.config.warmup)

    @property
    def freeze_threshold(self) -> float:
        c = self.config
        if not c.freeze or self.step_count < c.warmup * self.total_steps:
            return 0.0
        return c.freeze_end + (c.freeze_start - c.freeze_end) * (1.0 - self.ramp)

    @property
    def lam(self) -> float:
        return self.config.damp_lambda * self.ramp if self.config.dampen else 0.0

    def _apply(self) -> None:
        f_th = self.freeze_threshold
        for q in weight_quantizers(self.model):
            if q.freeze:
                q.freeze_threshold.fill_(f_th)

    def step(self) -> None:
        """After `optimizer.step()`: advances the schedules, arms the next forward, projects scales onto
        their floor (sync-free)."""
        self.step_count += 1
        self._apply()
        step_hook.after_step(quantizers(self.model))
        weight_check.record(m for _, m in quant_layers(self.model))

    @property
    def scales_at_floor(self) -> torch.Tensor:
        """0-d device tensor: how many scale values sit at their floor (see `oscqat.scales_at_floor`)."""
        return scales_at_floor(self.model)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.total_steps = int(state["total_steps"])
        self._apply()
