"""A weight changed behind the quantizer's back: e.g. a detection framework's own `fuse()` folding BatchNorm into
the conv weights, while the weight quantizer's scale and frozen integers still describe the old weights.

After every optimizer step (and `QATSchedule.step()`, `oscqat.arm_tracking`) each quantized layer records a
checksum of its weight, the wrapping integer sum of its bit patterns (a 0-d device tensor, no sync). The next
step's first training forward recomputes it and raises (CPU) or flags (accelerators: raised after the next
optimizer step, as the NaN/Inf check) when they differ. Loading a state_dict, moving the model (`.to`) and
`oscqat.fold_bn` forget it."""
from __future__ import annotations

import torch


class WeightChangedError(RuntimeError):
    """A quantized layer's weight changed outside the optimizer since its last step."""


WEIGHT_CHANGED = 2          # value of a quantizer's `nonfinite` flag that means "weight changed"


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def checksum(w: torch.Tensor) -> torch.Tensor:
    """The sum of the weight's bit patterns modulo 2^(8 * element size). Modular integer addition is
    associative, so eager and a compiled graph (another reduction order, possibly a wider accumulator that is
    truncated at the end) agree exactly, where an fp32 sum differed in its last bits under torch.compile and raised
    a false WeightChangedError. The sum stays in the element's own width because widening costs: on CPU an int32
    -> int64 summing pass ran at 1/12 of the speed of the int32 one (21 vs 1.7 ms per 4M weights), twice per step.
    Any single changed weight changes the sum."""
    bits = _BITS[w.element_size()]
    return w.detach().view(bits).sum(dtype=bits)


def record(layers, force: bool = False) -> None:
    """Record the checksum of each layer's weight (after a legitimate update). A weight whose version counter
    has not moved since its last record is skipped: the optimizer's hook and QATSchedule.step() both record
    after the same step, and the sum is a pass over every weight. `force`: record all (a change through
    `.data` does not move the version counter)."""
    for m in layers:
        q, version = m.weight_quant, m.weight._version
        if force or q.weight_ref is None or getattr(q, "weight_ref_version", None) != version:
            q.weight_ref = checksum(m.weight)
            q.weight_ref_version = version


def changed(ref: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """0-d bool device tensor: the weight's checksum differs from `ref`."""
    return checksum(w) != ref


def message(name: str) -> str:
    return (f"{name}: the weight changed outside the optimizer since its last step (its checksum differs from the "
            f"one recorded after that step). Something modified it in place behind oscqat's back, e.g. a "
            f"framework's fuse() folding BatchNorm into the conv weights, which leaves the weight quantizer's scale "
            f"and frozen integers describing the old weights. Fold with oscqat.fold_bn(model), which rescales the "
            f"quantizers too; after a deliberate change, call oscqat.arm_tracking(model) to accept it.")
