"""Data-parallel training with oscqat: DDP and FSDP2 (`fully_shard`). Looking through wrappers and keeping oscqat's
buffers out of DDP's broadcasts: oscqat/nn/wrappers.py.

- `StateConsistencyCheck`: opt-in, every N steps, one all-reduce of per-layer checksums of the state, read
  without blocking; raises naming the first layer whose state differs between ranks.
- `sync_bn_statistics`: used by `reestimate_bn` when a process group is initialised.

Semantics: docs/semantics.md, "Distributed"."""
from __future__ import annotations

import torch
from torch import nn

from ..nn.layers import quant_layers, weight_quantizers
from ..nn.quantizers import STATE_NAMES
from ..nn.step_hook import host_copy
from ..nn.wrappers import prepared, state_buffer_names, unwrap


def _dist():
    """torch.distributed when a default process group is initialised, else None."""
    if not torch.distributed.is_available():
        return None
    import torch.distributed as dist
    return dist if dist.is_initialized() else None


def world_size(group=None) -> int:
    dist = _dist()
    return 1 if dist is None else dist.get_world_size(group)


def ddp_broadcast_names(ddp: nn.Module) -> list[str]:
    """The names of the buffers `ddp` (a DistributedDataParallel) broadcasts before a forward."""
    ddp._assign_modules_buffers()
    return list(ddp.named_module_buffers)


def check_ddp(ddp: nn.Module) -> None:
    """Raise when DistributedDataParallel `ddp` broadcasts oscqat state (it wraps a module on which neither
    `prepare` nor `exclude_state_from_ddp` was called before wrapping)."""
    if not isinstance(ddp, nn.parallel.DistributedDataParallel):
        return
    state = set(state_buffer_names(ddp.module))
    sent = [n for n in ddp_broadcast_names(ddp) if n in state] if ddp.forward_sync_buffers else []
    if sent:
        raise ValueError(f"DistributedDataParallel broadcasts {len(sent)} oscqat buffers every forward (e.g. "
                         f"{sent[0]!r}): call oscqat.exclude_state_from_ddp(module) on the module before wrapping "
                         f"it (oscqat.prepare does it for the model it prepares)")


# ------------------------------------------------------------------------------------------ consistency check
def _checksum64(t: torch.Tensor) -> torch.Tensor:
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(bits).sum(dtype=torch.int64)


def state_checksums(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """(layer names, [L, 4] int64 device tensor): per tracked layer, the sum of the bit patterns of prev_int,
    flags, freq, ema (equal states give equal sums; any single differing value changes its sum)."""
    names, rows = [], []
    for name, layer in quant_layers(unwrap(model)):
        q = layer.weight_quant
        if q.flags is None:
            continue
        names.append(name)
        rows.append(torch.stack([_checksum64(getattr(q, k)) for k in STATE_NAMES]))
    if not rows:
        return names, torch.zeros((0, len(STATE_NAMES)), dtype=torch.int64)
    return names, torch.stack(rows)


class StateConsistencyCheck:
    """Opt-in check that every rank holds the same oscqat tracking state (it should: the state is a function of
    the replicated weights, and DDP does not communicate it). Call `step()` after each optimizer step; every
    `every` steps it launches one asynchronous all-reduce (MAX of [checksums, -checksums], 8 x 4 x layers bytes)
    and reads it once it has arrived (on CUDA through a non-blocking copy to pinned memory and an event, as the
    NaN/Inf flags): no host-device sync and no wait on the network in the training loop. `check()` waits for
    the pending result (e.g. at the end of an epoch). A difference raises RuntimeError naming the first layer,
    in module order, and which state differs. Without an initialised process group it does nothing."""

    def __init__(self, model: nn.Module, every: int = 100, group=None):
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"StateConsistencyCheck: every must be a positive integer, got {every!r}")
        prepared(model, "StateConsistencyCheck")
        check_ddp(model)
        self.model, self.every, self.group = model, every, group
        self.steps = 0
        self._pending = None

    def step(self) -> None:
        self.steps += 1
        self._resolve(block=False)
        if self.steps % self.every == 0 and self._pending is None:
            self._launch()

    def check(self) -> None:
        """Launch a check now (when none is pending) and wait for it."""
        if self._pending is None:
            self._launch()
        self._resolve(block=True)

    def _launch(self) -> None:
        dist = _dist()
        if dist is None or dist.get_world_size(self.group) == 1:
            return
        names, sums = state_checksums(self.model)
        both = torch.cat([sums, -sums])
        work = dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        host, event = both, None
        if both.device.type == "cuda":
            work.wait()       # the current stream waits for the collective; the host does not
            host, event = host_copy(both)
            work = None
        self._pending = (work, event, host, names, self.steps)

    def _resolve(self, block: bool) -> None:
        if self._pending is None:
            return
        work, event, host, names, step = self._pending
        if not block:
            if work is not None and not work.is_completed():
                return
            if event is not None and not event.query():
                return
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()
        self._pending = None
        n = len(names)
        hi, lo = host[:n], -host[n:]
        differ = (hi != lo)
        if bool(differ.any()):
            i = int(differ.any(1).nonzero()[0, 0])
            which = [k for k, d in zip(STATE_NAMES, differ[i].tolist()) if d]
            raise RuntimeError(
                f"oscqat: the tracking state of {names[i]} ({', '.join(which)}) differs between ranks at step "
                f"{step} ({int(differ.any(1).sum())} of {n} tracked layers differ). The state is a function of the "
                f"weights, which data parallelism keeps identical: a rank trained on other weights, loaded another "
                f"checkpoint, or changed the state outside oscqat (oscqat.broadcast_state(model) copies rank 0's)")


def broadcast_state(model: nn.Module, src: int = 0, group=None) -> None:
    """Copy rank `src`'s oscqat state (tracking state, freezing thresholds) to every rank: e.g. after a
    checkpoint was loaded on one rank only (DDP's construction-time broadcast skips it, see
    `exclude_state_from_ddp`)."""
    dist = _dist()
    if dist is None:
        return
    with torch.no_grad():
        for q in weight_quantizers(unwrap(model)):
            for k in STATE_NAMES + ("freeze_threshold",):
                t = getattr(q, k)
                if t is not None:
                    dist.broadcast(t, src, group=group)


# ----------------------------------------------------------------------------------------- BN re-estimation
@torch.no_grad()
def sync_bn_statistics(bns, group=None, extra: torch.Tensor | None = None) -> None:
    """Replace each BatchNorm's running statistics by the average of the ranks' cumulative averages, weighted by
    how many batches each rank's BN saw (`num_batches_tracked`): what one process computes over all ranks'
    batches with momentum=None, up to float summation order. One all-reduce (float64) of all BNs' statistics;
    `extra` (a float64 tensor on the same device) is summed over the ranks in it too, in place."""
    dist = _dist()
    if dist is None or dist.get_world_size(group) == 1:
        return
    bns = [m for m in bns if m.track_running_stats and m.running_mean is not None]
    dev = bns[0].running_mean.device if bns else (extra.device if extra is not None else torch.device("cpu"))
    counts = [m.num_batches_tracked.to(dev, torch.float64).reshape(1) for m in bns]
    parts = [t for m, c in zip(bns, counts) for t in (m.running_mean.to(torch.float64) * c,
                                                      m.running_var.to(torch.float64) * c)]
    parts += counts + ([extra.to(dev, torch.float64).reshape(-1)] if extra is not None else [])
    if not parts:
        return
    flat = torch.cat(parts)
    dist.all_reduce(flat, group=group)
    off = 0
    base = sum(2 * m.running_mean.numel() for m in bns)
    for i, m in enumerate(bns):
        k = m.running_mean.numel()
        n = flat[base + i]
        m.running_mean.copy_(torch.where(n > 0, flat[off:off + k] / n.clamp_min(1), m.running_mean.to(torch.float64)))
        m.running_var.copy_(torch.where(n > 0, flat[off + k:off + 2 * k] / n.clamp_min(1),
                                        m.running_var.to(torch.float64)))
        m.num_batches_tracked.copy_(n.round().to(m.num_batches_tracked.dtype))
        off += 2 * k
    if extra is not None:
        extra.copy_(flat[base + len(bns):].reshape(extra.shape))
