"""The paper's 1-D toy regression (section 2.2) through oscqat's own quantizer and tracker.

min_w E_x[(x w* - x q(w))^2 / 2] with E[x^2] = 1, so the STE gradient is -(w* - q(w)) inside the grid. The latent
weight oscillates around the decision threshold next to w*; reversals of the integer happen about 2 d / s times
per step, d = |w* - q(w*)|, whatever the learning rate, and the time-mean of q(w) approaches w*."""
from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict, dataclass

import torch

import oscqat

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
    q = oscqat.WeightQuantizer((1,), bits, track=True, dampen=method == "dampen", freeze=method == "freeze",
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
        trace.update(latent=latent, quantized=[i * scale for i in ints], ints=ints)
    return ToyResult(w_star=w_star, scale=scale, d_over_s=abs(w_star - q_star) / scale,
                     reversals_per_step=reversals(half) / len(half), tracker_freq=float(q.freq),
                     mean_quantized=sum(half) * scale / len(half), final_int=ints[-1], frozen=bool(q.frozen()),
                     final_latent=latent[-1])


def plot_trace(trace: dict, result: ToyResult, path: str) -> None:
    fig = trace_figure(trace, result)
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trace_figure(trace: dict, result: ToyResult, window: int = 80, mean_over: int = 100):
    """Three panels: the latent weight over the whole run (with the rounding threshold it oscillates around),
    the running mean of q(w) against w*, and the last `window` steps: integer q(w)/s and latent weight."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    latent = torch.tensor(trace["latent"], dtype=torch.float64)
    quant = torch.tensor(trace["quantized"], dtype=torch.float64)
    ints = trace.get("ints") or [round(v / result.scale) for v in trace["quantized"]]
    s, n = result.scale, len(latent)
    steps = torch.arange(n)
    # the rounding threshold nearest to w*: where the integer flips
    thr = (math.floor(result.w_star / s) + 0.5) * s
    k = max(1, min(mean_over, n))
    run_mean = torch.nn.functional.avg_pool1d(quant[None, None], k, stride=1)[0, 0]
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(8, 7.2))
    a1.plot(steps, latent, lw=0.6, color="C0", label="latent weight w")
    a1.axhline(thr, color="C3", ls=":", lw=0.9, label=f"rounding threshold {thr:.3f}")
    a1.axhline(result.w_star, color="k", ls="--", lw=0.8, label=f"w* = {result.w_star:g}")
    a1.set_ylabel("latent weight w")
    a1.set_xlabel("iteration")
    a1.legend(loc="lower right", fontsize=7)
    a2.plot(steps[k - 1:], run_mean, lw=0.9, color="C1", label=f"q(w), mean over the last {k} steps")
    a2.axhline(result.w_star, color="k", ls="--", lw=0.8, label="w*")
    a2.set_ylabel("mean of q(w)")
    a2.set_xlabel("iteration")
    a2.legend(loc="lower right", fontsize=7)
    w0 = max(0, n - window)
    zs = steps[w0:]
    a3.step(zs, ints[w0:], where="post", lw=1.0, color="C1", label="integer q(w)/s")
    lo, hi = min(ints[w0:]), max(ints[w0:])
    a3.set_yticks(range(lo, hi + 1))
    a3.set_ylim(lo - 0.5, hi + 0.5)
    a3.set_ylabel("integer q(w)/s")
    a3.set_xlabel(f"iteration (last {n - w0})")
    b3 = a3.twinx()
    b3.plot(zs, latent[w0:], lw=0.9, color="C0", marker=".", ms=2.5, label="latent weight w")
    b3.axhline(thr, color="C3", ls=":", lw=0.9)
    b3.set_ylabel("latent weight w")
    h1, l1 = a3.get_legend_handles_labels()
    h2, l2 = b3.get_legend_handles_labels()
    a3.legend(h1 + h2, l1 + l2, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=7, frameon=False)
    fig.suptitle(textwrap.fill(
        f"toy regression: minimise (w* - q(w))^2 / 2 over the latent weight w, q(w) = s * round(w / s), grid step "
        f"s = {s:g}, w* = {result.w_star:g}; d = |w* - q(w*)|, d/s = {result.d_over_s:.2f}: the integer reversed "
        f"direction {result.reversals_per_step:.3f} times per step (with the STE, 2d/s = "
        f"{2 * result.d_over_s:.2f} predicted); time-mean of q(w) {result.mean_quantized:.4f} (w* predicted)",
        115), fontsize=8)
    fig.tight_layout()
    return fig


def add_arguments(p) -> None:
    p.add_argument("--w-star", type=float, default=0.33, help="optimal float weight w*")
    p.add_argument("--scale", type=float, default=0.1, help="quantization step s (fixed)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--method", choices=TOY_METHODS + ("tr",), default="ste",
                   help="tr: transition-rate scheduling on the N-weight stochastic toy (run_toy_tr)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="method tr: the latent optimizer")
    p.add_argument("--weights", type=int, default=10000, help="method tr: number of weights N")
    p.add_argument("--tr-start", type=float, default=1e-2, help="method tr: target transition rate at step 0")
    p.add_argument("--tr-end", type=float, default=1e-3, help="method tr: target transition rate at the end")
    p.add_argument("--lam", type=float, default=1.0, help="dampening strength (method dampen)")
    p.add_argument("--f-th", type=float, default=0.02, help="freezing threshold (method freeze)")
    p.add_argument("--momentum", type=float, default=0.01, help="tracker EMA momentum")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--plot", metavar="PATH", help="draw latent and quantized weight over time (PNG)")


def run(args) -> int:
    if args.method == "tr":
        return _run_tr(args)
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


# ---------------------------------------------------------------------------------- transition-rate scheduling
def run_toy_tr(optimizer: str = "sgd", weights: int = 10000, steps: int = 2000, lr: float | None = None,
               tr_start: float = 1e-2, tr_end: float = 1e-3, schedule: str = "cosine", rule: str = "multiplicative",
               scale: float = 0.1, bits: int = 4, batch: int = 4, seed: int = 0) -> dict:
    """The toy regression in N dimensions with stochastic gradients, trained under oscqat.TransitionRateSchedule.

    min_w E_x[(x.(w* - q(w)))^2 / 2], x ~ N(0, I_N), minibatches of `batch`: the expected STE gradient is the 1-D
    toy's -(w* - q(w)) per weight, plus minibatch noise from the other weights' residuals. w* and the start w0 are
    drawn independently, uniform over most of the grid. The noise matters: with exact gradients every weight ends
    up oscillating around the threshold next to its w* at a rate no learning rate changes (see `run_toy`), so no
    LR controller could steer TR there; with minibatch noise the latent weights diffuse inside their bins and TR
    grows with the learning rate, as in a real network. Returns the per-step TR, target and TALR, and the mean
    |TR_t - k_t| over the second half."""
    QATConfig, QuantLinear, TransitionRateSchedule = oscqat.QATConfig, oscqat.QuantLinear, \
        oscqat.TransitionRateSchedule
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"toy: optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    if weights < 1 or steps < 4:
        raise ValueError(f"toy: need weights >= 1 and steps >= 4, got {weights}, {steps}")
    g = torch.Generator().manual_seed(seed)
    lin = QuantLinear(weights, 1, bias=False, config=QATConfig(
        weight_bits=bits, quantize_activations=False, first_last_bits=None, method="tr", lsq_grad_scale=False,
        momentum=0.01), name="toy")
    q = lin.weight_quant
    q.scale.data.fill_(scale)
    q.scale.requires_grad_(False)
    lo, hi = 0.75 * q.qmin * scale, 0.75 * q.qmax * scale
    w_star = lo + (hi - lo) * torch.rand(weights, generator=g)
    with torch.no_grad():
        lin.weight.copy_((lo + (hi - lo) * torch.rand(weights, generator=g))[None])
    lr = (0.01 if optimizer == "sgd" else 1e-3) if lr is None else lr
    opt = torch.optim.SGD([lin.weight], lr=lr) if optimizer == "sgd" else \
        torch.optim.AdamW([lin.weight], lr=lr, weight_decay=0.0)
    talr = TransitionRateSchedule(lin, opt, steps, tr_start=tr_start, tr_end=tr_end, schedule=schedule, rule=rule)
    lin.train()
    rates, targets, lrs = [], [], []
    for _ in range(steps):
        x = torch.randn(batch, weights, generator=g)
        w_hat = q(lin.weight)[0]
        loss = 0.5 * (x @ (w_star - w_hat)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        targets.append(talr.target)
        talr.step()
        rates.append(talr.last_rate.clone())
        lrs.append(talr.lr.clone())
    rates = torch.stack(rates).tolist()
    h = steps // 2
    tail = [(r, k) for r, k in zip(rates[h:], targets[h:])]
    return {"optimizer": optimizer, "weights": weights, "steps": steps, "lr": lr, "rule": rule,
            "mean_abs_err_2nd_half": sum(abs(r - k) for r, k in tail) / len(tail),
            "mean_rel_err_2nd_half": sum(abs(r - k) / k for r, k in tail if k > 0) / max(1, len(tail)),
            "mean_target_2nd_half": sum(k for _, k in tail) / len(tail),
            "mean_rate_2nd_half": sum(r for r, _ in tail) / len(tail),
            "rates": rates, "targets": targets, "lrs": torch.stack(lrs).tolist()}


def _run_tr(args) -> int:
    lr = None if args.optimizer == "adamw" and args.lr == 0.01 else args.lr    # --lr left at its SGD default
    res = run_toy_tr(args.optimizer, args.weights, args.steps, lr, args.tr_start, args.tr_end, scale=args.scale,
                     bits=args.bits)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 3.2))
        ax.plot(res["rates"], lw=0.6, label="measured TR_t")
        ax.plot(res["targets"], "k--", lw=1.0, label="target k_t")
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(f"toy, {args.optimizer}: mean |TR - k| over the 2nd half = {res['mean_abs_err_2nd_half']:.2e}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        plt.close(fig)
    summary = {k: v for k, v in res.items() if k not in ("rates", "targets", "lrs")}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k, v in summary.items():
            print(f"{k:24s} {v}")
    return 0
