"""`prepare`: swap every Conv/Linear of a model for its quantized twin and initialise the scales."""
from __future__ import annotations

import fnmatch
import itertools
import math
import warnings
from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..ops.library import at_floor
from . import weight_batch
from .batchnorm import RUNNING_STATS
from .config import QATConfig
from .graph import Flow, fx_flow, traced_flow
from .layers import FLOAT_TO_QUANT, _QuantLayer, quant_layers, weight_quantizers
from .quantizers import QuantAct
from .summary import PrepareSummary
from .wrappers import exclude_state_from_ddp

_GRID = 100                      # MSE grid-search candidates, as the paper's range estimation
_MAX_ACT_SAMPLES = 1 << 16       # activation values kept per quantizer for the MSE search


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
    matched by `config.skip` and whose weight trains becomes a QuantConv1d/QuantConv2d/QuantLinear; the input
    and output layers, found from the data flow (QATConfig docstring), get `config.first_last_bits`. A subclass
    that overrides `forward` stays in float with a warning (its forward cannot be reproduced). Weight scales are
    initialised from the weights (`config.weight_init`); activation scales and grids from `calib_data` (an
    iterable of input batches or (input, target) pairs; a detector's batch is (list of images, targets)), else
    from the first training batch. What was done is in `model.oscqat_summary` (printed when `verbose`).

    Build the optimizer after `prepare`: the scales are new parameters. Wrap the result in DDP or FSDP2 after
    `prepare` (docs/semantics.md, "Distributed"): `prepare` marks the oscqat buffers for DDP to leave alone."""
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
        if not m.weight.requires_grad and not config.quantize_frozen_layers:
            summary.skipped.append((name, type(m).__name__, "its weight does not train (requires_grad=False): a "
                                    "fixed layer; QATConfig.quantize_frozen_layers=True quantizes it"))
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
    raw = None if calib_data is None else list(itertools.islice(calib_data, config.calib_batches))
    batches = None if raw is None else list(_batches(raw, len(raw)))
    if batches == []:
        raise ValueError("oscqat.prepare: calib_data yielded no batch")
    flow = _data_flow(model, targets, config, batches)
    names = [name for name, _, _ in targets]
    summary.first = flow.first if config.first_layers is None else _named(config.first_layers, names, "first_layers")
    if config.first_last_bits is not None:
        summary.last = flow.last if config.last_layers is None else _named(config.last_layers, names, "last_layers")
        summary.edges_from = "QATConfig" if config.first_layers is not None and config.last_layers is not None \
            else flow.how
    edge = set(summary.first) | set(summary.last)
    for name, m, cls in targets:
        bits = config.first_last_bits if name in edge else None
        q = cls.from_float(m, config, weight_bits=bits, act_bits=bits, name=name)
        _copy_hooks(m, q)
        _set_submodule(model, name, q)
        summary.swapped.append((name, type(m).__name__, q))
    summary.fallbacks += init_weight_scales(model, config.weight_init)
    if batches is not None and config.quantize_activations:
        summary.fallbacks += calibrate_activations(model, raw, len(raw), config.act_init,
                                                   config.asym_act_tail, flow.after, summary.asymmetric)
        summary.calibration = (f"{len(batches)} batch(es), BatchNorm normalising by batch statistics as in "
                               f"training (running statistics left as they were)")
    if not config.learn_input_scale:
        summary.fixed_input_scales = fix_input_scales(model, summary.first)
    if config.batch_weights:
        weight_batch.attach(model)
    model._oscqat_config = config
    model.oscqat_summary = summary
    exclude_state_from_ddp(model)      # DDP(model) does not broadcast the tracking state (docs/semantics.md)
    if verbose:
        print(summary.short())
    return model


def fix_input_scales(model: nn.Module, first: list[str]) -> list[str]:
    """QATConfig.learn_input_scale=False: the input quantizers of the input layers `first` keep their range
    (requires_grad False, so that DDP and the optimizers see a fixed parameter, not an unused one)."""
    fixed = []
    for name in first:
        q = model.get_submodule(name).input_quant
        if q is not None:
            for p in (q.scale, q.offset):
                if p is not None:
                    p.requires_grad_(False)
            fixed.append(q.layer_name)
    return fixed


def _named(patterns, names: list[str], field: str) -> list[str]:
    found = []
    for pat in patterns:
        hit = [n for n in names if fnmatch.fnmatch(n, pat)]
        if not hit:
            raise ValueError(f"oscqat.prepare: QATConfig.{field} pattern {pat!r} matches no quantized layer "
                             f"(they are named like {', '.join(names[:3])}, ...)")
        found += hit
    return list(dict.fromkeys(found))


def _data_flow(model: nn.Module, targets, config: QATConfig, batches) -> Flow:
    """Input/output layers and the activation type feeding each layer, from the float model."""
    layers = {name: m for name, m, _ in targets}
    if batches and (config.first_last_bits is not None or config.quantize_activations):
        with batch_statistics(model):
            return traced_flow(model, layers, batches[0])
    if config.first_last_bits is None or (config.first_layers is not None and config.last_layers is not None):
        return Flow([], [], how="")
    try:
        return fx_flow(model, layers)
    except Exception as e:   # torch.fx fails in many ways on Python control flow; the summary names it
        names = list(layers)
        return Flow(names[:1], names[-1:], how=f"module order: no calib_data to trace a forward with, and torch.fx "
                                               f"cannot trace the model ({type(e).__name__})")


@contextmanager
def batch_statistics(model: nn.Module):
    """Eval mode with every BatchNorm normalising by batch statistics, as the training forward will: a BN's
    running statistics may not match the data yet (a fresh model, a new domain, momentum 0.03), and ranges
    calibrated on them are ones QAT never sees. Running statistics and modes are restored on exit."""
    modes = {m: m.training for m in model.modules()}
    bns = [m for m in model.modules() if isinstance(m, RUNNING_STATS)]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in bns]
    try:
        model.eval()
        for m in bns:
            m.train()
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(bns, saved):
                for k, b in m.named_buffers(recurse=False):
                    b.copy_(buffers[k])
        for m, mode in modes.items():
            m.training = mode


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
        low = int(at_floor(s, q.scale_min).sum())
        if low:
            notes.append((q.layer_name, f"{low} scale(s) at or below scale_min={q.scale_min:g}, set to it"))
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
def calibrate_activations(model: nn.Module, data: Iterable, num_batches: int = 8, method: str = "mse",
                          asym_tail: float = 0.0, after: dict[str, str] | None = None,
                          asymmetric: list | None = None) -> list[tuple[str, str]]:
    """Run float batches through `model` (quantizers bypassed, BatchNorm as in `batch_statistics`) and set each
    QuantAct's grid and scale: unsigned when every input was >= 0 (e.g. after ReLU); unsigned with a learned
    offset starting at the minimum when the inputs dip below zero by at most `asym_tail` times their maximum or
    the layer is fed by an activation named in `after` (layer -> type, e.g. SiLU), recorded in `asymmetric` as
    (quantizer, why); signed otherwise. Returns (layer, note) for fallbacks."""
    after = after or {}
    acts = [(name, m.input_quant) for name, m in quant_layers(model) if m.input_quant is not None]
    samples: dict[int, list[torch.Tensor]] = {id(a): [] for _, a in acts}
    lo: dict[int, float] = {}
    hi: dict[int, float] = {}
    saved = {id(a): a.forward for _, a in acts}

    def recorder(a: QuantAct):
        def fwd(x):
            flat = x.detach().float().flatten()
            if not bool(torch.isfinite(flat).all()):
                raise ValueError(f"oscqat.prepare: the calibration forward gives {int((~torch.isfinite(flat)).sum())}"
                                 f" NaN/Inf values at {a.layer_name} (the first quantized layer to see them), "
                                 f"from finite calibration data")
            lo[id(a)] = min(lo.get(id(a), math.inf), flat.min().item())
            hi[id(a)] = max(hi.get(id(a), -math.inf), flat.max().item())
            keep = max(1, _MAX_ACT_SAMPLES // max(1, num_batches))
            if flat.numel() > keep:
                flat = flat[torch.randperm(flat.numel(), device=flat.device)[:keep]]
            samples[id(a)].append(flat)
            return x
        return fwd

    quantizers = weight_quantizers(model)
    armed = [q.armed for q in quantizers]
    try:
        for _, a in acts:
            a.forward = recorder(a)
        seen = 0
        with batch_statistics(model):
            for x in _batches(data, num_batches):
                model(x)
                seen += 1
        if seen == 0:
            raise ValueError("oscqat.prepare: calib_data yielded no batch")
    finally:
        for _, a in acts:
            a.forward = saved[id(a)]
        for q, a in zip(quantizers, armed):
            q.armed = a
    notes = []
    for name, a in acts:
        if not samples[id(a)]:
            notes.append((a.layer_name, "not reached by the calibration forward: scale from its first batch"))
            continue
        v = torch.cat(samples[id(a)])
        low, high = lo[id(a)], hi[id(a)]
        why = None
        if low < 0 < asym_tail:
            why = f"after {after[name]}" if name in after else \
                f"min {low:.3g} >= -{asym_tail:g} * max {high:.3g}" if -low <= asym_tail * high else None
        a.signed = low < 0 and why is None
        if why is not None:
            if a.offset is None:
                a.offset = nn.Parameter(torch.zeros(1, device=a.scale.device))
            a.offset.fill_(low)
            v = v - low
            if asymmetric is not None:
                asymmetric.append((a.layer_name, why))
        s = _act_scale(v, a.qmin, a.qmax, method)
        if not bool(v.abs().max() > 0):
            notes.append((a.layer_name, "all calibration inputs were 0: scale for the range [0, 1]"))
        elif bool(at_floor(s, a.scale_min)):
            notes.append((a.layer_name, f"scale {float(s):.3g} at or below scale_min={a.scale_min:g}, set to it"))
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
