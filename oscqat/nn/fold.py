"""`oscqat.fold_bn`: fold each BatchNorm into the quantized layer before it and rescale that layer's weight
quantizer with it, so the folded model computes what the unfolded one did (docs/semantics.md, "Folding
BatchNorm"). A framework's own fuse() changes the weights but not the scales or the frozen integers."""
from __future__ import annotations

import itertools

import torch
from torch import nn

from ..ops.reference import decode_flags, uninitialised
from . import weight_check
from .batchnorm import foldable_bn
from .layers import _QuantLayer


def _pairs(model: nn.Module):
    """(layer name, layer, bn name, parent, child name) for every quantized layer followed by a BatchNorm in the
    same nn.Sequential: there the BatchNorm is the only consumer of the layer's output."""
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.named_children())
        for (a_name, a), (b_name, b) in itertools.pairwise(kids):
            if isinstance(a, _QuantLayer) and foldable_bn(b):
                prefix = f"{seq_name}." if seq_name else ""
                yield prefix + a_name, a, prefix + b_name, seq, b_name


@torch.no_grad()
def fold_bn(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm (nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm, torchvision's FrozenBatchNorm2d; exactly these
    types, not a subclass, which may carry an activation) that directly follows a quantized layer in an
    nn.Sequential (torchvision's and timm's conv-norm blocks) into that layer, in place, using the BatchNorm's
    running statistics (as in eval), and replace it by nn.Identity. Returns the (layer,
    BatchNorm) pairs folded; other BatchNorms are left as they are. Per output channel c, with
    k = gamma / sqrt(running_var + eps):

        weight[c] *= k;  bias[c] = (bias[c] - running_mean[c]) * k + beta[c];  scale[c] = scale * |k|

    A per-tensor weight scale becomes per-channel (k differs per channel). The integers are kept: frozen
    integers stay frozen, and a weight whose rescaled latent value would round to another integer (fp32
    rounding at a bin edge) is moved to its bin centre. Where k < 0 the integers, their EMA and the last
    direction change sign; an integer at the grid's lowest value (-2^(b-1)) has no positive twin, so that is an
    error naming the layer. Folding is for evaluation and export: build a new optimizer to train the folded
    model (its scales may be new tensors; it trains without those BatchNorms)."""
    folded = []
    for name, layer, bn_name, parent, child in list(_pairs(model)):
        _fold(layer, getattr(parent, child), name, bn_name)
        setattr(parent, child, nn.Identity())
        folded.append((name, bn_name))
    return folded


def _fold(layer, bn, name: str, bn_name: str) -> None:
    w, q = layer.weight, layer.weight_quant
    out = w.shape[0]
    if layer.output_correction is not None:
        raise ValueError(f"oscqat.fold_bn: {name} has a quantization correction between it and {bn_name}; fold the "
                         f"correction first (quantization_correction(..., fold=True))")
    if bn.running_mean is None or bn.running_mean.numel() != out:
        raise ValueError(f"oscqat.fold_bn: {bn_name} cannot be folded into {name}: "
                         + ("it keeps no running statistics" if bn.running_mean is None else
                            f"{bn.running_mean.numel()} features for {out} output channels"))
    gamma = bn.weight.double() if bn.weight is not None else torch.ones(out, dtype=torch.float64, device=w.device)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(gamma)
    k = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    view = (-1,) + (1,) * (w.dim() - 1)
    ints = q.int_weight(w).to(torch.int32)
    neg = (k < 0).view(view).expand_as(ints)
    at_min = neg & (ints == q.qmin)
    if bool(at_min.any()):
        c = int(at_min.reshape(out, -1).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"oscqat.fold_bn: {bn_name} has a negative gamma in channel {c} (k = {float(k[c]):.4g}) "
                         f"where {name} has weights at the grid's lowest integer {q.qmin}, which has no positive twin "
                         f"on the signed grid; folding would change them")
    scale = (q.scale.detach().double().expand(out) * k.abs()).float()
    if bool((scale < q.scale_min).any()):
        c = int((scale < q.scale_min).nonzero()[0, 0])
        raise ValueError(f"oscqat.fold_bn: folding {bn_name} into {name} would take the weight scale of channel {c} "
                         f"to {float(scale[c]):.3g}, below scale_min={q.scale_min:g} (gamma {float(gamma[c]):.3g})")
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(k)
    new_w = (w.double() * k.view(view)).to(w.dtype)
    want = torch.where(neg, -ints, ints)
    s_col = scale.view(view)
    got = torch.round(new_w.float() * (1.0 / s_col)).clamp(q.qmin, q.qmax)
    moved = (got != want) & ~q.frozen()      # a frozen weight's latent value is not used
    new_w = torch.where(moved, (want * s_col).to(w.dtype), new_w)
    w.copy_(new_w)
    new_bias = ((bias - bn.running_mean.double()) * k + beta).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)
    if q.per_channel:
        q.scale.copy_(scale)
    else:
        q.per_channel = True
        q.scale = nn.Parameter(scale, requires_grad=q.scale.requires_grad)
        if q.grad_scale != 1.0:          # 1.0 exactly only with the LSQ gradient scale switched off
            q.grad_scale = 1.0 / (w[0].numel() * q.qmax) ** 0.5
    if q.flags is not None and bool(neg.any()):
        q.prev_int.copy_(torch.where(neg, -q.prev_int, q.prev_int))
        q.ema.copy_(torch.where(neg, -q.ema, q.ema))
        fz, last_dir = decode_flags(q.flags)
        flipped = (-last_dir + 4 * fz).to(torch.int8)
        q.flags.copy_(torch.where(neg & ~uninitialised(q.flags), flipped, q.flags))
    q.weight_ref = None
    weight_check.forget(q)
