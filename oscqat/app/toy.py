"""The paper's 1-D toy regression (section 2.2) through oscqat's own quantizer and tracker.

min_w E_x[(x w* - x q(w))^2 / 2] with E[x^2] = 1, so the STE gradient is -(w* - q(w)) inside the grid. The latent
weight oscillates around the decision threshold next to w*; reversals of the integer happen about 2 d / s times
per step, d = |w* - q(w*)|, whatever the learning rate, and the time-mean of q(w) approaches w*."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

from ..quantizers import WeightQuantizer

TOY_METHODS = ("ste", "dampen", "freeze")


@dataclass
class ToyResult:
    w_star: float
    scale: float
    d_over_s: float
    reversals_per_step: float
    tracker_freq: float
    mean_quantized: float
    final_int: int
    frozen: bool
    final_latent: float


def reversals(ints: list[int]) -> int:
    """Direction reversals of an integer sequence: a change opposite to the last non-zero change."""
    count, last = 0, 0
    for a, b in zip(ints, ints[1:]):
        d = (b > a) - (b < a)
        if d:
            count += last == -d
            last = d
    return count


def run_toy(w_star: float = 0.33, scale: float = 0.1, bits: int = 4, lr: float = 0.01, steps: int = 4000,
            method: str = "ste", lam: float = 1.0, f_th: float = 0.02, momentum: float = 0.01,
            w0: float | None = None, warmup: float = 0.25, trace: dict | None = None) -> ToyResult:
    """Optimise the toy problem with SGD; `trace` (a dict) receives the latent and quantized series."""
    if method not in TOY_METHODS:
        raise ValueError(f"toy: method must be one of {TOY_METHODS}, got {method!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"toy: scale must be positive and finite, got {scale}")
    if steps < 4:
        raise ValueError(f"toy: steps must be at least 4, got {steps}")
    q = WeightQuantizer((1,), bits, track=True, dampen=method == "dampen", freeze=method == "freeze",
                        momentum=momentum, damp_reduction="sum", lsq_grad_scale=False, name="toy.weight")
    q.scale.data.fill_(scale)
    q.scale.requires_grad_(False)
    n, p = q.qmin, q.qmax
    if not n * scale <= w_star <= p * scale:
        raise ValueError(f"toy: w* = {w_star} is outside the {bits}-bit grid [{n * scale}, {p * scale}]")
    w = torch.nn.Parameter(torch.tensor([w_star if w0 is None else w0]))
    opt = torch.optim.SGD([w], lr=lr)
    latent, ints = [], []
    q.train()
    for t in range(steps):
        if method == "freeze":
            q.freeze_threshold.fill_(f_th if t >= warmup * steps else 0.0)
        q.arm()
        w_hat = q(w)
        loss = 0.5 * (w_star - w_hat).pow(2).sum()
        if method == "dampen" and t >= warmup * steps:
            loss = loss + lam * q.last_damp
        opt.zero_grad()
        loss.backward()
        latent.append(float(w.detach()))
        ints.append(int(q.prev_int))     # the integer this step's forward used
        opt.step()
    half = ints[steps // 2:]
    q_star = min(max(round(w_star / scale), n), p) * scale
    if trace is not None:
        trace.update(latent=latent, quantized=[i * scale for i in ints])
    return ToyResult(w_star=w_star, scale=scale, d_over_s=abs(w_star - q_star) / scale,
                     reversals_per_step=reversals(half) / len(half), tracker_freq=float(q.freq),
                     mean_quantized=sum(half) * scale / len(half), final_int=ints[-1], frozen=bool(q.frozen()),
                     final_latent=latent[-1])


def plot_trace(trace: dict, result: ToyResult, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(trace["latent"], lw=0.8, label="latent weight w")
    ax.plot(trace["quantized"], lw=0.8, label="quantized q(w)")
    ax.axhline(result.w_star, color="k", ls="--", lw=0.8, label="w*")
    ax.set_xlabel("iteration")
    ax.set_title(f"toy regression: d/s = {result.d_over_s:.2f}, reversals/step = {result.reversals_per_step:.3f}")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p) -> None:
    p.add_argument("--w-star", type=float, default=0.33, help="optimal float weight w*")
    p.add_argument("--scale", type=float, default=0.1, help="quantization step s (fixed)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--method", choices=TOY_METHODS, default="ste")
    p.add_argument("--lam", type=float, default=1.0, help="dampening strength (method dampen)")
    p.add_argument("--f-th", type=float, default=0.02, help="freezing threshold (method freeze)")
    p.add_argument("--momentum", type=float, default=0.01, help="tracker EMA momentum")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--plot", metavar="PATH", help="draw latent and quantized weight over time (PNG)")


def run(args) -> int:
    trace = {} if args.plot else None
    res = run_toy(args.w_star, args.scale, args.bits, args.lr, args.steps, args.method, args.lam, args.f_th,
                  args.momentum, trace=trace)
    if args.plot:
        plot_trace(trace, res, args.plot)
    if args.json:
        print(json.dumps(asdict(res), indent=2))
    else:
        for k, v in asdict(res).items():
            print(f"{k:20s} {v}")
    return 0
