"""Evidence for transition-rate scheduling (oscqat.TransitionRateSchedule): does the measured transition rate
follow the target? Small real model (the built-in small MobileNetV2-style net, W4A4, Fashion-MNIST at reduced
size, or scikit-learn digits when Fashion-MNIST is not installed) and the toy regression, each with SGD and AdamW.

    python bench/transition_evidence.py --out bench/results/transition

Writes `<out>/evidence.json` (per-run metrics and per-step curves) and `<out>/model_tr.png`, `<out>/toy_tr.png`
(TR_t and k_t per step, log scale). The metric is the mean |TR_t - k_t| over the second half of training.
A few minutes on 2 CPU cores at the defaults."""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import oscqat
from oscqat.app.data import load_dataset
from oscqat.app.models import small_mobilenet
from oscqat.app.optim import qat_optimizers
from oscqat.app.toy import run_toy_tr


def tracking_error(rates, targets) -> dict:
    h = len(rates) // 2
    diffs = [abs(r - k) for r, k in zip(rates[h:], targets[h:])]
    rel = [abs(r - k) / k for r, k in zip(rates[h:], targets[h:]) if k > 0]
    return {"mean_abs_err_2nd_half": statistics.mean(diffs), "mean_rel_err_2nd_half": statistics.mean(rel),
            "mean_target_2nd_half": statistics.mean(targets[h:]), "mean_rate_2nd_half": statistics.mean(rates[h:])}


def accuracy(model, x, y, bs=500) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum()) for i in range(0, len(y), bs))
    model.train()
    return correct / len(y)


def batches(ds, bs, steps, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(ds.train_y)
    for _ in range(steps):
        idx = torch.randint(0, n, (bs,), generator=g)
        yield ds.train_x[idx], ds.train_y[idx]


def train_fp(ds, steps, bs, seed) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = small_mobilenet(ds.num_classes, ds.in_channels)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for x, y in batches(ds, bs, steps, seed):
        F.cross_entropy(model(x), y).backward()
        opt.step(); opt.zero_grad(); lr.step()
    return model


def run_model(fp, ds, opt_name, a, use_talr=True) -> dict:
    torch.manual_seed(a.seed)
    model = oscqat.prepare(copy.deepcopy(fp), oscqat.QATConfig(weight_bits=4, act_bits=4, method=a.method),
                           calib_data=[ds.train_x[i:i + 256] for i in range(0, 1024, 256)])
    # weights: SGD or AdamW, weight decay on conv/linear weights; with TALR no LR schedule (TALR sets it), else
    # cosine. Scales: Adam, cosine, as in oscqat train
    opt, opt_s, lr_sched, lr_s = qat_optimizers(model, a.sgd_lr if opt_name == "sgd" else a.adamw_lr, a.wd,
                                                a.scale_lr, a.steps, weights=opt_name,
                                                weight_schedule=None if use_talr else "cosine")
    sched = oscqat.QATSchedule(model, a.steps)
    talr = oscqat.TransitionRateSchedule(model, opt, a.steps, tr_start=a.tr_start, tr_end=a.tr_end,
                                         rule=a.rule) if use_talr else None
    rates, targets, lrs = [], [], []
    prev = None
    t0 = time.perf_counter()
    for x, y in batches(ds, a.bs, a.steps, a.seed + 1):
        loss = F.cross_entropy(model(x), y) + sched.lam * oscqat.dampening_loss(model)
        loss.backward()
        opt.step(); opt_s.step(); opt.zero_grad(); opt_s.zero_grad(); lr_s.step()
        if talr is not None:
            targets.append(talr.target)
            talr.step()
            rates.append(talr.last_rate.clone())
            lrs.append(talr.lr.clone())
        else:   # plain LR baseline: the same TR measurement from the counts
            qs = [q for q in oscqat.weight_quantizers(model) if q.tracking]
            sw = torch.stack([q.last_counts[0] for q in qs]).sum()
            rates.append((sw / sum(q.prev_int.numel() for q in qs)) if prev is not None else torch.zeros(()))
            prev = True
            lrs.append(torch.tensor(opt.param_groups[0]["lr"]))
            lr_sched.step()
        sched.step()
    secs = time.perf_counter() - t0
    rates = torch.stack(rates).tolist()
    out = {"optimizer": opt_name, "talr": use_talr, "steps": a.steps, "seconds": secs,
           "test_acc": accuracy(model, ds.test_x, ds.test_y), "rates": rates, "lrs": torch.stack(lrs).tolist()}
    if use_talr:
        out.update(targets=targets, **tracking_error(rates[1:], targets[1:]))   # step 0: the init forward
    return out


def plot(runs, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.6), squeeze=False)
    for ax, r in zip(axes[0], runs):
        ax.plot(r["rates"], lw=0.6, alpha=0.8, label="measured TR_t")
        ax.plot(r["targets"], "k--", lw=1.2, label="target k_t")
        if "baseline_rates" in r:
            ax.plot(r["baseline_rates"], lw=0.6, alpha=0.6, color="tab:gray", label="TR, plain cosine LR")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{r['optimizer']}: mean|TR-k| 2nd half = {r['mean_abs_err_2nd_half']:.2e}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/transition")
    p.add_argument("--dataset", default="auto")
    p.add_argument("--subset", type=int, default=6000)
    p.add_argument("--image-size", type=int, default=14)
    p.add_argument("--fp-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--method", default="tr")
    p.add_argument("--rule", default="multiplicative")
    p.add_argument("--tr-start", type=float, default=1e-2)
    p.add_argument("--tr-end", type=float, default=1e-3)
    p.add_argument("--sgd-lr", type=float, default=0.01)
    p.add_argument("--adamw-lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=5e-5)
    p.add_argument("--scale-lr", type=float, default=1e-3, help="Adam LR of the quantizer scales (cosine)")
    p.add_argument("--toy-steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the plain-LR SGD run")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(a), "versions": {"torch": torch.__version__}}

    toy = []
    for opt_name in ("sgd", "adamw"):
        r = run_toy_tr(optimizer=opt_name, steps=a.toy_steps, rule=a.rule, seed=a.seed)
        toy.append(r)
        print(f"toy   {opt_name:6s} mean|TR-k| 2nd half {r['mean_abs_err_2nd_half']:.2e} "
              f"(mean k {r['mean_target_2nd_half']:.2e}, rel {r['mean_rel_err_2nd_half']:.2f})", flush=True)
    plot(toy, out / "toy_tr.png", "toy regression (oscqat toy --method tr): transition rate vs target")
    result["toy"] = toy

    ds = load_dataset(a.dataset, subset=a.subset, test_subset=2000, image_size=a.image_size, seed=a.seed)
    result["dataset"] = {k: v for k, v in ds.info.items() if isinstance(v, (int, float, str))}
    t0 = time.perf_counter()
    fp = train_fp(ds, a.fp_steps, a.bs, a.seed)
    result["fp"] = {"test_acc": accuracy(fp, ds.test_x, ds.test_y), "seconds": time.perf_counter() - t0}
    print(f"fp    acc {result['fp']['test_acc']:.3f} ({result['fp']['seconds']:.0f}s)", flush=True)
    runs = []
    for opt_name in ("sgd", "adamw"):
        r = run_model(fp, ds, opt_name, a)
        runs.append(r)
        print(f"model {opt_name:6s} mean|TR-k| 2nd half {r['mean_abs_err_2nd_half']:.2e} "
              f"(mean k {r['mean_target_2nd_half']:.2e}, rel {r['mean_rel_err_2nd_half']:.2f}), "
              f"acc {r['test_acc']:.3f} ({r['seconds']:.0f}s)", flush=True)
    if not a.no_baseline:
        b = run_model(fp, ds, "sgd", a, use_talr=False)
        runs[0]["baseline_rates"] = b["rates"]
        result["baseline_sgd_cosine_lr"] = {k: v for k, v in b.items()}
        print(f"model sgd, plain cosine LR: acc {b['test_acc']:.3f}, mean TR 2nd half "
              f"{statistics.mean(b['rates'][a.steps // 2:]):.2e}", flush=True)
    plot(runs, out / "model_tr.png", f"small MobileNetV2 W4A4 ({ds.info.get('name', a.dataset)}, "
                                     f"{a.image_size}px): transition rate vs target")
    result["model"] = runs
    (out / "evidence.json").write_text(json.dumps(result))
    summary = {"toy": {r["optimizer"]: {k: r[k] for k in r if k.startswith("mean_")} for r in toy},
               "model": {r["optimizer"]: {k: r[k] for k in r if k.startswith("mean_") or k == "test_acc"}
                         for r in runs}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
