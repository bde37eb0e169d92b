"""Where a model's prepared part is: `unwrap` looks through the wrappers a prepared model comes in (DDP,
DataParallel, FSDP1, torch.compile, AveragedModel); `prepared` / `prepared_config` find the prepared model and the
QATConfig `oscqat.prepare` recorded, and raise when there is none instead of taking a default; every oscqat entry
point that takes a model goes through them. `exclude_state_from_ddp` keeps oscqat's buffers out of DDP's buffer
broadcasts (the tracking state is a function of the replicated weights: identical on every rank without
communication); `prepare` calls it on the model it prepares. Semantics: docs/semantics.md, "Distributed"."""
from __future__ import annotations

import sys

import torch
from torch import nn

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
