"""Quantization Correction (QC, Gupta & Asthana 2023): after QAT, learn a per-output-channel affine
`gamma * h + beta` on every quantized layer's output with the rest of the model fixed, then fold it into the
BatchNorm that follows the layer. It absorbs the error that oscillating weights and scales leave behind.

Run it after `reestimate_bn`: re-estimating BatchNorm statistics afterwards would undo a folded correction."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..nn.batchnorm import RUNNING_STATS
from ..nn.layers import quant_layers


class ChannelAffine(nn.Module):
    """y = gamma[c] * h + beta[c] along dim 1 (the output channels of a conv or linear layer)."""

    def __init__(self, channels: int, device=None):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels, device=device))
        self.beta = nn.Parameter(torch.zeros(channels, device=device))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (h.dim() - 2)
        return h * self.gamma.view(shape) + self.beta.view(shape)


def _following_bn(model: nn.Module) -> dict[int, nn.Module]:
    """Layer -> the BatchNorm right after it in the same nn.Sequential (torchvision/timm conv-bn blocks)."""
    found = {}
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            children = list(seq.children())
            for a, b in zip(children, children[1:]):
                if isinstance(b, RUNNING_STATS):
                    found[id(a)] = b
    return found


@torch.no_grad()
def fold_corrections(model: nn.Module) -> int:
    """Fold each layer's correction into the BatchNorm after it (running mean and weight); a correction with a
    gamma too close to 0 to divide by, or with no BatchNorm after its layer, stays in the layer. Returns the
    number folded."""
    bns = _following_bn(model)
    folded = 0
    for _, layer in quant_layers(model):
        qc, bn = layer.output_correction, bns.get(id(layer))
        if qc is None or bn is None or not bn.affine or bool((qc.gamma.abs() < 1e-3).any()):
            continue
        # BN(gamma*h + beta) = w*gamma * (h - (mu - beta)/gamma) / sigma + b
        bn.running_mean.copy_((bn.running_mean - qc.beta) / qc.gamma)
        bn.weight.mul_(qc.gamma)
        layer.output_correction = None
        folded += 1
    return folded


def quantization_correction(model: nn.Module, batches: Iterable, loss_fn: Callable, epochs: int = 1,
                            lr: float = 1e-3, fold: bool = True) -> nn.Module:
    """Learn the corrections on `batches` of (input, target) with `loss_fn(output, target)`, everything else
    fixed (eval mode: BatchNorm uses its running statistics, quantizers do not track), then fold them."""
    layers = [layer for _, layer in quant_layers(model)]
    if not layers:
        raise ValueError("quantization_correction: the model has no oscqat layer; call oscqat.prepare first")
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in requires:
        p.requires_grad_(False)
    for layer in layers:
        layer.output_correction = ChannelAffine(layer.weight.shape[0], device=layer.weight.device)
    params = [p for layer in layers for p in layer.output_correction.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    was_training = model.training
    model.eval()
    try:
        for _ in range(epochs):
            for x, y in batches:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
    finally:
        model.train(was_training)
        for p, r in requires.items():
            p.requires_grad_(r)
    if fold:
        fold_corrections(model)
    return model
