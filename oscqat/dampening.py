"""The dampening loss: sum over layers of D from their last forward (docs/semantics.md)."""
from __future__ import annotations

import torch
from torch import nn

from .prepare import weight_quantizers


def dampening_loss(model: nn.Module) -> torch.Tensor:
    """Autograd-connected sum of the dampening terms of the last forward: `task + lam * dampening_loss(model)`
    back-propagates `lam` (and AMP's loss scale) into the fused backward. Zero when no layer dampens."""
    terms = [q.last_damp for q in weight_quantizers(model) if q.last_damp is not None]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return torch.stack(terms).sum()
