"""The op contract (docs/semantics.md) and its backends.

- `library.py`: the contract as torch.library custom ops (`torch.ops.oscqat.*`, one schema per op, the backend a
  string argument) and the autograd Functions the quantizers call;
- `fakes.py`: the shape functions of every op, for torch.compile and export (both op namespaces);
- `backends.py`: which backend runs (`oscqat.set_backend`, 'auto');
- the backends: `reference.py` (`torch`, pure PyTorch: the semantics every backend matches bit for bit),
  `cpp.py` (`cpp` and `cuda`: the C++/CUDA extension of csrc/, `torch.ops.oscqat_C.*`), and the `triton` backend
  in kernels/triton/ (installed as `oscqat.kernels.triton`).
"""
from . import library  # noqa: F401  (registers torch.ops.oscqat.*)
