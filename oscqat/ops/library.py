"""The op contract as torch.library custom ops: one schema per op, the backend chosen by a string argument.

`torch.ops.oscqat.{weight_fwd, weight_fwd_track, weight_bwd, act_fwd, act_bwd}` carry the names of the contract's
raw functions (ops/reference.py) and run those of the named backend (ops/backends.py); their fakes (ops/fakes.py)
let `torch.compile` trace through without a graph break. (`torch.ops.oscqat_C.weight_quant` is something else: the
C++ extension's whole weight quantizer, tracked forward and backward as one op with its own autograd node.)
One autograd Function per quantizer kind ties the forward ops to the backward ops (the tracked forward mutates
state, so it cannot carry a registered autograd formula itself). Semantics: docs/semantics.md.

The `cpp` and `cuda` backends are C++ ops already (`torch.ops.oscqat_C`, schemas and fake implementations of
their own), so the Functions call them directly: going through the Python custom op as well costs Python
dispatch and the mutation's version bump per call, as much as a mid-sized kernel on CPU (measured:
bench/results/cpu/docstring_numbers.md, `ops-custom-op`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends as _backend
from . import fakes, reference


def _impl(name: str):
    return _backend.load(name)


_NATIVE = ("cpp", "cuda")


_native_loaded: set = set()


def _native_ops(backend: str):
    """torch.ops.oscqat_C for the C++ backends (loading oscqat._C the first time), else None."""
    if backend not in _NATIVE:
        return None
    if backend not in _native_loaded and not torch.compiler.is_compiling():
        _impl(backend).check(backend, "cuda" if backend == "cuda" else "cpu")
        _native_loaded.add(backend)
    return torch.ops.oscqat_C


def _bump(*tensors: Tensor) -> None:
    """What the custom op's mutates_args does: a tensor saved for a backward and then mutated must be caught by
    autograd's version check. Under torch.compile the graph's functionalization does it."""
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(tensors)


# ---------------------------------------------------------------- weights
@torch.library.custom_op("oscqat::weight_fwd", mutates_args=())
def weight_fwd(w: Tensor, scale: Tensor, flags: Optional[Tensor], ema: Optional[Tensor], n: int, p: int,
               damp: bool, damp_div: float, backend: str) -> tuple[Tensor, Tensor]:
    return _impl(backend).weight_fwd(w.contiguous(), scale, flags, ema, n, p, damp, damp_div)


@torch.library.custom_op("oscqat::weight_fwd_track", mutates_args=("prev_int", "flags", "freq", "ema"))
def weight_fwd_track(w: Tensor, scale: Tensor, prev_int: Tensor, flags: Tensor, freq: Tensor, ema: Tensor,
                     f_th: Tensor, n: int, p: int, momentum: float, damp: bool, damp_div: float,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _impl(backend).weight_fwd_track(w.contiguous(), scale, prev_int, flags, freq, ema, f_th, n, p, momentum,
                                           damp, damp_div)


@torch.library.custom_op("oscqat::weight_bwd", mutates_args=())
def weight_bwd(g: Tensor, w: Tensor, scale: Tensor, flags: Optional[Tensor], ema: Optional[Tensor],
               grad_d: Tensor, n: int, p: int, grad_scale: float, damp: bool, damp_div: float,
               tracked: bool, backend: str) -> tuple[Tensor, Tensor]:
    return _impl(backend).weight_bwd(g.contiguous(), w.contiguous(), scale, flags, ema, grad_d, n, p, grad_scale, damp,
                                     damp_div, tracked)


def _floor(scale: Tensor, s_min: Optional[float]) -> Tensor:
    """The scale floor (docs/semantics.md, "Scale floor"): max(s, s_min) forward. Inside the Function, the
    scale's gradient is the floored scale's, unchanged (Brevitas' clamp-min STE), so a scale at the floor can climb
    back; a separate autograd node for it cost more per layer and step (bench/results/cpu/docstring_numbers.md,
    `ops-floor-node`)."""
    return scale if s_min is None else scale.clamp_min(s_min)


def at_floor(scale: Tensor, s_min: float) -> Tensor:
    """Where a scale sits at its floor: s <= s_min, i.e. where the scale used, max(s, s_min), is s_min. The one
    definition behind `oscqat.scales_at_floor`, `oscillation_report`'s count and `prepare`'s notes."""
    return scale.detach() <= s_min


class WeightQuantFn(torch.autograd.Function):
    """w -> (w_hat, D [, counts]); tracks and updates the state in place when `state` is given. `s_min`: the
    scale floor."""

    @staticmethod
    def forward(ctx, w, scale, flags, ema, track_state, f_th, n, p, momentum, damp, damp_div, grad_scale, backend,
                s_min=None):
        scale = _floor(scale, s_min)
        native = _native_ops(backend)
        if track_state is not None:
            prev_int, freq = track_state
            if native is not None:
                w_hat, d, counts = native.weight_fwd_track(w.contiguous(), scale, prev_int, flags, freq, ema, f_th,
                                                           n, p, float(momentum), damp, float(damp_div))
                _bump(prev_int, flags, freq, ema)
            else:
                w_hat, d, counts = weight_fwd_track(w, scale, prev_int, flags, freq, ema, f_th, n, p, momentum,
                                                    damp, damp_div, backend)
        elif native is not None:
            w_hat, d = native.weight_fwd(w.contiguous(), scale, flags, ema, n, p, damp, float(damp_div))
            counts = None
        else:
            w_hat, d = weight_fwd(w, scale, flags, ema, n, p, damp, damp_div, backend)
            counts = None
        ctx.save_for_backward(w, scale, flags, ema)
        ctx.args = (n, p, grad_scale, damp, damp_div, track_state is not None, backend)
        ctx.mark_non_differentiable(*(t for t in (counts,) if t is not None))
        return w_hat, d, counts

    @staticmethod
    def backward(ctx, g, g_d, _g_counts):
        w, scale, flags, ema = ctx.saved_tensors
        n, p, grad_scale, damp, damp_div, tracked, backend = ctx.args
        if g_d is None or not damp:
            g_d = torch.zeros((), dtype=torch.float32, device=w.device)
        if g is None:
            g = torch.zeros_like(w)
        native = _native_ops(backend)
        if native is not None:
            gw, gs = native.weight_bwd(g.contiguous(), w.contiguous(), scale, flags, ema, g_d, n, p, float(grad_scale),
                                       damp, float(damp_div), tracked)
        else:
            gw, gs = weight_bwd(g, w, scale, flags, ema, g_d, n, p, grad_scale, damp, damp_div, tracked, backend)
        return (gw, gs.to(scale.dtype)) + (None,) * 12


# What oscqat_C::weight_quant raises when its checks fail (csrc/weight_quant_autograd.cpp)
KERNEL_NONFINITE_ERROR = "oscqat_C.weight_quant: NaN or Inf in the weight or its scale"
KERNEL_CHANGED_ERROR = "oscqat_C.weight_quant: the weight's checksum differs from weight_ref"


def native_weight_op(backend: str):
    """torch.ops.oscqat_C in eager mode on the cpp and cuda backends, else None."""
    return None if torch.compiler.is_compiling() else _native_ops(backend)


def checks_in_kernel(w: Tensor, backend: str) -> bool:
    """Whether `quantize_weight` can run the step's first-forward checks in its kernel (check_finite,
    weight_ref): eager, on the CPU, with the C++ op."""
    return w.device.type == "cpu" and native_weight_op(backend) is not None


def quantize_weight(w, scale, flags, ema, track_state, f_th, n, p, momentum, damp, damp_div, grad_scale, backend,
                    s_min=None, check_finite=False, weight_ref=None):
    """`WeightQuantFn.apply(...)`; in eager mode on the cpp and cuda backends the same forward and backward as one
    C++ op with its own autograd node (oscqat_C::weight_quant, csrc/weight_quant_autograd.cpp): the Python
    Function's forward and backward cost as much per layer and step as the kernels of a mid-sized layer
    (bench/results/cpu/docstring_numbers.md, `ops-weight-quant-op`). Same kernels, same values. `check_finite`,
    `weight_ref` (only where `checks_in_kernel`): raise RuntimeError(KERNEL_NONFINITE_ERROR / KERNEL_CHANGED_ERROR)
    before anything is written when `w` or `scale` holds NaN/Inf, or when the checksum of `w`
    (weight_check.checksum) differs from `weight_ref`."""
    native = native_weight_op(backend)
    if native is None:
        if check_finite or weight_ref is not None:
            raise ValueError(f"quantize_weight: check_finite/weight_ref need the C++ op in eager mode on the CPU "
                             f"(backend {backend!r}, device {w.device})")
        return WeightQuantFn.apply(w, scale, flags, ema, track_state, f_th, n, p, momentum, damp, damp_div,
                                   grad_scale, backend, s_min)
    prev_int, freq = track_state if track_state is not None else (None, None)
    w_hat, d, counts = native.weight_quant(w, scale, prev_int, flags, freq, ema, f_th, n, p, float(momentum), damp,
                                           float(damp_div), float(grad_scale), s_min, check_finite, weight_ref)
    return w_hat, d, (counts if track_state is not None else None)


# ---------------------------------------------------------------- activations
@torch.library.custom_op("oscqat::act_fwd", mutates_args=())
def act_fwd(x: Tensor, scale: Tensor, offset: Optional[Tensor], n: int, p: int, backend: str) -> Tensor:
    return _impl(backend).act_fwd(x.contiguous(), scale, offset, n, p)


@torch.library.custom_op("oscqat::act_bwd", mutates_args=())
def act_bwd(g: Tensor, x: Tensor, scale: Tensor, offset: Optional[Tensor], n: int, p: int,
            grad_scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _impl(backend).act_bwd(g.contiguous(), x.contiguous(), scale, offset, n, p, grad_scale)


fakes.register("oscqat")


def compiling_on_cpu(x: Tensor) -> bool:
    """Under torch.compile on CPU, the activation quantizer is the reference's aten ops, forward and backward,
    which inductor fuses with the BatchNorm/ReLU around them instead of calling opaque kernels. The forward is
    bit for bit eager's (the reciprocal is an IEEE division; tests/test_layers.py covers quantizers with and
    without an LSQ+ offset, whose `q * s + o` a compiler could contract into an FMA). In the backward, dL/dx is
    exact (g or 0) and the scale's gradient is a sum in another order, within docs/semantics.md's tolerance; x
    need not be kept for it, inductor recomputes it from BatchNorm's input. There ActQuantFn can check x for
    NaN/Inf in its backward (`fault`): a check in the forward is a reduction over every activation that
    inductor does not fuse with the quantizer's fused forward (a compiled BatchNorm->ReLU6->quantizer block:
    ~0.3 ns per element). Elsewhere (eager, GPUs) both are the backend's kernels."""
    return x.device.type == "cpu" and torch.compiler.is_compiling()


def _channel_sum(t: Tensor) -> Tensor:
    """The sum of t, per channel (dim 1) first, as BatchNorm's backward sums: inductor then computes it in
    BatchNorm's loop (the scale gradient as one sum over all elements was a loop of its own, and made the
    fused backward slower than the kernel: bench/results/cpu/docstring_numbers.md, `ops-sum-per-channel`)."""
    return t.sum([d for d in range(t.dim()) if d != 1]).sum() if t.dim() > 1 else t.sum()


def _act_bwd_fused(g, x, scale, offset, n: int, p: int, grad_scale: float, fault):
    """reference.act_bwd, its sums per channel first; `fault`: set to 1 in place when x holds a NaN or Inf."""
    if fault is not None:
        # x * 0 is NaN exactly where x is NaN or Inf; times (g == g), 1 unless g is NaN, which keeps it NaN only
        # there and makes it a backward value: a term of x alone the partitioner moves into the forward graph,
        # where it is a pass of its own over x, and x must then be kept for the backward.
        bad = torch.isnan(_channel_sum(x.float() * 0 * (g == g)))
        fault.copy_(torch.maximum(fault, bad.to(fault.dtype)))
    return reference.act_bwd(g, x, scale, offset, n, p, grad_scale, total=_channel_sum)


class ActQuantFn(torch.autograd.Function):
    """x -> fake-quantized x. `s_min`: the scale floor. `fault` (a quantizer's 0-d int32 flag; only where
    `compiling_on_cpu(x)`): the backward sets it to 1 in place when x holds a NaN or an Inf."""

    @staticmethod
    def forward(ctx, x, scale, offset, n, p, grad_scale, backend, s_min=None, fault=None):
        fused = compiling_on_cpu(x)
        if fault is not None and not fused:
            raise ValueError("ActQuantFn: x is checked in the backward (fault) only where it is fused "
                             "(torch.compile on CPU)")
        scale = _floor(scale, s_min)
        ctx.save_for_backward(x, scale, offset, fault)
        ctx.args = (n, p, grad_scale, backend, fused)
        if fused:
            return reference.act_fwd(x, scale, offset, n, p)
        native = _native_ops(backend)
        if native is not None:
            return native.act_fwd(x.contiguous(), scale, offset, n, p)
        return act_fwd(x, scale, offset, n, p, backend)

    @staticmethod
    def backward(ctx, g):
        x, scale, offset, fault = ctx.saved_tensors
        n, p, grad_scale, backend, fused = ctx.args
        if fused:
            gx, gs, go = _act_bwd_fused(g, x, scale, offset, n, p, grad_scale, fault)
        elif (native := _native_ops(backend)) is not None:
            gx, gs, go = native.act_bwd(g.contiguous(), x.contiguous(), scale, offset, n, p, float(grad_scale))
        else:
            gx, gs, go = act_bwd(g, x, scale, offset, n, p, grad_scale, backend)
        return (gx, gs.to(scale.dtype), (None if offset is None else go.to(offset.dtype))) + (None,) * 6
