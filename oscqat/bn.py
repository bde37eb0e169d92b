"""BatchNorm re-estimation after QAT (the paper's fix for statistics corrupted by oscillating weights)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable, num_batches: int = 50) -> int:
    """Replace every BatchNorm's running statistics by their cumulative average over `num_batches` batches
    (momentum=None) of the quantized model. Quantizer state, scales and module modes are left as they were.
    Returns the number of batches used."""
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    used = 0
    try:
        model.eval()   # quantizers in eval: no tracking, no state change
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for batch in batches:
            if used >= num_batches:
                break
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            used += 1
    finally:
        for m in bns:
            m.momentum = momenta[m]
        for m, mode in modes.items():
            m.training = mode
    if used == 0:
        raise ValueError("oscqat.reestimate_bn: no batch was given")
    return used
