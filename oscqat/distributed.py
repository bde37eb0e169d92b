"""Data-parallel training with oscqat: DDP, FSDP2 (`fully_shard`), and the wrappers models come in.

- `unwrap(model)`: the module inside DistributedDataParallel / DataParallel / FSDP1 / torch.compile /
  AveragedModel wrappers; every oscqat entry point that takes a model looks through them (`prepared`,
  `prepared_config`), and raises when it finds no prepared model instead of taking a default.
- `exclude_state_from_ddp(module)`: DDP's per-forward buffer broadcast skips oscqat's state (the tracking
  state is a function of the replicated weights, identical on every rank without communication); `prepare`
  calls it on the model it prepares, so a plain `DDP(model)` moves the bytes the float model moves.
- `StateConsistencyCheck`: opt-in, every N steps, one all-reduce of per-layer checksums of the state, read
  without blocking; raises naming the first layer whose state differs between ranks.
- `sync_bn_statistics`: used by `reestimate_bn` when a process group is initialised.

Semantics: docs/semantics.md, "Distributed"."""
from __future__ import annotations

import sys

import torch
from torch import nn

_STATE = ("prev_int", "flags", "freq", "ema")


def _dist():
    """torch.distributed when a default process group is initialised, else None."""
    if not torch.distributed.is_available():
        return None
    import torch.distributed as dist
    return dist if dist.is_initialized() else None


def world_size(group=None) -> int:
    dist = _dist()
    return 1 if dist is None else dist.get_world_size(group)


_WRAPPERS: dict = {}      # whether torch._dynamo was imported -> the wrapper types


def _wrapper_types() -> tuple:
    """((type, attribute of the wrapped module), ...), imported once."""
    dynamo = "torch._dynamo" in sys.modules
    if dynamo not in _WRAPPERS:
        found = [((nn.parallel.DistributedDataParallel, nn.DataParallel), "module")]
        if dynamo:   # else no compiled module exists, and importing dynamo costs seconds
            from torch._dynamo.eval_frame import OptimizedModule
            found.append(((OptimizedModule,), "_orig_mod"))
        if torch.distributed.is_available():
            try:
                from torch.distributed.fsdp import FullyShardedDataParallel
                found.append(((FullyShardedDataParallel,), "module"))
            except ImportError:  # pragma: no cover
                pass
        from torch.optim.swa_utils import AveragedModel
        found.append(((AveragedModel,), "module"))
        _WRAPPERS[dynamo] = tuple(found)
    return _WRAPPERS[dynamo]


def _wrapped(m: nn.Module) -> nn.Module | None:
    """The module a wrapper holds, or None when `m` is not a known wrapper."""
    for types, attr in _wrapper_types():
        if isinstance(m, types):
            return getattr(m, attr)
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The innermost module of `model` through DDP, DataParallel, FSDP1, torch.compile (OptimizedModule) and
    AveragedModel wrappers, nested in any order. FSDP2 (`fully_shard`) wraps nothing (it changes the module's
    class in place): the module is returned as it is."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    for _ in range(16):
        inner = _wrapped(model)
        if inner is None:
            return model
        model = inner
    return model


def _has_quant_layers(model: nn.Module) -> bool:
    from .layers import _QuantLayer
    return any(isinstance(m, _QuantLayer) for m in model.modules())


def prepared(model: nn.Module, who: str) -> nn.Module:
    """`unwrap(model)`, which must hold oscqat layers (else a ValueError naming `who`)."""
    inner = unwrap(model)
    if not _has_quant_layers(inner):
        through = "" if inner is model else f" (looked inside {type(model).__name__} at {type(inner).__name__})"
        raise ValueError(f"{who}: the model holds no oscqat layer{through}; call oscqat.prepare(model, config) "
                         f"first, and pass the prepared model or its DDP / FSDP / torch.compile wrapper")
    return inner


def prepared_config(model: nn.Module, who: str):
    """The QATConfig `oscqat.prepare` recorded on the prepared model inside `model` (through wrappers; on a
    prepared submodule too). Raises when there is none or several different ones: never a silent default."""
    inner = prepared(model, who)
    configs = []
    for m in inner.modules():
        c = m.__dict__.get("_oscqat_config")
        if c is not None and not any(c == k for k in configs):
            configs.append(c)
    if len(configs) == 1:
        return configs[0]
    if not configs:
        raise ValueError(f"{who}: the model's oscqat layers were not made by oscqat.prepare (no recorded "
                         f"QATConfig); pass config=... explicitly")
    raise ValueError(f"{who}: the model holds {len(configs)} differently prepared parts (methods "
                     f"{', '.join(c.method for c in configs)}); pass config=... explicitly")


# ------------------------------------------------------------------------------------------------------- DDP
def state_buffer_names(model: nn.Module) -> list[str]:
    """Fully qualified names, relative to `model`, of every buffer of every oscqat quantizer (tracking state,
    freezing threshold, flags, counts): what DDP must not broadcast."""
    from .quantizers import QuantAct, WeightQuantizer
    names = []
    for mname, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (WeightQuantizer, QuantAct)):
            names += [f"{mname}.{b}" if mname else b for b, _ in m.named_buffers(recurse=False)]
            # buffers set to None (an untracked quantizer's state) are not listed by named_buffers
            names += [f"{mname}.{b}" if mname else b for b, t in m._buffers.items() if t is None]
    return list(dict.fromkeys(names))


def exclude_state_from_ddp(module: nn.Module) -> list[str]:
    """Make a later `DistributedDataParallel(module)` skip oscqat's buffers in its buffer broadcasts (at
    construction and before every forward); other buffers (BatchNorm's) keep the sync the user chooses.
    `oscqat.prepare` calls it on the model it prepares; call it yourself on an outer module you wrap in DDP
    (a model whose prepared part is a submodule). Returns the names excluded. Uses DDP's
    `_ddp_params_and_buffers_to_ignore` (names kept by earlier callers are kept)."""
    names = state_buffer_names(module)
    old = list(getattr(module, "_ddp_params_and_buffers_to_ignore", ()) or ())
    merged = list(dict.fromkeys(old + names))
    module._ddp_params_and_buffers_to_ignore = merged
    for name, b in module.named_buffers():
        if name in names:
            b._ddp_ignored = True
    return names


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
    from .layers import quant_layers
    names, rows = [], []
    for name, layer in quant_layers(unwrap(model)):
        q = layer.weight_quant
        if q.flags is None:
            continue
        names.append(name)
        rows.append(torch.stack([_checksum64(getattr(q, k)) for k in _STATE]))
    if not rows:
        return names, torch.zeros((0, len(_STATE)), dtype=torch.int64)
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
            host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
            host.copy_(both, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
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
            which = [k for k, d in zip(_STATE, differ[i].tolist()) if d]
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
    from .layers import weight_quantizers
    with torch.no_grad():
        for q in weight_quantizers(unwrap(model)):
            for k in _STATE + ("freeze_threshold",):
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
