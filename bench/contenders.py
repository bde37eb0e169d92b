"""The contenders of bench/run.py, each built as a zero-argument callable that does one unit of work.

`reference-eager` is OUR re-implementation of the per-step work of the published reference code (Qualcomm AI
Research's `oscillations` repository: an LSQ quantizer with `round_ste` + `grad_scale`, `TrackOscillation` wrapped
around `to_integer_forward`, and `DampeningLoss` as a separate pass over the weights). It is not their code; it
reproduces its structure: separate elementwise ops, float masks, a recomputed `x_int`, boolean-mask indexed
updates (`t[mask] = ...`, which synchronise with the device on CUDA), a separately re-quantized dampening pass,
and one `.item()` host read per tracked layer per step (the per-step oscillation count that the reference logs).
Its state is 25 bytes per weight (prev_x_int, prev_switch_dir, ema_oscillation, total_oscillation, ema_x_int,
frozen_x_int as fp32, frozen as bool) against oscqat's 10.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from oscqat.ops import backends as _backend
from oscqat.ops import reference as ref

OSCQAT_BACKENDS = ("torch", "triton", "cuda", "cpp")
REF = "reference-eager"
# The C++ ops called directly (torch.ops.oscqat_C.*, no autograd, no module): the same unit of work as the
# torch.compile contender, which compiles the raw reference ops. Not a library path: excluded from "best oscqat".
CPP_OP = "oscqat-cpp op"
COMPILED = "torch.compile(torch-backend)"
ATEN = "aten-lsq"
MOMENTUM = 0.001
F_TH = 0.02         # freezing threshold used by every tracked workload (freezing on)
LAMBDA = 0.01       # dampening strength: the upstream gradient of the summed dampening term


class Skip(Exception):
    """This contender cannot run this workload here (the message says why)."""


def oscqat_name(b: str) -> str:
    return f"oscqat-{b}"


def contender_names(device: str) -> list[str]:
    names = [REF, oscqat_name("torch"), COMPILED, ATEN]
    names += [oscqat_name(b) for b in (("triton", "cuda") if device == "cuda" else ("cpp",))]
    return names + ([CPP_OP] if device == "cpu" else [])


def batched(name: str) -> str:
    """The weight-set contender that runs an oscqat backend's quantizers through oscqat.quantize_weights (what a
    model prepared with QATConfig.batch_weights does): one call for all layers instead of one per layer."""
    return f"{name} batched"


def is_oscqat_backend(name: str) -> bool:
    """A library path (module/Function -> op -> kernel) of an oscqat backend."""
    return name.startswith("oscqat-") and name != CPP_OP


def backend_of(name: str) -> str:
    return name.split("-", 1)[1].split(" ")[0]


def check_backend(b: str, device: str) -> None:
    try:
        _backend.check(b, device)
    except _backend.BackendUnavailable as e:
        raise Skip(str(e)) from e


# ====================================================================== reference-eager (re-implementation)
class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def round_ste(x):
    return _RoundSTE.apply(x)


def grad_scale(x, scale: float):
    """LSQ gradient scaling as the reference writes it: forward x, backward scale * g."""
    y_grad = x * scale
    return (x - y_grad).detach() + y_grad


class RefTracker:
    """TrackOscillation of the reference, wrapped around the quantizer's integer forward (state: 25 B/weight)."""

    def __init__(self, momentum=MOMENTUM, freeze_threshold=F_TH, use_ema_x_int=True):
        self.momentum, self.freeze_threshold, self.use_ema_x_int = momentum, freeze_threshold, use_ema_x_int
        self.prev_x_int = self.prev_switch_dir = self.ema_oscillation = self.total_oscillation = None
        self.frozen = self.frozen_x_int = self.ema_x_int = None
        self.oscillated_sum = None
        self.last_count = 0
        self.iters_since_reset = 0

    def init_state(self, x_int, last_dir, freq, ema, frozen):
        """Start from a mid-training state equivalent to oscqat's (see make_weight_state)."""
        self.prev_x_int = x_int.detach().clone()
        self.prev_switch_dir = last_dir.to(x_int.dtype).clone()
        self.ema_oscillation = freq.clone()
        self.total_oscillation = torch.zeros_like(x_int)
        self.frozen = frozen.clone()
        self.frozen_x_int = torch.where(frozen, torch.round(ema), torch.zeros_like(ema))
        self.ema_x_int = ema.clone()

    def __call__(self, x_int, skip_tracking=False):
        if self.frozen is not None:
            x_int = ~self.frozen * x_int + self.frozen * self.frozen_x_int
        if skip_tracking:
            return x_int
        with torch.no_grad():
            delta_x_int = torch.round(self.prev_x_int - x_int).detach()
            switch_dir = torch.sign(delta_x_int)
            switched = delta_x_int != 0
            oscillated = (self.prev_switch_dir * switch_dir) == -1
            self.ema_oscillation = self.momentum * oscillated + (1 - self.momentum) * self.ema_oscillation
            self.prev_switch_dir[switched] = switch_dir[switched]
            self.prev_x_int = x_int
            self.oscillated_sum = oscillated.sum()
            self.total_oscillation += oscillated
            self.iters_since_reset += 1
            self.last_count = int(self.oscillated_sum.item())          # per-step logging: a host sync
            if self.freeze_threshold > 0:
                freeze_weights = self.ema_oscillation > self.freeze_threshold
                self.frozen[freeze_weights] = True
                if self.use_ema_x_int:
                    self.frozen_x_int[freeze_weights] = torch.round(self.ema_x_int[freeze_weights])
                    self.ema_x_int = self.momentum * x_int + (1 - self.momentum) * self.ema_x_int
                else:
                    self.frozen_x_int[freeze_weights] = x_int[freeze_weights]
        return x_int


class RefLSQQuantizer(nn.Module):
    """Symmetric uniform LSQ quantizer as in the reference (learned delta, grad-scaled, round_ste, clamp)."""

    def __init__(self, scale: torch.Tensor, n: int, p: int, numel_per_scale: int, per_channel_dims: int = 0,
                 tracker: RefTracker | None = None):
        super().__init__()
        self.delta = nn.Parameter(scale.detach().clone().float())
        self.int_min, self.int_max = float(n), float(p)
        self.gs = 1.0 / math.sqrt(numel_per_scale * p)
        self.per_channel_dims = per_channel_dims        # number of trailing dims to broadcast over (per channel)
        self.tracker = tracker

    @property
    def scale(self):
        s = grad_scale(self.delta, self.gs)
        return s.reshape(-1, *([1] * self.per_channel_dims)) if self.per_channel_dims else s

    @property
    def x_min(self):
        return self.scale * self.int_min

    @property
    def x_max(self):
        return self.scale * self.int_max

    def to_integer_forward(self, x):
        x_int = round_ste(x / self.scale)
        return torch.clamp(x_int, self.int_min, self.int_max)

    def forward(self, x, skip_tracking=False):
        x_int = self.to_integer_forward(x)
        if self.tracker is not None:
            x_int = self.tracker(x_int, skip_tracking=skip_tracking)
        return (self.scale * x_int).to(x.dtype)


def ref_dampening_loss(w_fp, quantizer: RefLSQQuantizer, aggregation="kernel_mean"):
    """The reference's dampening_loss: a second, untracked quantization pass and a clip, per layer."""
    w_q = quantizer(w_fp, skip_tracking=True).detach()
    w_fp_clip = torch.min(torch.max(w_fp, quantizer.x_min), quantizer.x_max)
    loss = (w_q - w_fp_clip) ** 2
    if aggregation == "sum":
        return loss.sum()
    if aggregation == "kernel_mean":
        return loss.sum(0).mean()
    return loss.mean()


# ====================================================================== inputs
def make_weight_state(w: torch.Tensor, scale: torch.Tensor, n: int, p: int, seed: int):
    """A plausible mid-training oscqat state for `w` (per-tensor scale): initialised flags, random last_dir,
    oscillation frequencies around the threshold (some frozen), an integer EMA near w_int."""
    gen = torch.Generator().manual_seed(seed)
    shape, dev = w.shape, w.device
    w_int = torch.round(w.detach().float().cpu() / scale.cpu().reshape(-1, *([1] * (w.dim() - 1)))).clamp(n, p)
    last_dir = torch.randint(-1, 2, shape, generator=gen)
    freq = torch.rand(shape, generator=gen) * (1.5 * F_TH)
    frozen = freq > F_TH
    ema = (w_int + (torch.rand(shape, generator=gen) - 0.5) * 0.8).clamp(n, p)
    ema = torch.where(frozen, torch.round(ema), ema)
    flags = (last_dir + 4 * frozen.long()).to(torch.int8)
    st = dict(prev_int=w_int.to(torch.int8), flags=flags, freq=freq, ema=ema)
    raw = dict(x_int=w_int, last_dir=last_dir.float(), freq=freq, ema=ema, frozen=frozen)
    return {k: v.to(dev) for k, v in st.items()}, {k: v.to(dev) for k, v in raw.items()}


def weight_pair(shape, scale: float, dtype, device, seed: int):
    """Two versions of one weight tensor that differ by ~0.3 steps on a third of the weights, alternated call by
    call so that integers switch and oscillate every step (as near-threshold weights do in training)."""
    gen = torch.Generator().manual_seed(seed)
    w_a = torch.randn(shape, generator=gen) * (3.0 * scale)
    bump = (torch.rand(shape, generator=gen) < 0.33) * (torch.rand(shape, generator=gen) - 0.5) * (0.6 * scale)
    return [w.to(device=device, dtype=dtype) for w in (w_a, w_a + bump)]


class Alternate:
    def __init__(self, items):
        self.items, self.i = items, 0

    def __call__(self):
        self.i ^= 1
        return self.items[self.i]


# ====================================================================== compiled torch backend
_COMPILED: dict[str, object] = {}
COMPILE_LOG: list[dict] = []


def compiled(op: str):
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(getattr(ref, op), dynamic=True)
    return _COMPILED[op]


def first_call(fn, label: str):
    """Run fn once (this is where torch.compile compiles); record how long it took."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    COMPILE_LOG.append({"what": label, "first_call_s": round(dt, 3)})
    return dt
