"""A weight changed behind the quantizer's back: e.g. a detection framework's own `fuse()` folding BatchNorm into
the conv weights, while the weight quantizer's scale and frozen integers still describe the old weights.

After every optimizer step (and `QATSchedule.step()`, `oscqat.arm_tracking`) each quantized layer records a
checksum of its weight, the wrapping integer sum of its bit patterns (a 0-d device tensor, no sync). The next
step's first training forward recomputes it and raises (CPU) or flags (accelerators: raised after the next
optimizer step, as the NaN/Inf check) when they differ. Loading a state_dict, moving the model (`.to`) and
`oscqat.fold_bn` forget it.

Under FSDP2 (`fully_shard`) the optimizer steps the sharded weight (a DTensor) while the forward sees the
unsharded one: each rank records the checksum of its own shard and the box of the full weight it covers, and
its forward checks that box of the unsharded weight (no communication: a change is caught by the rank whose
shard it is in). With a mixed-precision policy (the forward's weight in another dtype) it is not checked."""
from __future__ import annotations

import torch

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def checksum(w: torch.Tensor) -> torch.Tensor:
    """The sum of the weight's bit patterns modulo 2^(8 * element size). Modular integer addition is
    associative, so eager and a compiled graph (another reduction order, possibly a wider accumulator that is
    truncated at the end) agree exactly, where an fp32 sum differed in its last bits under torch.compile and raised
    a false WeightChangedError. The sum stays in the element's own width because widening costs: on CPU an int32
    -> int64 summing pass ran an order of magnitude slower than the int32 one, twice per step
    (bench/results/cpu/docstring_numbers.md, `weight-check-width`). Any single changed weight changes the sum."""
    bits = _BITS[w.element_size()]
    return w.detach().view(bits).sum(dtype=bits)


def is_dtensor(w) -> bool:
    """Whether `w` is a DTensor (an FSDP2 shard), without importing torch.distributed."""
    return type(w).__name__ == "DTensor" and hasattr(w, "to_local")


def shard_region(w) -> tuple:
    """(global offsets, local shape, dtype) of this rank's shard of DTensor `w`."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
    return tuple(offset), tuple(shape), w.dtype


def record(layers, force: bool = False) -> None:
    """Record the checksum of each layer's weight (after a legitimate update). A weight whose version counter
    has not moved since its last record is skipped: the optimizer's hook and QATSchedule.step() both record
    after the same step, and the sum is a pass over every weight. `force`: record all (a change through
    `.data` does not move the version counter). A sharded weight (DTensor, FSDP2) records its local shard's
    checksum and where the shard lies (`weight_ref_region`)."""
    for m in layers:
        w = m.weight
        q, version = m.weight_quant, w._version
        if force or q.weight_ref is None or getattr(q, "weight_ref_version", None) != version:
            d = q.__dict__       # the dict, not setattr (bench/results/cpu/docstring_numbers.md, quantizers-assign)
            if is_dtensor(w):
                region = shard_region(w)
                q.weight_ref = checksum(w.to_local()[tuple(slice(0, n) for n in region[1])])
                d["weight_ref_region"] = region
            else:
                q.weight_ref = checksum(w)
                d["weight_ref_region"] = None
            ref = q.weight_ref
            d["weight_ref_t"] = ref if ref.dtype in (torch.int32, torch.int64) else ref.to(torch.int32)
            if not d.get("_weight_ref_ok_set"):     # one tensor per quantizer (dynamo rejects aliased inputs)
                d["weight_ref_ok"] = torch.ones((), dtype=torch.bool, device=ref.device)
                d["_weight_ref_ok_set"] = True
            q.weight_ref_version = version


def forget(q) -> None:
    """No recorded checksum (next check skipped). Besides `weight_ref = None`, the tensors a compiled forward
    reads instead (`weight_ref_t`, `weight_ref_ok`: always tensors, on the scale's device, so that dynamo does
    not guard on None-ness and recompile once a checksum is recorded)."""
    dev = q.scale.device
    q.weight_ref_t = torch.zeros((), dtype=torch.int32, device=dev)
    q.weight_ref_ok = torch.zeros((), dtype=torch.bool, device=dev)
    q._weight_ref_ok_set = False


def changed(ref: torch.Tensor, w: torch.Tensor, region: tuple | None = None) -> torch.Tensor:
    """0-d bool device tensor: the weight's checksum (of the box `region` = (offsets, shape, dtype) of it, for a
    checksum recorded on a shard) differs from `ref`."""
    if region is not None:
        offset, shape, dtype = region
        if w.dtype != dtype or is_dtensor(w):      # mixed precision (another dtype than the shard's): unchecked
            return torch.zeros((), dtype=torch.bool, device=w.device)
        w = w[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    return checksum(w) != ref


def message(name: str) -> str:
    return (f"{name}: the weight changed outside the optimizer since its last step (its checksum differs from the "
            f"one recorded after that step). Something modified it in place behind oscqat's back, e.g. a "
            f"framework's fuse() folding BatchNorm into the conv weights, which leaves the weight quantizer's scale "
            f"and frozen integers describing the old weights. Fold with oscqat.fold_bn(model), which rescales the "
            f"quantizers too; after a deliberate change, call oscqat.arm_tracking(model) to accept it.")
