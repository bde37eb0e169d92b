"""The QAT optimizers, built in one place (`oscqat train`, bench/experiments.py, bench/transition_evidence.py):

- weights and biases: SGD (momentum 0.9) or AdamW, with weight decay on the conv/linear weights (parameters with
  more than one dimension) and none on the rest (biases, BatchNorm), in two param groups in that order;
- the quantizers' learned scales and offsets: their own optimizer (Adam, or SGD), without weight decay;
- a cosine schedule over the run's steps for each (the weights' may be constant, or left to the caller, e.g. to
  `oscqat.TransitionRateSchedule`, which is built on the weights' optimizer afterwards).

Uses only oscqat's public API."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import oscqat

WEIGHT_OPTIMIZERS = ("sgd", "adamw")
SCALE_OPTIMIZERS = ("adam", "sgd")
WEIGHT_SCHEDULES = ("cosine", "constant", None)


def split_params(model: nn.Module):
    """(weights with weight decay: conv/linear weights, without: biases and the rest, quantizer scales/offsets),
    each in the model's parameter order."""
    qparams = set()
    for m in model.modules():
        if isinstance(m, (oscqat.WeightQuantizer, oscqat.QuantAct)):
            qparams.update(id(p) for p in m.parameters(recurse=False))
    decay, no_decay, quant = [], [], []
    for n, p in model.named_parameters():
        if id(p) in qparams:
            quant.append(p)
        elif p.dim() > 1:
            decay.append(p)
        else:
            no_decay.append(p)
    return decay, no_decay, quant


def weight_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The weights' two param groups: conv/linear weights with `weight_decay`, the rest without."""
    decay, no_decay, _ = split_params(model)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_sgd(model: nn.Module, lr: float, wd: float, nesterov: bool = False) -> torch.optim.SGD:
    """SGD (momentum 0.9) over the weights and biases of `model` (the quantizer scales left out)."""
    return torch.optim.SGD(weight_groups(model, wd), lr=lr, momentum=0.9, nesterov=nesterov)


class QATOptimizers(NamedTuple):
    opt_w: torch.optim.Optimizer                       # weights and biases
    opt_s: torch.optim.Optimizer | None                # quantizer scales/offsets; None when the model has none
    lr_w: torch.optim.lr_scheduler.LRScheduler | None  # None with weight_schedule=None
    lr_s: torch.optim.lr_scheduler.LRScheduler | None  # None when opt_s is


def qat_optimizers(model: nn.Module, lr: float, weight_decay: float, scale_lr: float, steps: int, *,
                   weights: str = "sgd", momentum: float = 0.9, scales: str = "adam",
                   weight_schedule: str | None = "cosine") -> QATOptimizers:
    """The optimizers and LR schedules of a QAT run of `steps` steps on a prepared `model`.

    weights: "sgd" (SGD, `momentum`) or "adamw" (AdamW, torch's defaults otherwise) at `lr`, two param groups:
    conv/linear weights with `weight_decay`, the rest with none. scales: "adam" (Adam at `scale_lr`, torch's
    defaults) or "sgd" (SGD at `scale_lr`, `momentum`), one group, no weight decay. weight_schedule: "cosine"
    (CosineAnnealingLR over `steps`), "constant", or None (no scheduler: the caller sets the weights' LR, e.g. a
    TransitionRateSchedule); the scales' LR is always cosine. Call lr_w.step() and lr_s.step() after each
    optimizer step."""
    if weights not in WEIGHT_OPTIMIZERS:
        raise ValueError(f"weights={weights!r}: expected one of {WEIGHT_OPTIMIZERS}")
    if scales not in SCALE_OPTIMIZERS:
        raise ValueError(f"scales={scales!r}: expected one of {SCALE_OPTIMIZERS}")
    if weight_schedule not in WEIGHT_SCHEDULES:
        raise ValueError(f"weight_schedule={weight_schedule!r}: expected one of {WEIGHT_SCHEDULES}")
    groups = weight_groups(model, weight_decay)
    quant = split_params(model)[2]
    opt_w = torch.optim.SGD(groups, lr=lr, momentum=momentum) if weights == "sgd" else \
        torch.optim.AdamW(groups, lr=lr)
    opt_s = None
    if quant:
        opt_s = torch.optim.Adam(quant, lr=scale_lr) if scales == "adam" else \
            torch.optim.SGD(quant, lr=scale_lr, momentum=momentum)
    lr_w = None
    if weight_schedule == "cosine":
        lr_w = torch.optim.lr_scheduler.CosineAnnealingLR(opt_w, steps)
    elif weight_schedule == "constant":
        lr_w = torch.optim.lr_scheduler.LambdaLR(opt_w, _constant)
    lr_s = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, steps) if opt_s is not None else None
    return QATOptimizers(opt_w, opt_s, lr_w, lr_s)


def _constant(_step: int) -> float:
    return 1.0
