"""What follows every optimizer step, so that a plain training loop gets it without asking:

- arm the step's first training forward (tracking and the finite check, docs/semantics.md);
- project the scales the optimizer just moved back onto the floor `scale_min` (as torch.ao's learnable
  fake-quant does), so a scale never drifts far below it;
- read the non-finite flags of the step's first forward, on accelerators one step late and without a sync;
- say so, once, when an optimizer steps the weights of quantized layers but no optimizer steps their scales
  (the optimizer was built before `oscqat.prepare`).

One global `torch.optim` step post-hook does this for every optimizer holding a quantizer's scale or a
quantized layer's weight; `QATSchedule.step()` does the first two for its model too.
"""
from __future__ import annotations

import warnings
import weakref
from collections import defaultdict

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_QUANTIZERS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()     # WeightQuantizer and QuantAct
_LAYERS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()         # QuantConv1d/2d, QuantLinear
_STEPPED_SCALES: dict[int, weakref.ref] = {}     # id -> weakref (tensors compare elementwise, not by identity)
_generation = 0
_order = 0


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


def _key(opt) -> tuple:
    return (_generation,) + tuple(len(g["params"]) for g in opt.param_groups)


_OWNED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, _Owned]" = weakref.WeakKeyDictionary()


def project_scales(quantizers) -> None:
    """Clamp the scales of `quantizers` onto their floors in place: one fused launch per floor value."""
    by_floor = defaultdict(list)
    for q in quantizers:
        by_floor[q.scale_min].append(q.scale)
    with torch.no_grad():
        for floor, scales in by_floor.items():
            torch._foreach_clamp_min_(scales, floor)


def after_step(quantizers) -> None:
    for q in quantizers:
        q.arm()
    project_scales([q for q in quantizers if q.scale.requires_grad])


def _after_optimizer_step(opt, args, kwargs) -> None:
    if not _QUANTIZERS:
        return
    owned = _OWNED.get(opt)
    if owned is None or owned.key != _key(opt):
        owned = _OWNED[opt] = _Owned(opt)
    if not owned.quantizers:
        return
    owned.steps += 1
    for q in owned.stepped:
        _STEPPED_SCALES[id(q.scale)] = weakref.ref(q.scale)
    for q in owned.quantizers:
        q.arm()
    project_scales(owned.stepped)
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
    flags = torch.stack([q.nonfinite.to(checked[0].nonfinite.device) for q in checked])
    if flags.device.type == "cpu":
        _raise_if_flagged(flags, checked)
        return
    host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=torch.cuda.is_available())
    host.copy_(flags, non_blocking=True)
    event = torch.cuda.Event() if flags.device.type == "cuda" else None
    if event is not None:
        event.record()
    else:
        host.copy_(flags)   # other accelerators: no event API here, so this read waits
    owned.pending = (host, event, checked)


def _raise_if_flagged(flags: torch.Tensor, quantizers) -> None:
    if not bool(flags.any()):
        return
    from .quantizers import NonFiniteError
    first = quantizers[int(flags.nonzero()[0, 0])]
    raise NonFiniteError(
        f"{first.layer_name}: a NaN or infinite value entered this quantizer (its input, weight or scale) in a "
        f"step's first training forward; it is the first such quantizer in module order "
        f"({int(flags.sum())} of {len(quantizers)} were hit)")


register_optimizer_step_post_hook(_after_optimizer_step)
