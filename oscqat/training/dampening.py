"""The dampening loss: sum over layers of D from their last forward (docs/semantics.md)."""
from __future__ import annotations

import torch
from torch import nn

from ..nn.layers import weight_quantizers
from ..nn.wrappers import unwrap


def dampening_loss(model: nn.Module) -> torch.Tensor:
    """Autograd-connected sum of the dampening terms of the last forward: `task + lam * dampening_loss(model)`
    back-propagates `lam` (and AMP's loss scale) into the fused backward. Zero when no layer dampens. `model`: the
    prepared model or its DDP / FSDP / torch.compile wrapper; a model without oscqat layers is a ValueError."""
    qs = weight_quantizers(unwrap(model))
    terms = [q.last_damp for q in qs if q.last_damp is not None]
    if not terms:
        if not qs:
            raise ValueError(f"dampening_loss: the model ({type(model).__name__}) holds no oscqat weight quantizer; "
                             f"call oscqat.prepare on it first")
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return torch.stack(terms).sum()
