"""EMA of a QAT model's weights and quantizer scales (Gupta & Asthana, 2023): evaluate and export the averaged
model, which smooths the last steps' oscillations of latent weights and scales."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..nn.wrappers import unwrap


class QATModelEMA:
    """`ema = QATModelEMA(model)`; after each optimizer step `ema.update(model)`; evaluate `ema.model`.

    Floating-point parameters (weights, biases, scales, offsets) are averaged with `decay`, ramped up as
    (1 + k) / (10 + k) over the first updates so early averages are not dominated by the initial model.
    Buffers (BatchNorm statistics, oscillation state: frozen weights and their integers) are copied, not averaged:
    the averaged model freezes exactly what the trained one froze."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"QATModelEMA: decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(unwrap(model)).eval()     # the module inside a DDP / torch.compile wrapper
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model = unwrap(model)
        src = dict(model.named_parameters())
        pairs = [(p, src[name].detach()) for name, p in self.model.named_parameters()
                 if p.is_floating_point()]
        if pairs:
            ema_p, new_p = zip(*pairs)
            torch._foreach_lerp_(list(ema_p), list(new_p), 1.0 - self.current_decay)
        src_buf = dict(model.named_buffers())
        for name, b in self.model.named_buffers():
            b.copy_(src_buf[name])
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
