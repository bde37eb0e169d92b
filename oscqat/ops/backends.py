"""Backend registry: which implementation of the op contract (docs/semantics.md) runs.

A backend is a module exposing `weight_fwd`, `weight_fwd_track`, `weight_bwd`, `act_fwd`, `act_bwd` with the
signatures of `oscqat.ops.reference`, and `check(device_type)` raising `BackendUnavailable` with the reason it
cannot run tensors of that device type here.
"""
from __future__ import annotations

import importlib
import sys

from ..errors import BackendUnavailable

NAMES = ("auto", "torch", "triton", "cpp", "cuda")
_MODULES = {"torch": "oscqat.ops.reference", "triton": "oscqat.kernels.triton.backend", "cpp": "oscqat.ops.cpp",
            "cuda": "oscqat.ops.cpp"}
# Fastest first; 'auto' takes the first that can run the tensor's device type.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}

_current = "auto"
_fallbacks_said: set[str] = set()
_resolved: dict[tuple[str, str], str] = {}


def load(name: str):
    """The backend module for `name` (not 'auto')."""
    if name not in _MODULES:
        raise ValueError(f"unknown oscqat backend {name!r}; choose one of {', '.join(NAMES)}")
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as e:
        raise BackendUnavailable(f"oscqat backend {name!r} is unavailable: {e}") from e


_OPS = ("weight_fwd", "weight_fwd_track", "weight_bwd", "act_fwd", "act_bwd")


def check(name: str, device_type: str) -> None:
    """Raise BackendUnavailable unless backend `name` can run tensors on `device_type`."""
    mod = load(name)
    missing = [op for op in _OPS if not hasattr(mod, op)]
    if missing:
        raise BackendUnavailable(f"oscqat backend {name!r} does not implement {', '.join(missing)}")
    check_fn = getattr(mod, "check", None)
    if check_fn is not None:
        check_fn(name, device_type)


def available(name: str, device_type: str) -> bool:
    try:
        check(name, device_type)
        return True
    except BackendUnavailable:
        return False


def _assume_constant_result(fn):
    """`torch.compiler.assume_constant_result(fn)` without its `import torch._dynamo` (seconds at `import oscqat`:
    bench/results/cpu/import_time.md): that decorator only sets this attribute, which dynamo reads when it traces
    a call of `fn` (tests/test_import_time.py checks that it still does)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def resolve(device_type: str) -> str:
    """The concrete backend name for tensors on `device_type` under the current setting (a constant for
    torch.compile: it is decided once per setting and device type)."""
    key = (_current, device_type)
    if key not in _resolved:
        _resolved[key] = _current if _current != "auto" else _first_available(device_type)
    return _resolved[key]


def _first_available(device_type: str) -> str:
    order = _AUTO_ORDER.get(device_type, ("torch",))
    for name in order:
        try:
            check(name, device_type)
            return name
        except BackendUnavailable as e:
            if name not in _fallbacks_said and name != "torch":
                _fallbacks_said.add(name)
                print(f"oscqat: falling back from {name!r} on {device_type}: {e}", file=sys.stderr)
    return "torch"


def get_backend(device_type: str | None = None) -> str:
    """The setting ('auto' or a name); with `device_type` ('cpu', 'cuda'), the backend that actually runs there."""
    return _current if device_type is None else resolve(device_type)


def set_backend(name: str) -> None:
    """Select the backend for every oscqat op: 'auto' (fastest available per device) or a backend name."""
    global _current
    if name not in NAMES:
        raise ValueError(f"unknown oscqat backend {name!r}; choose one of {', '.join(NAMES)}")
    if name != "auto":
        mod = load(name)
        devices = getattr(mod, "DEVICE_TYPES", ("cpu", "cuda"))
        reasons = []
        for dev in devices:
            try:
                check(name, dev)
                break
            except BackendUnavailable as e:
                reasons.append(str(e))
        else:
            raise BackendUnavailable("; ".join(dict.fromkeys(reasons)) or f"oscqat backend {name!r} is unavailable")
    _current = name


class use_backend:
    """Select the backend: as a plain call, `oscqat.use_backend("torch")`, it stays selected (like `set_backend`);
    as a context manager, `with oscqat.use_backend("torch"):`, the previous setting comes back on exit."""

    def __init__(self, name: str):
        self.previous = _current
        set_backend(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        set_backend(self.previous)
        return False
