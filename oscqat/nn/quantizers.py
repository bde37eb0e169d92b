"""WeightQuantizer and QuantAct: the modules that hold scales and oscillation state and call the ops."""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..errors import NonFiniteError, WeightChangedError
from ..ops import backends as _backend
from ..ops.library import (KERNEL_CHANGED_ERROR, KERNEL_NONFINITE_ERROR, ActQuantFn, checks_in_kernel, compiling_on_cpu,
                           native_weight_op, quantize_weight)
from ..ops.reference import UNINIT, decode_flags
from . import state_check, step_hook, weight_check
from .config import check_bits, check_scale_min

STATE_NAMES = ("prev_int", "flags", "freq", "ema")
# Floor of every learned scale (docs/semantics.md, "Scale floor"): far below any useful step size, far above
# where 1/s or w/s stop being finite in fp32.
SCALE_MIN = 1e-6
_STATE_DTYPES = {"prev_int": torch.int8, "flags": torch.int8, "freq": torch.float32, "ema": torch.float32}


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _assign(m: nn.Module, name: str, value) -> None:
    """`m.name = value` for the attributes a quantizer writes once per step (armed, last_damp, last_counts). In
    eager mode it goes past nn.Module.__setattr__, which searches the parameter, buffer and module dicts (a few %
    of a weight-set step: bench/results/cpu/docstring_numbers.md, `quantizers-assign`); under torch.compile dynamo
    traces the normal path."""
    if _compiling():
        setattr(m, name, value)
    elif name in m._buffers:
        m._buffers[name] = value
    else:
        m.__dict__[name] = value


def _eager_cpu(tensors) -> bool:
    return not _compiling() and all(t.device.type == "cpu" for t in tensors)


def _nonfinite(*tensors: torch.Tensor) -> torch.Tensor:
    """0-d int32 device tensor: 1 when a NaN or Inf is in one of the tensors (then their fp32 sum is NaN or Inf;
    a finite sum beyond fp32's range would also flag, and is reported as such). No host sync. One summing pass
    costs a fraction of isfinite(t).all() (bench/results/cpu/docstring_numbers.md, `quantizers-nonfinite-sum`)."""
    sums = torch.stack([t.detach().sum(dtype=torch.float32) for t in tensors])
    return (~torch.isfinite(sums.sum())).to(torch.int32)


class _FirstForwardChecks(nn.Module):
    """Shared by both quantizers: the step's first training forward (`armed`) sets the `fault` flag when
    the input, weight or scale holds NaN/Inf. Eager on CPU it raises at once (no device to wait for); on
    accelerators and under torch.compile the flag is read without a sync after the optimizer step
    (oscqat/nn/step_hook.py)."""

    layer_name: str
    check_finite: bool

    def __init__(self):
        super().__init__()
        self.register_buffer("fault", torch.zeros((), dtype=torch.int32), persistent=False)
        self.armed = True
        step_hook.register(self)

    def arm(self) -> None:
        """Make the next training forward the step's first one (tracking, finite check; once per optimizer
        step)."""
        _assign(self, "armed", True)

    def _is_first(self) -> bool:
        """The step's first training forward (a no_grad forward is not a training step and does not take it)."""
        return self.training and self.armed and torch.is_grad_enabled()

    def _first_forward(self, what: str, *tensors: torch.Tensor) -> bool:
        """`_is_first()`; there, checks `tensors` for NaN/Inf and disarms (after the check: a forward retried
        after the error is checked again)."""
        first = self._is_first()
        if first:
            if self.check_finite:
                self._check(what, *tensors)
            _assign(self, "armed", False)
        return first

    def __setstate__(self, state):
        super().__setstate__(state)
        step_hook.register(self)

    def _check(self, what: str, *tensors: torch.Tensor) -> None:
        if _eager_cpu(tensors):     # nothing to wait for: a host read is free, and ~5 small ops per call are not
            if not all(math.isfinite(t.item() if t.numel() == 1 else float(t.detach().sum(dtype=torch.float32)))
                       for t in tensors):
                raise NonFiniteError(nonfinite_message(self, what, tensors))
            return
        bad = _nonfinite(*tensors)
        if self.fault.device == bad.device:     # in place: QuantAct's backward may set it too
            self.fault.copy_(torch.maximum(self.fault, bad))
        else:
            self.fault = torch.maximum(self.fault.to(bad.device), bad)


def nonfinite_message(q: nn.Module, what: str, tensors=()) -> str:
    details = []
    for name, t in zip(what.split("/"), tensors):
        n_bad = int((~torch.isfinite(t.detach())).sum())
        if n_bad:
            kinds = sorted({"NaN" if torch.isnan(t).any() else "", "Inf" if torch.isinf(t).any() else ""} - {""})
            cause = (" (a non-finite gradient reached it in the last optimizer step: gradients overflowed; lower "
                     "the learning rate or clip gradients)") if isinstance(t, nn.Parameter) else ""
            details.append(f"{name} has {n_bad} {'/'.join(kinds)} value(s) of {t.numel()}{cause}")
    what_txt = "; ".join(details) or f"the sum of its {what.replace('/', ', ')} exceeds fp32's range"
    return (f"{q.layer_name}: {what_txt} (the first quantized layer, in forward order, where a non-finite value "
            f"appeared)")


def check_float_input(t: torch.Tensor, who: str, what: str) -> None:
    if not torch.is_floating_point(t):
        raise TypeError(f"{who}: {what} must be a floating-point tensor, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{who}: {what} is empty (shape {tuple(t.shape)})")


class WeightQuantizer(_FirstForwardChecks):
    """Symmetric signed LSQ weight quantizer with oscillation tracking, freezing and dampening."""

    def __init__(self, shape, bits: int = 4, per_channel: bool = False, track: bool = True,
                 dampen: bool = False, freeze: bool = False, momentum: float = 0.001,
                 damp_reduction: str = "kernel_mean", lsq_grad_scale: bool = True, name: str = "",
                 scale_min: float = SCALE_MIN, check_finite: bool = True):
        super().__init__()
        self.layer_name = name or "WeightQuantizer"
        self.scale_min = check_scale_min(scale_min, self.layer_name)
        self.check_finite = bool(check_finite)
        self.bits = check_bits(bits, self.layer_name)
        self.shape = tuple(shape)
        numel = math.prod(self.shape)
        if numel == 0:
            raise ValueError(f"{self.layer_name}: cannot quantize an empty weight of shape {self.shape}")
        channels = self.shape[0] if per_channel else 1
        self.per_channel = per_channel
        self.scale = nn.Parameter(torch.ones(channels))
        self.tracking = track
        self.dampen = dampen and track
        self.freeze = freeze and track
        self.momentum = float(momentum)
        fan_in = numel // self.shape[0]
        self.damp_div = float(fan_in) if damp_reduction == "kernel_mean" else 1.0
        self.grad_scale = 1.0 / math.sqrt(numel // channels * self.qmax) if lsq_grad_scale else 1.0
        for k in STATE_NAMES:
            init = torch.full(self.shape, UNINIT, dtype=torch.int8) if k == "flags" else \
                torch.zeros(self.shape, dtype=_STATE_DTYPES[k])
            self.register_buffer(k, init if track else None)
        self.register_buffer("freeze_threshold", torch.zeros(()))
        self.register_buffer("last_counts", torch.zeros(2, dtype=torch.int32), persistent=False)
        self.last_damp: torch.Tensor | None = None
        self.weight_ref: torch.Tensor | None = None     # checksum at the last optimizer step (weight_check.py)
        self.weight_ref_region: tuple | None = None     # the shard it covers, for a sharded (FSDP2) weight
        weight_check.forget(self)      # weight_ref_t / weight_ref_ok: the same, as tensors, for torch.compile

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, per_channel={self.per_channel}, track={self.tracking}, "
                f"dampen={self.dampen}, freeze={self.freeze}")

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        name = _backend.resolve(w.device.type)
        first, in_kernel, track, scale, b = self._begin(w, name)
        try:
            w_hat, d, counts = quantize_weight(
                w, scale, b["flags"], b["ema"], (b["prev_int"], b["freq"]) if track else None, b["freeze_threshold"],
                self.qmin, self.qmax, self.momentum, self.dampen, self.damp_div, self.grad_scale, name,
                self.scale_min, check_finite=in_kernel and self.check_finite,
                weight_ref=self._op_weight_ref(in_kernel))
        except RuntimeError as e:
            if in_kernel:
                self._raise_check_failure(str(e), w)
            raise
        self._end(first, track, d, counts)
        return w_hat

    def _begin(self, w: torch.Tensor, name: str):
        """A forward's checks and choices before the op: (first, in_kernel, track, scale, buffers)."""
        if not w.is_floating_point() or w.shape != self.shape:
            who = self.layer_name
            check_float_input(w, who, "weight")
            raise ValueError(f"{who}: weight shape {tuple(w.shape)} does not match the quantizer's {self.shape}")
        first = self._is_first()
        # Eager on the CPU with the C++ op, its kernel checks (NaN/Inf, checksum) in one pass over the weight
        # that leaves it in cache for the tracked kernel: cheaper than the Python checks
        # (bench/results/cpu/docstring_numbers.md, `quantizers-checks-in-op`).
        in_kernel = first and checks_in_kernel(w, name)
        # The dicts, not self.<name>: nn.Module.__getattr__ costs a measurable part of a forward per parameter or
        # buffer read (bench/results/cpu/docstring_numbers.md, `quantizers-module-dicts`).
        scale, b = self._parameters["scale"], self._buffers
        if first and not in_kernel:
            if self.check_finite:
                self._check("weight/scale", w, scale)
            if _compiling():        # always traced, so that no guard on `weight_ref is None` recompiles at step 2
                self._check_weight_compiled(w)
            elif self.weight_ref is not None:
                self._check_weight(w)
        elif in_kernel and self.weight_ref is not None and self.__dict__.get("weight_ref_region") is not None:
            self._check_weight(w)       # a shard's checksum: checked here on its box, not by the op
        return first, in_kernel, first and self.tracking, scale, b

    def _op_weight_ref(self, in_kernel: bool):
        """The checksum the C++ op compares the whole weight with (None: no check in the op)."""
        if not in_kernel or self.__dict__.get("weight_ref_region") is not None:
            return None
        return self.weight_ref

    def _end(self, first: bool, track: bool, d, counts) -> None:
        if first:
            _assign(self, "armed", False)
        if track:
            _assign(self, "last_counts", counts)
        _assign(self, "last_damp", d if self.dampen else None)

    def _raise_check_failure(self, error: str, w: torch.Tensor) -> None:
        if KERNEL_NONFINITE_ERROR in error:
            raise NonFiniteError(nonfinite_message(self, "weight/scale", (w, self.scale))) from None
        if KERNEL_CHANGED_ERROR in error:
            raise WeightChangedError(weight_check.message(self.layer_name)) from None

    def _check_weight_compiled(self, w: torch.Tensor) -> None:
        region = self.__dict__.get("weight_ref_region")
        bad = weight_check.changed(self.weight_ref_t, w, region) & self.weight_ref_ok
        self.fault = torch.maximum(self.fault, bad.to(torch.int32) * step_hook.FAULT_WEIGHT_CHANGED)

    def _check_weight(self, w: torch.Tensor) -> None:
        region = self.__dict__.get("weight_ref_region")
        if _eager_cpu((w,)):
            if bool(weight_check.changed(self.weight_ref, w, region)):
                raise WeightChangedError(weight_check.message(self.layer_name))
            return
        bad = weight_check.changed(self.weight_ref, w, region).to(torch.int32) * step_hook.FAULT_WEIGHT_CHANGED
        self.fault = torch.maximum(self.fault.to(bad.device), bad)

    def __setstate__(self, state):
        super().__setstate__(state)
        if "weight_ref_t" not in self.__dict__:     # pickled before these existed
            weight_check.forget(self)

    def __getstate__(self):
        # last_damp belongs to the autograd graph of the last forward: copies and pickles must not carry it
        # (copy.deepcopy of a graph tensor fails; QATModelEMA and AveragedModel deep-copy the model).
        state = super().__getstate__()
        state["last_damp"] = None
        return state

    # ---- views of the packed state (docs/semantics.md)
    def frozen(self) -> torch.Tensor:
        if self.flags is None:
            return torch.zeros(self.shape, dtype=torch.bool, device=self.scale.device)
        return decode_flags(self.flags)[0] >= 1

    def frozen_int(self) -> torch.Tensor:
        return torch.where(self.frozen(), self.ema, torch.zeros_like(self.ema)).to(torch.int8)

    def last_dir(self) -> torch.Tensor:
        if self.flags is None:
            return torch.zeros(self.shape, dtype=torch.int8, device=self.scale.device)
        return decode_flags(self.flags)[1].to(torch.int8)

    def int_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The integers the next untracked forward of `w` uses (frozen weights included)."""
        s = self.scale.detach().float().reshape(-1, *([1] * (w.dim() - 1)))
        w_int = torch.round(w.detach().float() * (1.0 / s)).clamp(self.qmin, self.qmax)
        if self.flags is not None:
            w_int = torch.where(self.frozen(), self.ema, w_int)
        return w_int.to(torch.int8)

    def _apply(self, fn, recurse=True):
        # model.half()/.to(dtype) must not touch the scale or the fp32 state (docs/semantics.md).
        super()._apply(fn, recurse)
        self.weight_ref = None      # the weight moves or changes dtype with it
        weight_check.forget(self)
        if self.scale.dtype != torch.float32:
            self.scale.data = self.scale.data.float()
        for k in ("freq", "ema", "freeze_threshold"):
            buf = getattr(self, k)
            if buf is not None and buf.dtype != torch.float32:
                setattr(self, k, buf.float())
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for k in STATE_NAMES:
            key, own = prefix + k, getattr(self, k)
            if key in state_dict and own is not None:
                got = state_dict[key]
                if tuple(got.shape) != tuple(own.shape) or got.dtype != own.dtype:
                    raise ValueError(f"{self.layer_name}: state {k!r} in the checkpoint has shape "
                                     f"{tuple(got.shape)} and dtype {got.dtype}, expected {tuple(own.shape)} "
                                     f"and {own.dtype}")
        key = prefix + "scale"
        if key in state_dict and tuple(state_dict[key].shape) != tuple(self.scale.shape):
            raise ValueError(f"{self.layer_name}: scale in the checkpoint has shape {tuple(state_dict[key].shape)}, "
                             f"expected {tuple(self.scale.shape)}")
        # values no run can write (a hand-edited or corrupted checkpoint): refused before anything is copied
        state_check.check_loaded_state(self.layer_name, state_dict, prefix, {k: getattr(self, k) for k in STATE_NAMES},
                                       self.qmin, self.qmax)
        self.weight_ref = None      # the layer's weight is being loaded too
        weight_check.forget(self)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def get_extra_state(self):
        return {"armed": self.armed}

    def set_extra_state(self, state):
        self.armed = bool(state.get("armed", True))


_KERNEL_ERROR_LAYER = re.compile(r"\[layer (\d+)\]")


def quantize_weights(quantizers, weights) -> list[torch.Tensor]:
    """`[q(w) for q, w in zip(quantizers, weights)]`: the same outputs, state, errors and gradients, bit for bit.
    Eager on the cpp and cuda backends it is one C++ call with one autograd node for all of them
    (oscqat_C::weight_quant_list) instead of a call and a node per layer (on CPU also one parallel region for all
    their kernels; measured: bench/results/cpu/docstring_numbers.md, `batch-weights`).
    One difference: the step's first-forward checks of every layer (NaN/Inf, weight changed) run before any of
    them writes state, so a failure leaves every layer's state as it was (the first failing layer in list order is
    named). Elsewhere (torch.compile, other backends, mixed devices, a quantizer listed twice) it is the loop."""
    qs, ws = list(quantizers), list(weights)
    if len(qs) != len(ws):
        raise ValueError(f"quantize_weights: {len(qs)} quantizers but {len(ws)} weights")
    if not ws:
        return []
    dev = ws[0].device
    name = _backend.resolve(dev.type)
    native = native_weight_op(name)
    if native is None or len({id(q) for q in qs}) != len(qs) or any(w.device != dev for w in ws):
        return [q(w) for q, w in zip(qs, ws)]
    begun = [q._begin(w, name) for q, w in zip(qs, ws)]
    pi, fl, fr, em, fth, n, p, mom, damp, ddiv, gsc, smin, chk, ref = ([] for _ in range(14))
    for q, (first, in_kernel, track, scale, b) in zip(qs, begun):
        pi.append(b["prev_int"] if track else None)
        fr.append(b["freq"] if track else None)
        fl.append(b["flags"])
        em.append(b["ema"])
        fth.append(b["freeze_threshold"])
        n.append(q.qmin)
        p.append(q.qmax)
        mom.append(q.momentum)
        damp.append(int(q.dampen))
        ddiv.append(q.damp_div)
        gsc.append(q.grad_scale)
        smin.append(q.scale_min)
        chk.append(int(in_kernel and q.check_finite))
        ref.append(q._op_weight_ref(in_kernel))
    try:
        w_hats, ds, counts = native.weight_quant_list(ws, [b[3] for b in begun], pi, fl, fr, em, fth, n, p, mom,
                                                       damp, ddiv, gsc, smin, chk, ref)
    except RuntimeError as e:
        k = _KERNEL_ERROR_LAYER.search(str(e))
        if k is not None:
            i = int(k.group(1))
            qs[i]._raise_check_failure(str(e), ws[i])
        raise
    for q, (first, _, track, _, _), d, c in zip(qs, begun, ds, counts):
        q._end(first, track, d, c)
    return w_hats


class QuantAct(_FirstForwardChecks):
    """LSQ activation quantizer (optional LSQ+ offset). Unsigned after ReLU-like layers, signed otherwise.

    Without calibration, the scale is initialised from the first training batch (LSQ init)."""

    def __init__(self, bits: int = 4, signed: bool = True, offset: bool = False, lsq_grad_scale: bool = True,
                 name: str = "", scale_min: float = SCALE_MIN, check_finite: bool = True):
        super().__init__()
        self.layer_name = name or "QuantAct"
        self.scale_min = check_scale_min(scale_min, self.layer_name)
        self.check_finite = bool(check_finite)
        self.bits = check_bits(bits, self.layer_name)
        self.signed = bool(signed)
        self.lsq_grad_scale = lsq_grad_scale
        self.scale = nn.Parameter(torch.ones(1))
        self.offset = nn.Parameter(torch.zeros(1)) if offset else None
        self.initialized = False

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, offset={self.offset is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        who = self.layer_name
        check_float_input(x, who, "input")
        if not self.initialized:
            if not self.training:
                raise RuntimeError(f"{who}: activation scale is not initialised; calibrate with "
                                   f"oscqat.prepare(model, config, calib_data) or run a training step first")
            if self.check_finite:
                self._check("input", x)
            with torch.no_grad():
                lsq = 2 * x.detach().float().abs().mean() / math.sqrt(self.qmax)
                self.scale.copy_(torch.where(lsq > 0, lsq, 1.0 / self.qmax).clamp_min(self.scale_min))
            self.initialized = True
        backend = _backend.resolve(x.device.type)
        params = (self.scale,) + ((self.offset,) if self.offset is not None else ())
        # Compiled on the CPU, the fused backward checks x (the flag is read after the optimizer step anyway); a
        # backward runs when anything here needs a gradient.
        in_bwd = (self.check_finite and compiling_on_cpu(x) and torch.is_grad_enabled()
                  and any(t.requires_grad for t in (x,) + params))
        if in_bwd:
            fault = self.fault if self._first_forward("scale/offset", *params) else None
        else:
            fault = None
            self._first_forward("input/scale/offset", x, *params)
        per_sample = x.numel() // x.shape[0] if x.dim() > 1 else x.numel()
        gs = 1.0 / math.sqrt(per_sample * self.qmax) if self.lsq_grad_scale else 1.0
        return ActQuantFn.apply(x, self.scale, self.offset, self.qmin, self.qmax, gs, backend, self.scale_min,
                                fault)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for p in (self.scale, self.offset):
            if p is not None and p.dtype != torch.float32:
                p.data = p.data.float()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # calibration gives an offset to the quantizers it makes asymmetric; a model prepared without it takes
        # the checkpoint's
        if prefix + "offset" in state_dict and self.offset is None:
            self.offset = nn.Parameter(torch.zeros(1, device=self.scale.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self):
        return {"signed": self.signed, "initialized": self.initialized}

    def set_extra_state(self, state):
        self.signed = bool(state["signed"])
        self.initialized = bool(state["initialized"])
