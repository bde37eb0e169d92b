"""oscqat: oscillation-aware quantization-aware training. Semantics: docs/semantics.md."""
from .backend import BackendUnavailable, get_backend, set_backend, use_backend
from . import ops  # registers the torch.library ops

__all__ = ["BackendUnavailable", "get_backend", "set_backend", "use_backend", "ops"]
