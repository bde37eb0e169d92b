"""Per-step overhead of transition-rate scheduling (oscqat.TransitionRateSchedule) over plain tracking.

Both in one run, interleaved sample by sample (A, B, A, B, ...) so that drift of a shared machine hits both alike:

1. `step` - the per-step bookkeeping alone on the MobileNetV2 weight set (53 tensors, 3.47M weights, W4 with
   8-bit first/last layers): plain tracking arms the quantizers (what QATSchedule.step() does for tracking);
   TR scheduling reads the counts the tracked forward left in `last_counts`, runs the controller on 0-d device
   tensors, writes the TALR and arms. Fresh counts are swapped in before each sample, in both variants.
2. `train_step` - a whole W4A4 QAT training step (tracked forward, backward, SGD momentum step, then arm or
   talr.step()) of the small MobileNetV2-style net, batch 32 at 28x28, one torch thread. Reported: the medians,
   the median of the paired differences and, as the noise, the spread (IQR) of the plain step.

    python bench/bench_transition.py --out bench/results/transition
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import oscqat  # noqa: E402
from oscqat.app.models import mobilenet_v2, small_mobilenet  # noqa: E402


def _quartiles(xs):
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def summarize(a: list[float], b: list[float]) -> dict:
    diffs = [y - x for x, y in zip(a, b)]
    qa, qb = _quartiles(a), _quartiles(b)
    return {"plain_median_us": 1e6 * statistics.median(a), "tr_median_us": 1e6 * statistics.median(b),
            "plain_iqr_us": 1e6 * (qa[1] - qa[0]), "tr_iqr_us": 1e6 * (qb[1] - qb[0]),
            "paired_diff_median_us": 1e6 * statistics.median(diffs),
            "overhead_pct": 100 * (statistics.median(b) / statistics.median(a) - 1), "samples": len(a)}


def bench_step(samples: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = oscqat.prepare(mobilenet_v2(1000), oscqat.QATConfig(weight_bits=4, method="tr", weight_init="lsq",
                                                                  quantize_activations=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    talr = oscqat.TransitionRateSchedule(model, opt, 10 * (samples + warmup))
    talr._init_pending = [False] * len(talr._init_pending)      # measure the controller from the first sample
    qs = [q for q in oscqat.weight_quantizers(model) if q.tracking]
    pool = [[torch.tensor([i % 7, 0], dtype=torch.int32) for q in qs] for i in range(2)]

    def fresh(i):   # what the tracked forward leaves behind: a new counts tensor per quantizer
        for q, c in zip(qs, pool[i % 2]):
            q.last_counts = c

    def plain():
        oscqat.arm_tracking(model)

    a, b = [], []
    for i in range(warmup + samples):
        fresh(i)
        t0 = time.perf_counter()
        plain()
        t1 = time.perf_counter()
        fresh(i + 1)
        t2 = time.perf_counter()
        talr.step()
        t3 = time.perf_counter()
        if i >= warmup:
            a.append(t1 - t0)
            b.append(t3 - t2)
    control = []    # the controller alone (read counts, TR, mu, lr), without the arming
    every = list(range(len(qs)))
    for i in range(warmup + samples):
        fresh(i)
        t0 = time.perf_counter()
        talr._control(every, 0.01)
        if i >= warmup:
            control.append(time.perf_counter() - t0)
    tracked = sum(q.prev_int.numel() for q in qs)
    return {"model": "MobileNetV2 (torchvision shapes), W4, 8-bit first/last", "tracked_tensors": len(qs),
            "tracked_weights": tracked, "controller_only_median_us": 1e6 * statistics.median(control),
            **summarize(a, b)}


def bench_train_step(samples: int, warmup: int, batch: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    base = oscqat.prepare(small_mobilenet(10, 1), oscqat.QATConfig(weight_bits=4, act_bits=4, method="tr"),
                          calib_data=[x])
    runs = {}
    for name in ("plain", "tr"):
        m = copy.deepcopy(base)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)     # small lr: the scales stay positive
        talr = oscqat.TransitionRateSchedule(m, opt, 10 * (samples + warmup)) if name == "tr" else None
        runs[name] = (m, opt, talr)

    def step(name):
        m, opt, talr = runs[name]
        F.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad()
        if talr is None:
            oscqat.arm_tracking(m)
        else:
            talr.step()

    a, b = [], []
    for i in range(warmup + samples):
        t0 = time.perf_counter()
        step("plain")
        t1 = time.perf_counter()
        step("tr")
        t2 = time.perf_counter()
        if i >= warmup:
            a.append(t1 - t0)
            b.append(t2 - t1)
    return {"model": f"small MobileNetV2-style, W4A4, batch {batch} at 28x28, SGD momentum", **summarize(a, b)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/transition")
    p.add_argument("--samples", type=int, default=400, help="samples of the bookkeeping step")
    p.add_argument("--train-samples", type=int, default=60, help="samples of the whole training step")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = {"device": harness.device_name("cpu"), "versions": harness.versions(), "backend": oscqat.get_backend(),
           "argv": sys.argv[1:], "step": bench_step(a.samples, a.warmup),
           "train_step": bench_train_step(a.train_samples, a.warmup, a.batch)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(res, indent=2))
    lines = ["| measurement | plain tracking, median | TR scheduling, median | paired diff, median | "
             "plain IQR (noise) | overhead |", "|---|---|---|---|---|---|"]
    for key in ("step", "train_step"):
        r = res[key]
        lines.append(f"| {key}: {r['model']} | {r['plain_median_us']:.0f} us | {r['tr_median_us']:.0f} us | "
                     f"{r['paired_diff_median_us']:+.0f} us | {r['plain_iqr_us']:.0f} us | "
                     f"{r['overhead_pct']:+.1f}% |")
    lines.append(f"\nController alone (counts -> TR -> mu -> lr, {res['step']['tracked_tensors']} tensors): "
                 f"{res['step']['controller_only_median_us']:.0f} us median. talr.step() arms a quantizer list cached "
                 f"at construction; arm_tracking(model) walks the modules each step, hence a negative difference.")
    text = "\n".join(lines)
    (out / "overhead.md").write_text(f"{res['device']}, torch {res['versions']['torch']}\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
