"""Which modules are BatchNorms, for each use: the one list of each rule.

- `RUNNING_STATS`: the BatchNorms whose running statistics are re-estimated (`reestimate_bn`), calibrated around
  (`prepare`) and corrected into (`quantization_correction`) — every subclass too: an activation a subclass adds
  does not change what the statistics are.
- `foldable_bn`: the BatchNorms folding may replace by nn.Identity (`fold_bn`, `convert(fold_bn=True)`)."""
from __future__ import annotations

from torch import nn

RUNNING_STATS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# The BatchNorms folded into the layer before them, by `fold_bn` and by `convert(fold_bn=True)`: exactly these
# types, never a subclass, which may add an activation (timm's BatchNormAct2d) that replacing it by nn.Identity
# would drop. Matched by name, so that torchvision need not be imported. 
_FOLDABLE = {f"torch.nn.modules.batchnorm.{n}" for n in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
                                                            "SyncBatchNorm")} | \
    {"torchvision.ops.misc.FrozenBatchNorm2d"}


def foldable_bn(m: nn.Module) -> bool:
    """Whether `m` is a BatchNorm that folding may replace by nn.Identity (the one rule for fold_bn and convert)."""
    return f"{type(m).__module__}.{type(m).__qualname__}" in _FOLDABLE
