"""WeightQuantizer and QuantAct: the modules that hold scales and oscillation state and call the ops."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import backend as _backend
from .config import check_bits
from .ops import ActQuantFn, WeightQuantFn
from .reference import UNINIT, decode_flags

_STATE = ("prev_int", "flags", "freq", "ema")
_STATE_DTYPES = {"prev_int": torch.int8, "flags": torch.int8, "freq": torch.float32, "ema": torch.float32}


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_scale(scale: torch.Tensor, who: str) -> None:
    """Raise if any scale is non-positive or non-finite. Syncs only for CPU tensors; on accelerators it is an
    asynchronous device assert, so the forward never waits for the device."""
    if _compiling():
        return
    ok = (scale > 0) & torch.isfinite(scale)
    if scale.device.type == "cpu":
        if not bool(ok.all()):
            bad = scale.detach()[~ok][0].item()
            raise ValueError(f"{who}: scale must be positive and finite, got {bad}")
    else:
        torch._assert_async(ok.all(), f"{who}: scale must be positive and finite")


def check_float_input(t: torch.Tensor, who: str, what: str) -> None:
    if not torch.is_floating_point(t):
        raise TypeError(f"{who}: {what} must be a floating-point tensor, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{who}: {what} is empty (shape {tuple(t.shape)})")


class WeightQuantizer(nn.Module):
    """Symmetric signed LSQ weight quantizer with oscillation tracking, freezing and dampening."""

    def __init__(self, shape, bits: int = 4, per_channel: bool = False, track: bool = True,
                 dampen: bool = False, freeze: bool = False, momentum: float = 0.001,
                 damp_reduction: str = "kernel_mean", lsq_grad_scale: bool = True, name: str = ""):
        super().__init__()
        self.layer_name = name or "WeightQuantizer"
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
        for k in _STATE:
            init = torch.full(self.shape, UNINIT, dtype=torch.int8) if k == "flags" else \
                torch.zeros(self.shape, dtype=_STATE_DTYPES[k])
            self.register_buffer(k, init if track else None)
        self.register_buffer("freeze_threshold", torch.zeros(()))
        self.register_buffer("last_counts", torch.zeros(2, dtype=torch.int32), persistent=False)
        self.armed = True
        self.last_damp: torch.Tensor | None = None

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
        who = self.layer_name
        check_float_input(w, who, "weight")
        if tuple(w.shape) != self.shape:
            raise ValueError(f"{who}: weight shape {tuple(w.shape)} does not match the quantizer's {self.shape}")
        check_scale(self.scale, who)
        name = _backend.resolve(w.device.type)
        track = self.training and self.tracking and self.armed
        state = (self.prev_int, self.freq) if track else None
        w_hat, d, counts = WeightQuantFn.apply(
            w, self.scale, self.flags, self.ema, state, self.freeze_threshold, self.qmin, self.qmax,
            self.momentum, self.dampen, self.damp_div, self.grad_scale, name)
        if track:
            self.armed = False
            self.last_counts = counts
        self.last_damp = d if self.dampen else None
        return w_hat

    def arm(self) -> None:
        """Make the next training forward the tracked one (call once per optimizer step)."""
        self.armed = True

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
        if self.scale.dtype != torch.float32:
            self.scale.data = self.scale.data.float()
        for k in ("freq", "ema", "freeze_threshold"):
            buf = getattr(self, k)
            if buf is not None and buf.dtype != torch.float32:
                setattr(self, k, buf.float())
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for k in _STATE:
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
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def get_extra_state(self):
        return {"armed": self.armed}

    def set_extra_state(self, state):
        self.armed = bool(state.get("armed", True))


class QuantAct(nn.Module):
    """LSQ activation quantizer (optional LSQ+ offset). Unsigned after ReLU-like layers, signed otherwise.

    Without calibration, the scale is initialised from the first training batch (LSQ init)."""

    def __init__(self, bits: int = 4, signed: bool = True, offset: bool = False, lsq_grad_scale: bool = True,
                 name: str = ""):
        super().__init__()
        self.layer_name = name or "QuantAct"
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
            with torch.no_grad():
                self.scale.copy_(2 * x.detach().float().abs().mean() / math.sqrt(self.qmax) + 1e-8)
            self.initialized = True
        check_scale(self.scale, who)
        per_sample = x.numel() // x.shape[0] if x.dim() > 1 else x.numel()
        gs = 1.0 / math.sqrt(per_sample * self.qmax) if self.lsq_grad_scale else 1.0
        return ActQuantFn.apply(x, self.scale, self.offset, self.qmin, self.qmax, gs,
                                _backend.resolve(x.device.type))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for p in (self.scale, self.offset):
            if p is not None and p.dtype != torch.float32:
                p.data = p.data.float()
        return self

    def get_extra_state(self):
        return {"signed": self.signed, "initialized": self.initialized}

    def set_extra_state(self, state):
        self.signed = bool(state["signed"])
        self.initialized = bool(state["initialized"])
