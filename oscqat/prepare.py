"""`prepare`: swap every Conv/Linear of a model for its quantized twin and initialise the scales."""
from __future__ import annotations

import fnmatch
import math
import warnings
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .bn import _BN
from .config import QATConfig
from .layers import FLOAT_TO_QUANT, _QuantLayer
from .quantizers import QuantAct, WeightQuantizer
from .summary import PrepareSummary

_GRID = 100                      # MSE grid-search candidates, as the paper's range estimation
_MAX_ACT_SAMPLES = 1 << 16       # activation values kept per quantizer for the MSE search


def quant_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _QuantLayer)]


def weight_quantizers(model: nn.Module) -> list[WeightQuantizer]:
    return [m for m in model.modules() if isinstance(m, WeightQuantizer)]


def quantizers(model: nn.Module) -> list[nn.Module]:
    """Every WeightQuantizer and QuantAct of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, (WeightQuantizer, QuantAct))]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


_FLOAT_BASES = tuple(FLOAT_TO_QUANT)
# Subclasses whose overridden forward is, outside TorchScript, exactly their base class's.
_SAME_FORWARD = {"timm.layers.linear.Linear"}


def _swap_target(m: nn.Module):
    """(quantized class, None) when `m` can be swapped exactly, (None, reason) when it stays in float."""
    base = next(b for b in _FLOAT_BASES if isinstance(m, b))
    cls = type(m)
    qualname = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(m.weight, nn.parameter.UninitializedParameter):
        return None, "lazy module not initialised yet (run one forward before prepare)"
    if parametrize.is_parametrized(m) or hasattr(m, "weight_g") or hasattr(m, "weight_orig"):
        return None, "its weight is reparametrised (weight/spectral norm or a parametrization)"
    if cls is not base and qualname not in _SAME_FORWARD:
        overridden = [f for f in ("forward", "_conv_forward") if hasattr(base, f)
                      and getattr(cls, f) is not getattr(base, f)]
        if overridden:
            return None, (f"{cls.__name__} overrides {base.__name__}.{overridden[0]}, which oscqat cannot "
                          f"reproduce")
    return FLOAT_TO_QUANT[base], None


def _copy_hooks(src: nn.Module, dst: nn.Module) -> None:
    for attr in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
                 "_backward_hooks"):
        hooks = getattr(src, attr, None)
        if hooks:
            getattr(dst, attr).update(hooks)


def prepare(model: nn.Module, config: QATConfig | None = None, calib_data: Iterable | None = None,
            verbose: bool = True) -> nn.Module:
    """Quantize `model` in place (and return it): every nn.Conv1d/Conv2d/Linear, subclasses included, not
    matched by `config.skip` becomes a QuantConv1d/QuantConv2d/QuantLinear; the first and last get
    `config.first_last_bits`. A subclass that overrides `forward` stays in float with a warning (its forward
    cannot be reproduced). Weight scales are initialised from the weights (`config.weight_init`); activation
    scales and signedness from `calib_data` (an iterable of input batches or (input, target) pairs), else from
    the first training batch. What was done is in `model.oscqat_summary` (printed when `verbose`).

    Build the optimizer after `prepare`: the scales are new parameters."""
    config = config or QATConfig()
    already = [name for name, m in model.named_modules() if isinstance(m, _QuantLayer)]
    if already:
        raise ValueError(f"oscqat.prepare: this model is already prepared ({len(already)} quantized layers, e.g. "
                         f"{already[0]!r}); call prepare once, on the float model")
    summary = PrepareSummary(config)
    targets = []
    for name, m in model.named_modules():
        if not isinstance(m, _FLOAT_BASES):
            continue
        if any(fnmatch.fnmatch(name, pat) for pat in config.skip):
            summary.skipped.append((name, type(m).__name__, "matched QATConfig.skip"))
            continue
        cls, reason = _swap_target(m)
        if cls is None:
            summary.skipped.append((name, type(m).__name__, reason))
            warnings.warn(f"oscqat.prepare: {name} ({type(m).__name__}) stays in float: {reason}; add it to "
                          f"QATConfig.skip to silence this", stacklevel=2)
            continue
        targets.append((name, m, cls))
    if not targets:
        raise ValueError("oscqat.prepare: the model has no nn.Conv1d/Conv2d/Linear layer to quantize"
                         + (f" ({len(summary.skipped)} left in float: {summary.skipped[0][2]})"
                            if summary.skipped else ""))
    edge = {targets[0][0], targets[-1][0]}
    for name, m, cls in targets:
        bits = config.first_last_bits if name in edge and config.first_last_bits is not None else None
        q = cls.from_float(m, config, weight_bits=bits, act_bits=bits, name=name)
        _copy_hooks(m, q)
        _set_submodule(model, name, q)
        summary.swapped.append((name, type(m).__name__, q))
    summary.fallbacks += init_weight_scales(model, config.weight_init)
    if calib_data is not None and config.quantize_activations:
        summary.fallbacks += calibrate_activations(model, calib_data, config.calib_batches, config.act_init)
    model._oscqat_config = config
    model.oscqat_summary = summary
    if verbose:
        print(summary.short())
    return model


@torch.no_grad()
def weight_scale(w: torch.Tensor, qmin: int, qmax: int, per_channel: bool, method: str = "mse") -> torch.Tensor:
    """Initial scale(s) for `w`: MSE grid search over clipping ranges, LSQ's 2*mean|w|/sqrt(p), or min-max.
    An all-zero row (a zero-initialised layer) gets the range of PyTorch's default init, 1/sqrt(fan_in)."""
    wf = w.detach().float().reshape(w.shape[0] if per_channel else 1, -1)
    maxabs = wf.abs().amax(dim=1)
    fallback = torch.full_like(maxabs, 1.0 / math.sqrt(max(1, w[0].numel())) / qmax)
    if method == "minmax":
        s = maxabs / qmax
    elif method == "lsq":
        s = 2 * wf.abs().mean(dim=1) / math.sqrt(qmax)
    else:
        s = _mse_search(wf, maxabs.clamp_min(1e-30) / qmax, qmin, qmax)
    return torch.where(maxabs > 0, s, fallback)


def _mse_search(values: torch.Tensor, top: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Per row of `values`, the scale among `top * k / _GRID` (k = 1.._GRID) with the least squared error."""
    best_err = torch.full_like(top, float("inf"))
    best = top.clone()
    for k in range(1, _GRID + 1):
        s = (top * (k / _GRID))[:, None]
        err = ((torch.round(values / s).clamp(qmin, qmax) * s - values) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s[:, 0], best)
    return best


@torch.no_grad()
def init_weight_scales(model: nn.Module, method: str = "mse") -> list[tuple[str, str]]:
    """Set every weight scale; returns (layer, note) for the scales that needed a fallback."""
    notes = []
    for name, layer in quant_layers(model):
        q = layer.weight_quant
        w = layer.weight
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"oscqat.prepare: {name}.weight holds {int((~torch.isfinite(w)).sum())} NaN/Inf "
                             f"values")
        s = weight_scale(w, q.qmin, q.qmax, q.per_channel, method)
        zero = int((w.detach().reshape(s.numel(), -1).abs().amax(dim=1) == 0).sum())
        if zero:
            notes.append((q.layer_name, f"{zero} all-zero row(s): scale from the default init range"))
        low = int((s < q.scale_min).sum())
        if low:
            notes.append((q.layer_name, f"{low} scale(s) below scale_min={q.scale_min:g}, raised to it"))
        q.scale.copy_(s.clamp_min(q.scale_min))
    return notes


def _batches(data: Iterable, limit: int):
    for i, batch in enumerate(data):
        if i >= limit:
            return
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if torch.is_tensor(x) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"oscqat.prepare: calibration batch {i} holds {int((~torch.isfinite(x)).sum())} "
                             f"NaN/Inf values")
        yield x


@torch.no_grad()
def calibrate_activations(model: nn.Module, data: Iterable, num_batches: int = 8,
                          method: str = "mse") -> list[tuple[str, str]]:
    """Run float batches through `model` (quantizers bypassed) and set each QuantAct's signedness (unsigned when
    every calibration input was >= 0, e.g. after ReLU) and scale. BatchNorm normalises with batch statistics,
    as in the training forward that follows (a freshly initialised BN's running statistics would give ranges
    QAT never sees); its running statistics are left untouched. Returns (layer, note) for fallbacks."""
    acts = [(name, m.input_quant) for name, m in quant_layers(model) if m.input_quant is not None]
    samples: dict[int, list[torch.Tensor]] = {id(a): [] for _, a in acts}
    mins: dict[int, float] = {}
    saved = {id(a): a.forward for _, a in acts}

    def recorder(a: QuantAct):
        def fwd(x):
            flat = x.detach().float().flatten()
            if not bool(torch.isfinite(flat).all()):
                raise ValueError(f"oscqat.prepare: the calibration forward gives {int((~torch.isfinite(flat)).sum())}"
                                 f" NaN/Inf values at {a.layer_name} (the first quantized layer to see them), "
                                 f"from finite calibration data")
            mins[id(a)] = min(mins.get(id(a), math.inf), flat.min().item())
            keep = max(1, _MAX_ACT_SAMPLES // max(1, num_batches))
            if flat.numel() > keep:
                flat = flat[torch.randperm(flat.numel(), device=flat.device)[:keep]]
            samples[id(a)].append(flat)
            return x
        return fwd

    modes = {m: m.training for m in model.modules()}
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    bn_buffers = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in bns]
    quantizers = weight_quantizers(model)
    armed = [q.armed for q in quantizers]
    try:
        for _, a in acts:
            a.forward = recorder(a)
        model.eval()
        for m in bns:
            m.train()
        seen = 0
        for x in _batches(data, num_batches):
            model(x)
            seen += 1
        if seen == 0:
            raise ValueError("oscqat.prepare: calib_data yielded no batch")
    finally:
        for _, a in acts:
            a.forward = saved[id(a)]
        for m, buffers in zip(bns, bn_buffers):
            for k, b in m.named_buffers(recurse=False):
                b.copy_(buffers[k])
        for m, mode in modes.items():
            m.training = mode
        for q, a in zip(quantizers, armed):
            q.armed = a
    notes = []
    for name, a in acts:
        if not samples[id(a)]:
            notes.append((a.layer_name, "not reached by the calibration forward: scale from its first batch"))
            continue
        v = torch.cat(samples[id(a)])
        a.signed = mins[id(a)] < 0
        s = _act_scale(v, a.qmin, a.qmax, method)
        if not bool(v.abs().max() > 0):
            notes.append((a.layer_name, "all calibration inputs were 0: scale for the range [0, 1]"))
        elif bool(s < a.scale_min):
            notes.append((a.layer_name, f"scale {float(s):.3g} below scale_min={a.scale_min:g}, raised to it"))
        a.scale.copy_(s.clamp_min(a.scale_min))
        a.initialized = True
    return notes


def _act_scale(v: torch.Tensor, qmin: int, qmax: int, method: str) -> torch.Tensor:
    top = v.abs().max().reshape(1)
    if not bool(top > 0):
        return torch.full_like(top, 1.0 / qmax)
    if method == "minmax":
        return top / qmax
    if method == "lsq":
        return (2 * v.abs().mean() / math.sqrt(qmax)).reshape(1)
    return _mse_search(v.reshape(1, -1), top / qmax, qmin, qmax)
