"""`oscqat.convert`: the inference model of a QAT model. Every quantized layer keeps its weight as int8 integers
(frozen weights at their frozen integers) plus fp32 scale(s); every activation quantizer becomes a fixed
(scale, offset, bits) quantizer. The arithmetic is docs/semantics.md's, written with torch's standard
`quantized_decomposed` quantize/dequantize ops (`round(x * (1/s))`, round half to even, clamp to the low-bit
range; `q * s`), so the eval output equals the QAT model's bit for bit (docs/export.md)."""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from torch.ao.quantization.fx import _decomposed
from torch.nn import functional as F

from ..nn.batchnorm import foldable_bn
from ..nn.layers import QuantConv1d, QuantConv2d, QuantLinear, _QuantLayer
from ..nn.prepare import _set_submodule
from ..nn.quantizers import QuantAct
from ..nn.weight_check import is_dtensor
from ..nn.wrappers import unwrap

# The quantize/dequantize calls of the converted modules: torch's `quantized_decomposed` ops (registered by
# importing _decomposed), whose CPU implementation is the ATen code of _decomposed's Python functions. Under
# `aten_qdq()` the modules call those functions directly, so that tracing records the ATen ops themselves.
_QDQ_OPS = torch.ops.quantized_decomposed
_qdq = _QDQ_OPS


@contextlib.contextmanager
def aten_qdq():
    """Within it, converted modules quantize/dequantize with plain ATen ops (same arithmetic, same bits)."""
    global _qdq
    _qdq = _decomposed
    try:
        yield
    finally:
        _qdq = _QDQ_OPS


def _finite_scale(values: torch.Tensor, who: str, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{who}: {what} is not finite ({values.flatten()[:8].tolist()}); it cannot be "
                         f"converted or exported")
    return values


class FixedQuantAct(nn.Module):
    """An activation quantizer with a fixed scale and offset: y = clamp(round((x - o) * (1/s)), n, p) * s + o.
    Unsigned grids use a uint8 container, signed ones int8; (n, p) is the low-bit range."""

    def __init__(self, scale: float, offset: float | None, bits: int, signed: bool, name: str):
        super().__init__()
        self.scale, self.offset, self.bits, self.signed, self.layer_name = scale, offset, bits, signed, name
        self.qmin = -(2 ** (bits - 1)) if signed else 0
        self.qmax = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
        self.container = torch.int8 if signed else torch.uint8

    @classmethod
    def from_quant_act(cls, q: QuantAct) -> "FixedQuantAct":
        who = q.layer_name
        if not q.initialized:
            raise ValueError(f"{who}: the activation scale was never calibrated (prepare the model with "
                             f"calib_data or train it for a step before converting or exporting)")
        scale = _finite_scale(q.scale.detach().float(), who, "the activation scale")
        offset = None if q.offset is None else float(_finite_scale(q.offset.detach().float(), who, "the offset"))
        return cls(float(scale.clamp_min(q.scale_min)), offset, q.bits, q.signed, who)

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}, offset={self.offset!r}, bits={self.bits}, signed={self.signed}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float32 else x.float()
        if self.offset is not None:
            xf = xf - self.offset
        q = _qdq.quantize_per_tensor(xf, self.scale, 0, self.qmin, self.qmax, self.container)
        y = _qdq.dequantize_per_tensor(q, self.scale, 0, self.qmin, self.qmax, self.container)
        if self.offset is not None:
            y = y + self.offset
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def int_weight(layer: _QuantLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 integers of `layer`'s weight as its eval forward uses them, fp32 scales after the floor); the
    integers are docs/semantics.md's w_eff: clamp(round(w * (1/s)), n, p), or the frozen integer."""
    wq = layer.weight_quant
    who = wq.layer_name
    scale = _finite_scale(wq.scale.detach().float(), who, "the weight scale").clamp_min(wq.scale_min)
    w = layer.weight.detach()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{who}: the weight has {int((~torch.isfinite(w)).sum())} NaN/Inf value(s); it cannot "
                         f"be converted or exported")
    wf = w.float().reshape(scale.numel(), -1)
    w_int = torch.round(wf * (1.0 / scale.reshape(-1, 1))).clamp(wq.qmin, wq.qmax).reshape(w.shape)
    if wq.flags is not None:
        w_int = torch.where(wq.frozen(), wq.ema.reshape(w.shape), w_int)
    return w_int.to(torch.int8), scale


class _IntWeightLayer(nn.Module):
    """A conv/linear layer whose weight is int8 integers times fp32 scale(s): w = cast(s * w_int, dtype)."""

    def __init__(self, layer: _QuantLayer, name: str):
        super().__init__()
        wq = layer.weight_quant
        w_int, scale = int_weight(layer)
        self.layer_name, self.bits, self.qmin, self.qmax = name, wq.bits, wq.qmin, wq.qmax
        self.weight_dtype = layer.weight.dtype
        self.register_buffer("weight_int", w_int)
        # per tensor: a Python float, a constant of the exported graph; per channel: a buffer along dim 0
        self.per_channel = wq.per_channel
        if self.per_channel:
            self.register_buffer("weight_scale", scale)
        else:
            self.weight_scale = float(scale)
        self.frozen = wq.frozen().cpu()   # metadata for export_encodings; not used by forward
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.input_quant = None if layer.input_quant is None else FixedQuantAct.from_quant_act(layer.input_quant)
        self.output_correction = copy.deepcopy(layer.output_correction)

    def scales(self) -> torch.Tensor:
        """The weight scale(s) as a 1-D fp32 tensor (1 value per tensor, else 1 per output channel)."""
        return self.weight_scale if self.per_channel else torch.tensor([self.weight_scale])

    def dequantized_weight(self) -> torch.Tensor:
        if self.per_channel:
            w = _qdq.dequantize_per_channel(self.weight_int, self.weight_scale, None, 0, self.qmin, self.qmax,
                                           torch.int8)
        else:
            w = _qdq.dequantize_per_tensor(self.weight_int, self.weight_scale, 0, self.qmin, self.qmax, torch.int8)
        return w if self.weight_dtype == torch.float32 else w.to(self.weight_dtype)

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight_int.shape)}, bits={self.bits}, per_channel={self.per_channel}, "
                f"frozen={int(self.frozen.sum())}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        out = self._apply_weight(x, self.dequantized_weight())
        return out if self.output_correction is None else self.output_correction(out)


class IntLinear(_IntWeightLayer):
    def _apply_weight(self, x, w):
        return F.linear(x, w, self.bias)


class _IntConv(_IntWeightLayer):
    _conv = staticmethod(F.conv2d)

    def __init__(self, layer, name):
        super().__init__(layer, name)
        for k in ("stride", "padding", "dilation", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, k, getattr(layer, k))

    def _apply_weight(self, x, w):
        if self.padding_mode != "zeros":    # as nn.Conv*d._conv_forward
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._conv(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return self._conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class IntConv1d(_IntConv):
    _conv = staticmethod(F.conv1d)


class IntConv2d(_IntConv):
    _conv = staticmethod(F.conv2d)


_INT_LAYER = {QuantConv1d: IntConv1d, QuantConv2d: IntConv2d, QuantLinear: IntLinear}


@torch.no_grad()
def _fold_bn(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows an int-weight conv/linear in an nn.Sequential into it (the types
    `oscqat.fold_bn` folds, `fold.foldable_bn`: exact types, so a subclass that carries an activation stays): with
    k = gamma / sqrt(var + eps), the scales become s * |k| per output channel (per-channel from then on), the
    integers of channels with k < 0 change sign, and the bias becomes (b - mean) * k + beta. The integers keep
    their grid; only fp32 rounding differs from conv-then-BN (docs/export.md)."""
    pairs = [(seq, i, a, b) for seq in model.modules() if isinstance(seq, nn.Sequential)
             for i, (a, b) in enumerate(zip(list(seq), list(seq)[1:]))
             if isinstance(a, _IntWeightLayer) and foldable_bn(b)]
    for seq, i, layer, bn in pairs:
        who = layer.layer_name
        if layer.output_correction is not None:
            raise ValueError(f"{who}: has an unfolded quantization correction between it and its BatchNorm; "
                             f"fold it first (quantization_correction(..., fold=True))")
        if bn.running_var is None:
            raise ValueError(f"{who}: the BatchNorm after it keeps no running statistics; it cannot be folded")
        k = bn.running_var.float().add(bn.eps).rsqrt()
        if bn.weight is not None:       # affine (FrozenBatchNorm2d always is, and has no `affine`)
            k = k * bn.weight.float()
        neg = k < 0
        flip = neg.reshape(-1, *([1] * (layer.weight_int.dim() - 1))) & (layer.weight_int == layer.qmin)
        if bool(flip.any()):
            ch = int(flip.reshape(flip.shape[0], -1).any(1).nonzero()[0])
            raise ValueError(f"{who}: channel {ch} has a negative BatchNorm factor and holds the integer "
                             f"{layer.qmin}, whose negation is off the {layer.bits}-bit grid; cannot fold")
        sign = torch.where(neg, -1, 1).to(torch.int8).reshape(-1, *([1] * (layer.weight_int.dim() - 1)))
        layer.weight_int.mul_(sign)
        scale = layer.scales().to(k.device).expand(k.numel()) * k.abs()
        bias = torch.zeros_like(k) if layer.bias is None else layer.bias.float()
        bias = (bias - bn.running_mean.float()) * k + (bn.bias.float() if bn.bias is not None else 0.0)
        if not layer.per_channel:
            layer.per_channel = True
            del layer.weight_scale
            layer.register_buffer("weight_scale", scale.contiguous())
        else:
            layer.weight_scale.copy_(scale)
        layer.bias = bias.to(layer.weight_dtype)
        seq[i + 1] = nn.Identity()
    return len(pairs)


def _fsdp_original_class(m: nn.Module):
    """The class `fully_shard` replaced, or None for a module FSDP2 did not touch."""
    for i, c in enumerate(type(m).__mro__):
        if c.__name__ == "FSDPModule" and c.__module__.startswith("torch.distributed"):
            return type(m).__mro__[getattr(c, "_orig_cls_mro_index", 2)]
    return None


def _from_torch_distributed(hook) -> bool:
    owner = getattr(hook, "__self__", None)
    mod = getattr(hook, "__module__", None) or (type(owner).__module__ if owner is not None else "")
    return (mod or "").startswith("torch.distributed") or (
        owner is not None and type(owner).__module__.startswith("torch.distributed"))


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_HOOK_FLAGS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@torch.no_grad()
def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` as plain modules: through DDP / FSDP1 / torch.compile wrappers, and for an FSDP2
    (`fully_shard`) model with every sharded parameter gathered to its full tensor (a collective: every rank must
    call it), the original classes, and FSDP's hooks and state left out. `model` is left as it was."""
    model = unwrap(model)
    mods = list(model.modules())
    sharded = any(is_dtensor(p) for m in mods for p in m._parameters.values() if p is not None)
    if not sharded and not any(_fsdp_original_class(m) is not None for m in mods):
        return copy.deepcopy(model)
    saved = []
    try:
        for m in mods:
            entry = {"class": m.__class__, "params": dict(m._parameters), "dict": {}}
            orig = _fsdp_original_class(m)
            if orig is not None:
                m.__class__ = orig
            for k in list(m.__dict__):
                if k.startswith("__composable_api_state_key") or k in ("_is_fsdp_managed_module",
                                                                       "_fsdp_use_orig_params"):
                    entry["dict"][k] = m.__dict__.pop(k)
            dropped = set()
            for attr in _HOOK_DICTS + _HOOK_FLAGS:
                hooks = m.__dict__.get(attr)
                if hooks:
                    entry["dict"].setdefault("hooks", {})[attr] = hooks
                    if attr in _HOOK_FLAGS:     # flags keyed by hook id, after the hooks themselves
                        m.__dict__[attr] = type(hooks)((k, v) for k, v in hooks.items() if k not in dropped)
                        continue
                    dropped |= {k for k, h in hooks.items() if _from_torch_distributed(h)}
                    m.__dict__[attr] = type(hooks)((k, h) for k, h in hooks.items() if k not in dropped)
            for name, p in list(m._parameters.items()):
                if is_dtensor(p):
                    m._parameters[name] = nn.Parameter(p.full_tensor().detach().clone(),
                                                       requires_grad=p.requires_grad)
            saved.append((m, entry))
        out = copy.deepcopy(model)
    finally:
        for m, entry in saved:
            m.__class__ = entry["class"]
            m._parameters.clear()
            m._parameters.update(entry["params"])
            for attr, hooks in entry["dict"].pop("hooks", {}).items():
                m.__dict__[attr] = hooks
            m.__dict__.update(entry["dict"])
    return out


def convert(model: nn.Module, fold_bn: bool = False, state_dict: dict | None = None) -> nn.Module:
    """The inference model of a prepared (QAT) model, in eval mode, as a new module (`model` is left as it is).

    `model` may be wrapped (DDP, FSDP1, torch.compile) or sharded by FSDP2's `fully_shard` (then its parameters
    are gathered: a collective, call it on every rank). `state_dict`: load it (e.g. the full state dict of
    `torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions(
    full_state_dict=True))`, or a saved one) into the copy before converting; `model` then only gives the
    structure (a prepared model of the same architecture).

    Every QuantConv1d/QuantConv2d/QuantLinear becomes an IntConv1d/IntConv2d/IntLinear holding int8 integers
    (frozen weights at their frozen integers) and fp32 scale(s); every QuantAct a FixedQuantAct. Its output equals
    `model.eval()`'s bit for bit on CPU. `fold_bn=True` also folds each BatchNorm that directly follows a converted
    layer in an nn.Sequential into it (same integers, per-channel scales; outputs then differ by fp32 rounding,
    docs/export.md). A never-calibrated activation quantizer or a non-finite scale is a ValueError naming the
    layer."""
    model = unwrap(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantLayer)]
    if not layers:
        raise ValueError("convert: the model has no oscqat layer; call oscqat.prepare first")
    if any(isinstance(m, _IntWeightLayer) for m in model.modules()):
        raise ValueError("convert: the model is already converted")
    out = plain_copy(model).eval()
    if state_dict is not None:
        out.load_state_dict(state_dict)
    for name, layer in [(n, m) for n, m in out.named_modules() if isinstance(m, _QuantLayer)]:
        new = _INT_LAYER[type(layer)](layer, name)
        for attr in ("_forward_pre_hooks", "_forward_hooks"):
            getattr(new, attr).update(getattr(layer, attr))
        _set_submodule(out, name, new)
    left = [m.layer_name for m in out.modules() if isinstance(m, QuantAct)]
    if left:
        raise ValueError(f"convert: activation quantizer(s) outside an oscqat layer cannot be converted: {left}")
    if fold_bn:
        _fold_bn(out)
    return out


def int_layers(model: nn.Module) -> list[tuple[str, _IntWeightLayer]]:
    """(name, layer) of every converted int-weight layer of `model`, in module order."""
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, _IntWeightLayer)]


def as_converted(model: nn.Module) -> nn.Module:
    """`model` when it is already converted, else `convert(model)` (through wrappers, see `convert`)."""
    return unwrap(model) if int_layers(model) else convert(model)

