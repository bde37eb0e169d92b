"""What every op of the contract returns (shapes, dtypes, layout) without running it: the fake implementations
torch.compile and torch.export trace with. One definition per op, registered for both op namespaces:
`torch.ops.oscqat.*` (ops/library.py; those ops take the backend's name as one more, last, argument) and
`torch.ops.oscqat_C.*` (ops/cpp.py). The dtypes are the reference's (ops/reference.py): gradients of the
input in the incoming gradient's dtype, scale and offset gradients fp32, D an fp32 scalar, counts int32 (2,)."""
from __future__ import annotations

import torch

_DENSE = torch.contiguous_format
F32 = torch.float32


def weight_fwd(w, scale, flags, ema, n, p, damp, damp_div, backend=None):
    return torch.empty_like(w, memory_format=_DENSE), w.new_empty((), dtype=F32)


def weight_fwd_track(w, scale, prev_int, flags, freq, ema, f_th, n, p, momentum, damp, damp_div, backend=None):
    return (torch.empty_like(w, memory_format=_DENSE), w.new_empty((), dtype=F32),
            w.new_empty((2,), dtype=torch.int32))


def weight_bwd(g, w, scale, flags, ema, grad_d, n, p, grad_scale, damp, damp_div, tracked, backend=None):
    return (torch.empty_like(w, dtype=g.dtype, memory_format=_DENSE),
            torch.empty_like(scale, dtype=F32, memory_format=_DENSE))


def act_fwd(x, scale, offset, n, p, backend=None):
    return torch.empty_like(x, memory_format=_DENSE)


def act_bwd(g, x, scale, offset, n, p, grad_scale, backend=None):
    return (torch.empty_like(x, dtype=g.dtype, memory_format=_DENSE),
            torch.empty_like(scale, dtype=F32, memory_format=_DENSE),
            torch.empty_like(scale, dtype=F32, memory_format=_DENSE))


def register(namespace: str) -> None:
    """Register these as the fakes of `namespace`'s five ops (`oscqat_C`: the C++ extension's)."""
    for fn in (weight_fwd, weight_fwd_track, weight_bwd, act_fwd, act_bwd):
        torch.library.register_fake(f"{namespace}::{fn.__name__}")(fn)
