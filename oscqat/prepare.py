"""`prepare`: swap every Conv/Linear of a model for its quantized twin and initialise the scales."""
from __future__ import annotations

import fnmatch
import math
from typing import Iterable

import torch
from torch import nn

from .config import QATConfig
from .layers import FLOAT_TO_QUANT, _QuantLayer
from .quantizers import QuantAct, WeightQuantizer

_GRID = 100                      # MSE grid-search candidates, as the paper's range estimation
_MAX_ACT_SAMPLES = 1 << 16       # activation values kept per quantizer for the MSE search


def quant_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _QuantLayer)]


def weight_quantizers(model: nn.Module) -> list[WeightQuantizer]:
    return [m for m in model.modules() if isinstance(m, WeightQuantizer)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def prepare(model: nn.Module, config: QATConfig | None = None, calib_data: Iterable | None = None) -> nn.Module:
    """Quantize `model` in place (and return it): every nn.Conv1d/Conv2d/Linear not matched by `config.skip`
    becomes a QuantConv1d/QuantConv2d/QuantLinear; the first and last get `config.first_last_bits`.
    Weight scales are initialised from the weights (`config.weight_init`); activation scales and signedness
    from `calib_data` (an iterable of input batches or (input, target) pairs), else from the first
    training batch."""
    config = config or QATConfig()
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) in FLOAT_TO_QUANT and not any(fnmatch.fnmatch(name, pat) for pat in config.skip)]
    if not targets:
        raise ValueError("oscqat.prepare: the model has no nn.Conv1d/Conv2d/Linear layer to quantize")
    edge = {targets[0][0], targets[-1][0]}
    for name, m in targets:
        bits = config.first_last_bits if name in edge and config.first_last_bits is not None else None
        q = FLOAT_TO_QUANT[type(m)].from_float(m, config, weight_bits=bits, act_bits=bits, name=name)
        _set_submodule(model, name, q)
    init_weight_scales(model, config.weight_init)
    if calib_data is not None and config.quantize_activations:
        calibrate_activations(model, calib_data, config.calib_batches, config.act_init)
    model._oscqat_config = config
    return model


@torch.no_grad()
def weight_scale(w: torch.Tensor, qmin: int, qmax: int, per_channel: bool, method: str = "mse") -> torch.Tensor:
    """Initial scale(s) for `w`: MSE grid search over clipping ranges, LSQ's 2*mean|w|/sqrt(p), or min-max."""
    wf = w.detach().float().reshape(w.shape[0] if per_channel else 1, -1)
    maxabs = wf.abs().amax(dim=1).clamp_min(1e-8)
    if method == "minmax":
        return maxabs / qmax
    if method == "lsq":
        return (2 * wf.abs().mean(dim=1) / math.sqrt(qmax)).clamp_min(1e-8)
    return _mse_search(wf, maxabs / qmax, qmin, qmax)


def _mse_search(values: torch.Tensor, top: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Per row of `values`, the scale among `top * k / _GRID` (k = 1.._GRID) with the least squared error."""
    best_err = torch.full_like(top, float("inf"))
    best = top.clone()
    for k in range(1, _GRID + 1):
        s = (top * (k / _GRID)).clamp_min(1e-10)[:, None]
        err = ((torch.round(values / s).clamp(qmin, qmax) * s - values) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s[:, 0], best)
    return best


@torch.no_grad()
def init_weight_scales(model: nn.Module, method: str = "mse") -> None:
    for _, layer in quant_layers(model):
        q = layer.weight_quant
        q.scale.copy_(weight_scale(layer.weight, q.qmin, q.qmax, q.per_channel, method))


def _batches(data: Iterable, limit: int):
    for i, batch in enumerate(data):
        if i >= limit:
            return
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def calibrate_activations(model: nn.Module, data: Iterable, num_batches: int = 8, method: str = "mse") -> None:
    """Run float batches through `model` (quantizers bypassed) and set each QuantAct's signedness (unsigned when
    every calibration input was >= 0, e.g. after ReLU) and scale."""
    acts = [(name, m.input_quant) for name, m in quant_layers(model) if m.input_quant is not None]
    samples: dict[int, list[torch.Tensor]] = {id(a): [] for _, a in acts}
    mins: dict[int, float] = {}
    saved = {id(a): a.forward for _, a in acts}

    def recorder(a: QuantAct):
        def fwd(x):
            flat = x.detach().float().flatten()
            mins[id(a)] = min(mins.get(id(a), math.inf), flat.min().item())
            keep = max(1, _MAX_ACT_SAMPLES // max(1, num_batches))
            if flat.numel() > keep:
                flat = flat[torch.randperm(flat.numel(), device=flat.device)[:keep]]
            samples[id(a)].append(flat)
            return x
        return fwd

    was_training = model.training
    quantizers = weight_quantizers(model)
    armed = [q.armed for q in quantizers]
    try:
        for _, a in acts:
            a.forward = recorder(a)
        model.eval()
        seen = 0
        for x in _batches(data, num_batches):
            model(x)
            seen += 1
        if seen == 0:
            raise ValueError("oscqat.prepare: calib_data yielded no batch")
    finally:
        for _, a in acts:
            a.forward = saved[id(a)]
        model.train(was_training)
        for q, a in zip(quantizers, armed):
            q.armed = a
    for name, a in acts:
        if not samples[id(a)]:
            continue   # layer not reached by the calibration forward: initialised from its first batch
        v = torch.cat(samples[id(a)])
        a.signed = mins[id(a)] < 0
        a.scale.copy_(_act_scale(v, a.qmin, a.qmax, method))
        a.initialized = True


def _act_scale(v: torch.Tensor, qmin: int, qmax: int, method: str) -> torch.Tensor:
    top = v.abs().max().clamp_min(1e-8).reshape(1)
    if method == "minmax":
        return top / qmax
    if method == "lsq":
        return (2 * v.abs().mean() / math.sqrt(qmax)).clamp_min(1e-8).reshape(1)
    return _mse_search(v.reshape(1, -1), top / qmax, qmin, qmax)
