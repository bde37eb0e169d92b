"""QATConfig.batch_weights: a prepared model quantizes the weights of all its layers in one call before its forward
(`oscqat.quantize_weights`: in eager mode on the cpp and cuda backends one C++ op and one autograd node), and each
layer takes its result instead of calling its own quantizer. The layers batched are those that ran in the model's
previous training forward, in that order; the others run their quantizer themselves as usual and join the batch at
the next forward. Semantics: docs/semantics.md, "Batched weights"."""
from __future__ import annotations

import threading

import torch
from torch import nn

from .quantizers import quantize_weights


class _Frames(threading.local):
    """Per thread (nn.DataParallel runs replicas in threads), one entry per prepared model whose forward is in
    progress, innermost last: None when that forward does not batch, else ({layer: w_hat} not yet taken, the
    layers that ran, in order)."""

    def __init__(self):
        self.stack: list = []


_frames = _Frames()


def attach(model: nn.Module) -> None:
    model.register_forward_pre_hook(_pre_hook)
    model.register_forward_hook(_post_hook, always_call=True)


def _pre_hook(model: nn.Module, args) -> None:
    if torch.compiler.is_compiling():
        return
    batching = model.training and torch.is_grad_enabled()
    frame = ({}, []) if batching else None
    _frames.stack.append(frame)      # before quantizing: the post-hook runs (and pops) even when this raises
    if batching:
        layers = model.__dict__.get("_oscqat_ran", [])
        frame[0].update(zip(layers, quantize_weights([m.weight_quant for m in layers], [m.weight for m in layers])))


def _post_hook(model: nn.Module, args, output) -> None:
    if torch.compiler.is_compiling() or not _frames.stack:
        return
    frame = _frames.stack.pop()
    if frame is not None:
        model.__dict__["_oscqat_ran"] = list(dict.fromkeys(frame[1]))     # a layer called twice is batched once


def take(layer: nn.Module):
    """The layer's batched w_hat in this forward (None: it runs its quantizer itself), noting that it ran."""
    if torch.compiler.is_compiling() or not _frames.stack:
        return None
    frame = _frames.stack[-1]
    if frame is None:
        return None
    frame[1].append(layer)
    return frame[0].pop(layer, None)
