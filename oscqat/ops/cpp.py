"""The `cpp` (CPU) and `cuda` backends: the fused kernels of `oscqat._C` (csrc/), built by setup.py.

One module serves both names: the ops (schemas in csrc/oscqat_C.cpp, `torch.ops.oscqat_C.*`) dispatch on the
tensors' device, so 'cpp' runs CPU tensors and 'cuda' CUDA tensors when the extension was built with CUDA.
The raw functions below have the signatures and returns of `oscqat.ops.reference`; `oscqat.ops.library` calls them with
contiguous data tensors. Semantics: docs/semantics.md.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import BackendUnavailable
from . import fakes

DEVICE_TYPES = ("cpu", "cuda")

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.oscqat_C)
    _LOAD_ERROR: Optional[str] = None
except ImportError as e:  # not built (OSCQAT_NO_EXT=1, no torch at build time) or built for another torch
    _C = None
    _LOAD_ERROR = str(e) or type(e).__name__


def _has_kernel(key: str) -> bool:
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key("oscqat_C::weight_fwd", key)


def check(name: str, device_type: str) -> None:
    """Raise BackendUnavailable, with the reason in one line, unless backend `name` runs `device_type` here."""
    if _C is None:
        raise BackendUnavailable(
            f"oscqat backend {name!r} is unavailable: the C++ extension oscqat._C is not built or does not load "
            f"({_LOAD_ERROR}); rebuild with `pip install --no-build-isolation -e .`")
    if name == "cpp":
        if device_type != "cpu":
            raise BackendUnavailable(f"oscqat backend 'cpp' runs CPU tensors only, not {device_type}; "
                                     f"use 'cuda' or 'triton' for CUDA tensors")
    elif name == "cuda":
        if device_type != "cuda":
            raise BackendUnavailable(f"oscqat backend 'cuda' runs CUDA tensors only, not {device_type}")
        if not _has_kernel("CUDA"):
            raise BackendUnavailable("oscqat backend 'cuda' is unavailable: oscqat._C was built without CUDA "
                                     "(torch without CUDA or no nvcc at build time)")
        if not torch.cuda.is_available():
            raise BackendUnavailable("oscqat backend 'cuda' is unavailable: no CUDA device is visible")
    else:
        raise BackendUnavailable(f"oscqat.ops.cpp serves 'cpp' and 'cuda', not {name!r}")


def _ops():
    if _C is None:
        raise BackendUnavailable(f"the C++ extension oscqat._C is not available ({_LOAD_ERROR})")
    return torch.ops.oscqat_C


# ---------------------------------------------------------------- raw kernels (signatures of oscqat.ops.reference)
def weight_fwd(w, scale, flags, ema, n: int, p: int, damp: bool, damp_div: float):
    """Untracked forward: (w_hat, D). `flags`/`ema` may be None (no state: nothing frozen)."""
    return _ops().weight_fwd(w, scale, flags, ema, n, p, damp, float(damp_div))


def weight_fwd_track(w, scale, prev_int, flags, freq, ema, f_th, n: int, p: int, momentum: float,
                     damp: bool, damp_div: float):
    """Tracked forward: (w_hat, D, counts[changes, oscillations]); updates the four state buffers in place."""
    return _ops().weight_fwd_track(w, scale, prev_int, flags, freq, ema, f_th, n, p, float(momentum), damp,
                                   float(damp_div))


def weight_bwd(g, w, scale, flags, ema, grad_d, n: int, p: int, grad_scale: float, damp: bool,
               damp_div: float, tracked: bool):
    """(dL/dw in g's dtype, dL/ds fp32 of scale's shape)."""
    return _ops().weight_bwd(g, w, scale, flags, ema, grad_d, n, p, float(grad_scale), damp, float(damp_div),
                             tracked)


def act_fwd(x, scale, offset, n: int, p: int):
    return _ops().act_fwd(x, scale, offset, n, p)


def act_bwd(g, x, scale, offset, n: int, p: int, grad_scale: float):
    """(dL/dx in g's dtype, dL/ds fp32 like scale, dL/do fp32 like scale; zeros without an offset)."""
    return _ops().act_bwd(g, x, scale, offset, n, p, float(grad_scale))


if _C is not None:
    fakes.register("oscqat_C")
