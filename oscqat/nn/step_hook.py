"""What follows every optimizer step, so that a plain training loop gets it without asking:

- arm the step's first training forward (tracking and the finite check, docs/semantics.md);
- bound how far the step moved each scale down: a step may shrink a scale to `SCALE_KEEP` of its value at
  most, and never below the floor `scale_min` (as torch.ao's learnable fake-quant clamps to a floor);
- read the non-finite flags of the step's first forward, on accelerators one step late and without a sync;
- say so, once, when an optimizer steps the weights of quantized layers but no optimizer steps their scales
  (the optimizer was built before `oscqat.prepare`).

One global `torch.optim` step pre-hook (the bound, taken before the step) and post-hook do this for every
optimizer holding a quantizer's scale or a quantized layer's weight; `QATSchedule.step()` arms and applies the
floor for its model too (optimizers outside `torch.optim` get the floor, not the bound).
"""
from __future__ import annotations

import warnings
import weakref
from collections import defaultdict

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..errors import NonFiniteError, WeightChangedError
from . import weight_check

# A quantizer's 0-d int32 `fault` buffer holds what the checks of the step's first training forward found, read
# here after the optimizer step without a sync (docs/semantics.md, "Non-finite values", "Weights changed outside
# the optimizer"): 0 nothing, 1 a NaN or Inf (quantizers._nonfinite, the compiled activation backward), or this:
FAULT_WEIGHT_CHANGED = 2


_QUANTIZERS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()     # WeightQuantizer and QuantAct
_LAYERS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()         # QuantConv1d/2d, QuantLinear
_STEPPED_SCALES: dict[int, weakref.ref] = {}     # id -> weakref (tensors compare elementwise, not by identity)
_generation = 0
_order = 0
# An additive step larger than the scale itself (a fresh model's first SGD steps, Adam's lr-sized steps on a
# 1e-3 scale) would take a scale to the floor in one step: every weight then saturates, the layer's output is
# ~1e-6, the BatchNorm behind it divides by sqrt(eps) in backward and the gradients overflow. Halving at most
# keeps the layer alive; the scale can still fall geometrically over steps.
SCALE_KEEP = 0.5


def register(module: nn.Module, layer: bool = False) -> None:
    """Called from the quantizers' and layers' __init__ and __setstate__ (deep copies, unpickling)."""
    global _generation, _order
    (_LAYERS if layer else _QUANTIZERS).add(module)
    _order += 1
    module._oscqat_order = _order
    _generation += 1


class _Owned:
    """What one optimizer steps: its quantizers (in creation order, the proxy for forward order where the
    forward itself cannot raise) and the layers whose weights it holds."""

    def __init__(self, opt: torch.optim.Optimizer):
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        self.key = _key(opt)
        self.steps = 0
        self.warned = False
        quantizers = {q for q in _QUANTIZERS if id(q.scale) in ids}
        self.layers = sorted((m for m in _LAYERS if id(m.weight) in ids), key=lambda m: m._oscqat_order)
        for m in self.layers:
            quantizers.update(q for q in (m.weight_quant, m.input_quant) if q is not None)
        self.quantizers = sorted(quantizers, key=lambda q: q._oscqat_order)
        self.stepped = [q for q in self.quantizers if id(q.scale) in ids]
        self.pending = None
        self.lower = None                  # SCALE_KEEP x the stepped scales before this step


def _key(opt) -> tuple:
    return (_generation,) + tuple(len(g["params"]) for g in opt.param_groups)


_OWNED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, _Owned]" = weakref.WeakKeyDictionary()


def project_scales(quantizers, lower=None) -> None:
    """Raise the scales of `quantizers` in place to `lower` (one tensor per quantizer, or None) and onto their
    floors: one fused launch for the bound, one per floor value."""
    by_floor = defaultdict(list)
    for q in quantizers:
        by_floor[q.scale_min].append(q.scale)
    with torch.no_grad():
        if lower is not None:
            torch._foreach_maximum_([q.scale for q in quantizers], lower)
        for floor, scales in by_floor.items():
            torch._foreach_clamp_min_(scales, floor)


def after_step(quantizers) -> None:
    for q in quantizers:
        q.arm()
    project_scales([q for q in quantizers if q.scale.requires_grad])


def _owned(opt) -> _Owned | None:
    if not _QUANTIZERS:
        return None
    owned = _OWNED.get(opt)
    if owned is None or owned.key != _key(opt):
        owned = _OWNED[opt] = _Owned(opt)
    return owned if owned.quantizers else None


def _before_optimizer_step(opt, args, kwargs) -> None:
    owned = _owned(opt)
    if owned is not None and owned.stepped:
        with torch.no_grad():
            owned.lower = torch._foreach_mul([q.scale for q in owned.stepped], SCALE_KEEP)


def _after_optimizer_step(opt, args, kwargs) -> None:
    owned = _owned(opt)
    if owned is None:
        return
    owned.steps += 1
    for q in owned.stepped:
        _STEPPED_SCALES[id(q.scale)] = weakref.ref(q.scale)
    for q in owned.quantizers:
        q.arm()
    lower, owned.lower = owned.lower, None
    project_scales(owned.stepped, lower)
    weight_check.record(owned.layers)
    _check_flags(owned)
    if owned.steps == 2 and not owned.warned:   # by the second step every optimizer of the loop has stepped
        owned.warned = True
        _warn_missing_scales(owned)


def _warn_missing_scales(owned: _Owned) -> None:
    missing = [q.layer_name for m in owned.layers for q in (m.weight_quant, m.input_quant)
               if q is not None and q.scale.requires_grad and not _stepped(q.scale)]
    if missing:
        warnings.warn(
            f"oscqat: an optimizer updates the weights of quantized layers, but no optimizer updates {len(missing)} "
            f"of their scales ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); the optimizer was "
            f"probably built before oscqat.prepare. Build it after prepare (model.parameters() then holds the "
            f"scales), or call scale.requires_grad_(False) to keep scales fixed on purpose.", stacklevel=3)


def _stepped(scale: torch.Tensor) -> bool:
    ref = _STEPPED_SCALES.get(id(scale))
    return ref is not None and ref() is scale


def _check_flags(owned: _Owned) -> None:
    checked = [q for q in owned.quantizers if q.check_finite]
    if not checked:
        return
    if owned.pending is not None:            # the flags copied after an earlier step, once they have arrived
        host, event, qs = owned.pending
        if event is not None and not event.query():
            return
        owned.pending = None
        _raise_if_flagged(host, qs)
    flags = torch.stack([q.fault.to(checked[0].fault.device) for q in checked])
    if flags.device.type == "cpu":
        _raise_if_flagged(flags, checked)
        return
    owned.pending = (*host_copy(flags), checked)


def host_copy(t: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
    """(host tensor, event): `t` copied to host memory without the host waiting for the device; read the host
    tensor once the event has been reached (`event.query()`). Event None: readable now (a CPU tensor is its own
    host copy; other accelerators have no event API here, so their copy waits)."""
    if t.device.type == "cpu":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
    host.copy_(t, non_blocking=True)
    if t.device.type != "cuda":
        host.copy_(t)
        return host, None
    event = torch.cuda.Event()
    event.record()
    return host, event


def _raise_if_flagged(flags: torch.Tensor, quantizers) -> None:
    if not bool(flags.any()):
        return
    index = int(flags.nonzero()[0, 0])
    first = quantizers[index]
    if int(flags[index]) == FAULT_WEIGHT_CHANGED:
        raise WeightChangedError(weight_check.message(first.layer_name))
    raise NonFiniteError(
        f"{first.layer_name}: a NaN or infinite value entered this quantizer (its input, weight or scale) in a "
        f"step's first training forward; it is the first such quantizer in module order "
        f"({int(flags.sum())} of {len(quantizers)} were hit)")


register_optimizer_step_pre_hook(_before_optimizer_step)
register_optimizer_step_post_hook(_after_optimizer_step)
