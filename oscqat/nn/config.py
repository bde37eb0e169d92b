"""QATConfig: what `oscqat.prepare` quantizes, how, and with which oscillation remedy."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

METHODS = ("lsq", "dampen", "freeze", "dampen+freeze", "tr", "tr+dampen", "tr+freeze", "tr+dampen+freeze")
INITS = ("mse", "lsq", "minmax")
DAMP_REDUCTIONS = ("sum", "kernel_mean")


def check_scale_min(value, who: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1e-30 <= value < 1:
        raise ValueError(f"{who}: scale_min must be a number in [1e-30, 1), got {value!r}")
    return float(value)


def check_bits(bits, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{what}: bits must be an integer in 2..8, got {bits!r}")
    return bits


@dataclass
class QATConfig:
    """Validated on construction; every field has the default a MobileNet-class W4A4 run wants.

    Input and output layers (`first_last_bits`): the quantized layers that take the model's input and those whose
    output reaches the model's output through no other quantized layer (every output conv of a detector), found
    by tracing one forward of the first calibration batch (torch.fx without `calib_data`; module order when
    neither works, said in the summary). `first_layers` / `last_layers` name them instead (fnmatch patterns of
    module names; each must match a quantized layer). A layer whose weight does not train (requires_grad=False,
    e.g. a fixed decoding conv) stays in float unless `quantize_frozen_layers`.

    Activation grids, chosen at calibration per quantizer: unsigned when every input was >= 0 (after ReLU);
    unsigned with a learned LSQ+ offset starting at the minimum when the inputs dip below zero by at most
    `asym_act_tail` times their maximum, or come from SiLU/Hardswish/GELU/Mish (bounded below by -0.375);
    signed otherwise."""
    weight_bits: int = 4
    act_bits: int = 4
    method: str = "dampen+freeze"            # QATConfig(4, 4, "dampen+freeze") reads as it is meant
    per_channel: bool = False
    quantize_activations: bool = True
    first_last_bits: int | None = 8          # None: first/last layers get weight_bits/act_bits too
    first_layers: tuple[str, ...] | None = None   # fnmatch patterns of the input layers; None: from the graph
    last_layers: tuple[str, ...] | None = None    # fnmatch patterns of the output layers; None: from the graph
    quantize_frozen_layers: bool = False     # quantize layers whose weight does not train (requires_grad=False)
    skip: tuple[str, ...] = ()               # fnmatch patterns of module names left in float
    track: bool = True                       # oscillation tracking (needed by 'freeze' and the reports)
    track_max_bits: int = 4                  # track/freeze/dampen only layers at <= this many bits
    momentum: float = 0.001                  # EMA momentum of the oscillation frequency and integer EMA
    freeze_start: float = 0.04               # f_th annealed by a cosine from start to end
    freeze_end: float = 0.01
    damp_lambda: float = 0.01                # lambda annealed by a cosine from 0 to this
    warmup: float = 0.25                     # fraction of steps before freezing/dampening start
    damp_reduction: str = "kernel_mean"
    weight_init: str = "mse"
    act_init: str = "mse"
    lsq_grad_scale: bool = True
    act_offset: bool = False                 # LSQ+ learned offset for every activation quantizer
    asym_act_tail: float = 0.1               # see the class docstring; 0: no asymmetric grids chosen at calibration
    calib_batches: int = 8
    scale_min: float = 1e-6                  # floor of every learned scale (docs/semantics.md, "Scale floor")
    check_finite: bool = True                # NaN/Inf check in each step's first forward (no sync on GPU)
    # Learn the scale (and offset) of the quantizers of the model's input, those of the input layers? Off, they
    # keep the calibrated (or first-batch) range: learning it is what makes the first convolution compute its
    # input gradient, which nothing else needs (bench/results/cpu/docstring_numbers.md, `learn-input-scale`).
    learn_input_scale: bool = False
    # Quantize the weights of all layers in one call (one C++ op, one autograd node) before each training forward
    # instead of one per layer (eager, cpp/cuda backends; measured: bench/results/cpu/docstring_numbers.md,
    # `batch-weights`). The layers batched are those that ran in the previous training forward; one that stops
    # running is tracked once more, and every weight gradient is ready only at the end of backward (DDP cannot
    # overlap their all-reduce; up to one more copy of the weights in memory). docs/semantics.md, "Batched weights".
    batch_weights: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        check_bits(self.weight_bits, "QATConfig.weight_bits")
        check_bits(self.act_bits, "QATConfig.act_bits")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "QATConfig.first_last_bits")
        check_bits(self.track_max_bits, "QATConfig.track_max_bits")
        for name in ("per_channel", "quantize_activations", "track", "lsq_grad_scale", "act_offset", "check_finite",
                     "quantize_frozen_layers", "learn_input_scale", "batch_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QATConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.method not in METHODS:
            raise ValueError(f"QATConfig.method must be one of {METHODS}, got {self.method!r}")
        for name, allowed in (("weight_init", INITS), ("act_init", INITS), ("damp_reduction", DAMP_REDUCTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"QATConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 < self.momentum < 1.0:
            raise ValueError(f"QATConfig.momentum must be in (0, 1), got {self.momentum!r}")
        for name in ("freeze_start", "freeze_end", "damp_lambda"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"QATConfig.{name} must be a finite number >= 0, got {v!r}")
        check_scale_min(self.scale_min, "QATConfig")
        if isinstance(self.asym_act_tail, bool) or not (isinstance(self.asym_act_tail, (int, float))
                                                        and 0 <= self.asym_act_tail <= 1):
            raise ValueError(f"QATConfig.asym_act_tail must be a number in [0, 1], got {self.asym_act_tail!r}")
        for name in ("first_layers", "last_layers"):
            v = getattr(self, name)
            if isinstance(v, str) or (v is not None and not all(isinstance(p, str) for p in v)):
                raise ValueError(f"QATConfig.{name} must be None or a tuple of module-name patterns, got {v!r}")
            if v is not None:
                setattr(self, name, tuple(v))
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"QATConfig.warmup must be in [0, 1), got {self.warmup!r}")
        if self.freeze and not self.track:
            raise ValueError("QATConfig: method 'freeze' needs track=True")
        if self.transition and not self.track:
            raise ValueError("QATConfig: method 'tr' (transition-rate scheduling) needs track=True")
        self.skip = tuple(self.skip)

    @property
    def dampen(self) -> bool:
        return "dampen" in self.method

    @property
    def freeze(self) -> bool:
        return "freeze" in self.method

    @property
    def transition(self) -> bool:
        """Transition-rate scheduling (oscqat.TransitionRateSchedule) drives the latent weights' learning rate."""
        return "tr" in self.method.split("+")
