"""BatchNorm re-estimation after QAT (the paper's fix for statistics corrupted by oscillating weights)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..nn.batchnorm import RUNNING_STATS
from ..nn.wrappers import unwrap
from .distributed import sync_bn_statistics, world_size


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable, num_batches: int = 50, sync: bool | None = None,
                  group=None) -> int:
    """Replace every BatchNorm's running statistics by their cumulative average over `num_batches` batches
    (momentum=None) of the quantized model. Quantizer state, scales and module modes are left as they were.
    Returns the number of batches used (on this rank).

    `model` may be wrapped (DDP, FSDP, torch.compile): the batches run through the module inside, without the
    wrapper's buffer broadcasts. With a process group initialised (`sync=None`, or `sync=True`), each rank runs
    its own `batches` (its shard of the data), then one all-reduce makes every rank's statistics the average of
    the ranks' estimates weighted by their batch counts: what one process computes over all ranks' batches, up
    to float summation order (docs/semantics.md, "Distributed"). `sync=False` keeps per-rank statistics."""
    model = unwrap(model)
    if sync is None:
        sync = world_size(group) > 1
    bns = [m for m in model.modules() if isinstance(m, RUNNING_STATS)]
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
    if sync:
        total = torch.tensor([float(used)], dtype=torch.float64,
                             device=next((m.running_mean.device for m in bns if m.running_mean is not None), "cpu"))
        sync_bn_statistics(bns, group, total)
        if float(total) == 0:
            raise ValueError("oscqat.reestimate_bn: no batch was given on any rank")
    elif used == 0:
        raise ValueError("oscqat.reestimate_bn: no batch was given")
    return used
