"""Checkpoint load validation of a weight quantizer's tracking state (docs/semantics.md, "The flag encoding").

The kernels read the state without checking it: every int8 `flags` value decodes, and a frozen weight's `ema`
slot is used as its integer whatever it holds. A hand-edited or corrupted checkpoint would therefore train on
silently. `WeightQuantizer._load_from_state_dict` calls `check_loaded_state`, which refuses, before anything is
copied, what no run can have written:
- a `flags` value other than -128 (uninitialised) and last_dir + 4 * fz (last_dir in {-1, 0, 1}, fz in {0, 1, 2});
- a frozen weight (fz >= 1) whose `ema` (its frozen integer) is not an integer in the grid [n, p];
- a `freq` outside [0, 1] (an EMA of a 0/1 indicator; NaN included);
- a non-finite `ema`.
The error names the state-dict key (the layer's module path), the first offending index and its value.
"""
from __future__ import annotations

import torch

from ..errors import InvalidStateError
from ..ops.reference import WRITTEN_FLAGS, decode_flags
from .weight_check import is_dtensor


def _values(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor's values here (a DTensor's local part), or None when there are none to read (meta)."""
    t = t.to_local() if is_dtensor(t) else t
    return None if t.is_meta else t.detach()


def _first(bad: torch.Tensor, values: torch.Tensor):
    """(index tuple, value) of the first True of `bad`, or None (one host sync)."""
    if not bool(bad.any()):
        return None
    idx = tuple(int(i) for i in bad.nonzero()[0])
    return idx, values[idx].item()


def _raise(layer: str, key: str, found, what: str) -> None:
    idx, value = found
    where = f"index {idx[0]}" if len(idx) == 1 else f"index {idx}"
    raise InvalidStateError(f"{layer}: refusing to load {key!r}: {what}, got {value!r} at {where} "
                            f"(a hand-edited or corrupted checkpoint?)")


def check_loaded_state(layer: str, state_dict, prefix: str, own: dict, qmin: int, qmax: int) -> None:
    """Raise InvalidStateError when the state in `state_dict` under `prefix` (the keys prev_int, flags, freq, ema;
    shapes and dtypes already checked) holds a value docs/semantics.md does not allow. `own`: the quantizer's
    current state buffers, for the keys the state dict does not hold (a partial load)."""
    keys = {k: prefix + k for k in ("flags", "freq", "ema")}
    loaded = {k for k, key in keys.items() if key in state_dict}
    if not loaded or own.get("flags") is None:
        return
    vals = {k: _values(state_dict[keys[k]] if k in loaded else own[k]) for k in keys}
    if any(v is None for v in vals.values()):
        return
    flags, freq, ema = vals["flags"], vals["freq"], vals["ema"]
    if "flags" in loaded:
        allowed = torch.tensor(WRITTEN_FLAGS, dtype=flags.dtype, device=flags.device)
        found = _first(~torch.isin(flags, allowed), flags)
        if found:
            _raise(layer, keys["flags"], found, f"flags must be -128 (uninitialised) or last_dir + 4 * fz with "
                   f"last_dir in {{-1, 0, 1}} and fz in {{0, 1, 2}}, i.e. one of {list(WRITTEN_FLAGS)}")
    if "freq" in loaded:
        found = _first(~((freq >= 0) & (freq <= 1)), freq)
        if found:
            _raise(layer, keys["freq"], found, "freq (an EMA of oscillations) must lie in [0, 1]")
    if "ema" in loaded:
        found = _first(~torch.isfinite(ema), ema)
        if found:
            _raise(layer, keys["ema"], found, "ema must be finite")
    if loaded & {"flags", "ema"}:
        frozen = decode_flags(flags.to(ema.device))[0] >= 1
        bad = frozen & ((ema != torch.round(ema)) | (ema < qmin) | (ema > qmax))
        found = _first(bad, ema)
        if found:
            _raise(layer, keys["ema"], found, f"a frozen weight's ema holds its frozen integer, which must be an "
                   f"integer in the grid [{qmin}, {qmax}]")
