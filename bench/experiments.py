"""Small-scale reproduction of Nagel et al. (ICML 2022) Tables 1, 2/4/5 on Fashion-MNIST with the default
depthwise-separable net (oscqat.app.models.small_mobilenet), through `oscqat train` in-process.

For each seed: one full-precision model (shared by all runs of that seed), then QAT at W3A32 (weights only),
W4A4 and W3A3 with lsq / dampen / freeze; pre-BN and post-BN-re-estimation test accuracy and % oscillating
weights (f > 0.005). Table-1 analogue: per-layer KL divergence between each BN's running statistics and the
population statistics of its inputs (the final quantized model over training batches), depthwise vs pointwise.

    python bench/experiments.py --out bench/results/experiments          # reduced size (CPU, ~25 min)
    python bench/experiments.py --full --out runs/experiments             # full Fashion-MNIST, 28x28 (GPU)
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oscqat.app import train as T  # noqa: E402
from oscqat.app.data import Batches, load_dataset  # noqa: E402
from oscqat.app.evaluate import load_model  # noqa: E402

SETTINGS = {"W3A32": (3, 32), "W4A4": (4, 4), "W3A3": (3, 3)}
METHODS = ("lsq", "dampen", "freeze")


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/experiments")
    p.add_argument("--work", default="/tmp/oscqat_experiments", help="per-run output folders")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=["lsq", "dampen", "freeze", "dampen+freeze"])
    p.add_argument("--full", action="store_true", help="full-size: all 60k images at 28x28, more epochs")
    p.add_argument("--subset", type=int, default=3840)
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=14)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fp-epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.01, help="tracker EMA momentum (short runs need > 0.001)")
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="only merge the runs of these results.json files into --out (tables over all their seeds)")
    p.add_argument("--extra", default="", help="extra `oscqat train` arguments, quoted")
    p.add_argument("--kl-batches", type=int, default=10)
    p.add_argument("--bn-batches", type=int, default=30)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on a shared CPU, 1 thread is ~5x faster per step than 2 oversubscribed)")
    a = p.parse_args()
    if a.full:
        a.subset, a.test_subset, a.image_size, a.batch_size, a.fp_epochs, a.epochs = None, None, 28, 128, 10, 10
    return a


def train_args(a, seed: int, out: Path, fp_ckpt: Path, wb: int, ab: int, method: str) -> list[str]:
    args = ["--dataset", "fashion-mnist", "--batch-size", str(a.batch_size), "--fp-epochs", str(a.fp_epochs),
            "--fp-checkpoint", str(fp_ckpt), "--epochs", str(a.epochs), "--lr", str(a.lr), "--seed", str(seed),
            "--w-bits", str(wb), "--a-bits", str(ab), "--method", method, "--momentum", str(a.momentum),
            "--out", str(out), "--quiet", "--record-last", "100", "--threads", str(a.threads),
            "--bn-batches", str(a.bn_batches)]
    if a.subset:
        args += ["--subset", str(a.subset)]
    if a.test_subset:
        args += ["--test-subset", str(a.test_subset)]
    if a.image_size != 28:
        args += ["--image-size", str(a.image_size)]
    return args + shlex.split(a.extra)


def run_train(argv: list[str]) -> dict:
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    return T.run_training(p.parse_args(argv))


# ----------------------------------------------------------------------------------------------- Table 1
def gauss_kl(mu_p, var_p, mu_q, var_q):
    """KL(N(mu_p, var_p) || N(mu_q, var_q)) per channel."""
    return 0.5 * (torch.log(var_q / var_p) + (var_p + (mu_p - mu_q) ** 2) / var_q - 1.0)


@torch.no_grad()
def bn_kl(model: nn.Module, batches) -> list[dict]:
    """Per BN layer: mean over channels of KL(population stats of the BN input || BN running stats)."""
    kinds, last_conv = {}, None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last_conv = m
        elif isinstance(m, nn.BatchNorm2d) and last_conv is not None:
            dw = last_conv.groups > 1 and last_conv.groups == last_conv.in_channels
            pw = last_conv.kernel_size == (1, 1) and last_conv.groups == 1
            kinds[name] = "depthwise" if dw else ("pointwise" if pw else "conv")
    sums = {}
    hooks = []
    for name, m in model.named_modules():
        if name in kinds:
            def hook(mod, inp, _out, name=name):
                x = inp[0].double()
                s = sums.setdefault(name, [0, 0.0, 0.0])
                s[0] += x.shape[0] * x.shape[2] * x.shape[3]
                s[1] = s[1] + x.sum(dim=(0, 2, 3))
                s[2] = s[2] + (x * x).sum(dim=(0, 2, 3))
            hooks.append(m.register_forward_hook(hook))
    model.eval()
    try:
        for x, _ in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, kind in kinds.items():
        n, s1, s2 = sums[name]
        mu = s1 / n
        var = (s2 / n - mu * mu).clamp_min(1e-12)
        bn = model.get_submodule(name)
        kl = gauss_kl(mu, var + bn.eps, bn.running_mean.double(), bn.running_var.double() + bn.eps)
        rows.append({"bn": name, "kind": kind, "kl": float(kl.mean()), "kl_max": float(kl.max())})
    return rows


# ----------------------------------------------------------------------------------------------- tables
def ms(vals, fmt="{:.2f}"):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    m = statistics.fmean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{fmt.format(m)} ± {fmt.format(s)}"


def claims(runs, settings) -> list[str]:
    """The paper's claims, checked on these runs (numbers, not judgement)."""
    out = []
    for st in settings:
        by = {m: [r for r in runs if r["setting"] == st and r["method"] == m] for m in METHODS}
        if not by["lsq"]:
            continue
        mean = lambda rs, k: statistics.fmean([r[k] for r in rs])  # noqa: E731
        gap = statistics.fmean([r["acc_post_bn"] - r["acc_pre_bn"] for r in by["lsq"]])
        out.append(f"- {st}: LSQ post-BN − pre-BN gap = {gap:+.2f} pts (paper, W3 MobileNetV2: about +5 to +9 pts).")
        for m in ("dampen", "freeze"):
            if not by[m]:
                continue
            o_l, o_m = mean(by["lsq"], "osc_pct"), mean(by[m], "osc_pct")
            act = [r.get("osc_active_pct") for r in by[m] + by["lsq"]]
            if all(v is not None for v in act):
                a_l, a_m = mean(by["lsq"], "osc_active_pct"), mean(by[m], "osc_active_pct")
                out.append(f"  - {m}: % oscillating and not frozen {a_l:.3f} → {a_m:.3f} "
                           f"(factor {a_l / max(a_m, 1e-9):.2f}).")
            g_m = statistics.fmean([r["acc_post_bn"] - r["acc_pre_bn"] for r in by[m]])
            d_post = mean(by[m], "acc_post_bn") - mean(by["lsq"], "acc_post_bn")
            d_pre = mean(by[m], "acc_pre_bn") - mean(by["lsq"], "acc_pre_bn")
            out.append(f"  - {m}: % oscillating {o_l:.3f} → {o_m:.3f} (factor {o_l / max(o_m, 1e-9):.2f}), "
                       f"post−pre gap {g_m:+.2f}, post-BN vs LSQ {d_post:+.2f} pts, pre-BN vs LSQ {d_pre:+.2f} pts.")
    return out


def render(results: dict, a, command: str) -> str:
    runs = results["runs"]
    cmds = results.get("commands", [command])
    lines = ["# Oscillations in QAT: small-scale reproduction on Fashion-MNIST", "",
             "Commands:", "", *[f"    {c}" for c in cmds], "",
             f"Machine: {results['machine']}. **No GPU in this task: reduced size on CPU** — "
             f"{'all' if not a.subset else a.subset} training images (fixed random subset), "
             f"{'all' if not a.test_subset else a.test_subset} test images, images resized to "
             f"{a.image_size}x{a.image_size}, batch {a.batch_size}, {a.fp_epochs} full-precision epochs (one FP "
             f"model per seed, shared by every run of that seed), {a.epochs} QAT epoch(s) = "
             f"{results.get('qat_steps', '?')} steps, tracker momentum {a.momentum} (the default 0.001 needs far "
             f"more steps to reach its steady state), first/last layer 8 bit, other defaults of `oscqat train`. "
             f"Seeds {sorted({r['seed'] for r in runs})} (column n: seeds per row); mean ± std over seeds. Wall time "
             f"{results.get('wall_s', 0) / 60:.1f} min.", "",
             "Model: `small_mobilenet` (MobileNetV2-style inverted residuals with depthwise 3x3 convs, 0.13M params).",
             "", "## Tables 2/4/5 analogue: accuracy before/after BN re-estimation, % oscillating weights", "",
             f"FP accuracy: {ms([r['fp_acc'] for r in results['fp'].values()])}", "",
             "| setting | method | pre-BN acc (%) | post-BN acc (%) | post − pre | osc. (%) | osc. not frozen (%) "
             "| frozen (%) | n |",
             "|---|---|---|---|---|---|---|---|---|"]
    for st in a.settings:
        for m in a.methods:
            rs = [r for r in runs if r["setting"] == st and r["method"] == m]
            if not rs:
                continue
            lines.append(f"| {st} | {m} | {ms([r['acc_pre_bn'] for r in rs])} | "
                         f"{ms([r['acc_post_bn'] for r in rs])} | "
                         f"{ms([r['acc_post_bn'] - r['acc_pre_bn'] for r in rs])} | "
                         f"{ms([r['osc_pct'] for r in rs], '{:.3f}')} | "
                         f"{ms([r.get('osc_active_pct') for r in rs], '{:.3f}')} | {ms([r['frozen_pct'] for r in rs], '{:.2f}')}"
                         f" | {len(rs)} |")
    lines += ["", "Osc. = % of tracked (<= 4-bit) weights with oscillation frequency > 0.005 at the end of training "
              "(oscqat.oscillation_report, frozen weights included); osc. not frozen = the same, excluding frozen "
              "weights (their frequency EMA decays only by (1 - m) per step after freezing, so in short runs "
              "recently frozen weights still count as oscillating).",
              "", "## Table 1 analogue: KL(population stats of BN input ‖ BN running stats), final model, "
              "before BN re-estimation", "",
              "Mean over BN layers (each: mean over channels) and over seeds; population statistics of the BN "
              f"inputs over {a.kl_batches} training batches through the final quantized model.", "",
              "| setting | method | depthwise KL | pointwise KL | ratio dw/pw |", "|---|---|---|---|---|"]
    for st in a.settings:
        for m in a.methods:
            rs = [r for r in runs if r["setting"] == st and r["method"] == m and r.get("bn_kl")]
            if not rs:
                continue
            dw = [statistics.fmean([x["kl"] for x in r["bn_kl"] if x["kind"] == "depthwise"]) for r in rs]
            pw = [statistics.fmean([x["kl"] for x in r["bn_kl"] if x["kind"] == "pointwise"]) for r in rs]
            ratio = [d / p for d, p in zip(dw, pw) if p > 0]
            lines.append(f"| {st} | {m} | {ms(dw, '{:.4f}')} | {ms(pw, '{:.4f}')} | {ms(ratio, '{:.1f}')} |")
    lines += ["", "## The paper's claims, measured here", "", *claims(runs, a.settings)]
    rs = [r for r in runs if r["setting"] == "W3A32" and r["method"] == "lsq" and r.get("bn_kl")]
    if rs:
        lines += ["", "Per layer, LSQ W3A32, seed " + str(rs[0]["seed"]) + ":", "", "| BN layer | after | KL |",
                  "|---|---|---|"]
        lines += [f"| {x['bn']} | {x['kind']} | {x['kl']:.4f} |" for x in rs[0]["bn_kl"]]
    return "\n".join(lines) + "\n"


def main():
    a = parse()
    torch.set_num_threads(a.threads)
    if a.merge:
        return merge(a)
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    command = "python bench/experiments.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    t0 = time.time()
    results = {"command": command, "machine": f"CPU only (2 cores shared with other jobs), {a.threads} torch thread(s)",
               "fp": {}, "runs": [], "versions": T.versions(), "settings": vars(a)}

    def save():
        results["wall_s"] = time.time() - t0
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(render(results, a, command))

    for seed in a.seeds:
        fp_ckpt = work / f"fp_seed{seed}.pt"
        for st in a.settings:
            wb, ab = SETTINGS[st]
            for m in a.methods:
                rdir = work / f"{st}_{m}_seed{seed}"
                t = time.time()
                rep = run_train(train_args(a, seed, rdir, fp_ckpt, wb, ab, m))
                results["fp"][str(seed)] = {"fp_acc": rep["fp_acc"]}
                results["qat_steps"] = rep["steps"]
                row = {"seed": seed, "setting": st, "method": m, "fp_acc": rep["fp_acc"],
                       "acc_pre_bn": rep["acc_pre_bn"], "acc_post_bn": rep["acc_post_bn"], "osc_pct": rep["osc_pct"],
                       "frozen_pct": rep["frozen_pct"], "mean_freq": rep["mean_freq"], "steps": rep["steps"],
                       "wall_s": time.time() - t,
                       "layers": [{k: l[k] for k in ("layer", "depthwise", "osc_pct", "frozen_pct")}
                                  for l in rep["layers"]]}
                if wb == 3:
                    ck = T.load_checkpoint(rdir / T.CHECKPOINT)
                    model = load_model(ck)
                    ds = load_dataset("fashion-mnist", subset=a.subset, image_size=a.image_size, seed=seed)
                    row["bn_kl"] = bn_kl(model, Batches(ds.train_x, ds.train_y, a.batch_size * 4, shuffle=True,
                                                        seed=seed + 4242, max_batches=a.kl_batches))
                if seed == a.seeds[0] and st == "W3A32":
                    for png in (rdir).glob("*.png"):
                        shutil.copy(png, out / f"{st}_{m}_seed{seed}_{png.name}")
                results["runs"].append(row)
                print(f"[{(time.time() - t0) / 60:5.1f} min] seed {seed} {st} {m}: fp {rep['fp_acc']:.2f} "
                      f"pre-BN {rep['acc_pre_bn']:.2f} post-BN {rep['acc_post_bn']:.2f} osc {rep['osc_pct']:.3f}% "
                      f"frozen {rep['frozen_pct']:.2f}% ({row['wall_s']:.0f}s)", flush=True)
                save()
    save()
    print(render(results, a, command))


def active_osc(ckpt_path) -> float | None:
    """% of tracked weights with f > 0.005 that are NOT frozen (a frozen weight's frequency EMA only decays by
    (1 - m) per step, so right after freezing it still counts as 'oscillating' in oscillation_report)."""
    from oscqat.reference import decode_flags
    try:
        sd = torch.load(ckpt_path, map_location="cpu", weights_only=False)["model"]
    except (OSError, KeyError):
        return None
    n = osc = 0
    for k, freq in sd.items():
        if k.endswith("weight_quant.freq") and freq is not None:
            fz = decode_flags(sd[k[:-4] + "flags"])[0] >= 1
            osc += int(((freq > 0.005) & ~fz).sum())
            n += freq.numel()
    return 100.0 * osc / max(1, n)


def merge(a):
    parts = [json.loads(Path(p).read_text()) for p in a.merge]
    res = dict(parts[0])
    keep = {}   # a (seed, setting, method) present in several files: the last file's run wins
    for p in parts:
        for r in p["runs"]:
            keep[(r["seed"], r["setting"], r["method"])] = r
    res["runs"] = list(keep.values())
    res["fp"] = {k: v for p in parts for k, v in p["fp"].items()}
    res["commands"] = [p["command"] for p in parts]
    res["wall_s"] = sum(p.get("wall_s", 0) for p in parts)
    res["merged_from"] = list(a.merge)
    base = parts[0]["settings"]
    for k in ("subset", "test_subset", "image_size", "batch_size", "fp_epochs", "epochs", "lr", "momentum",
              "kl_batches", "methods"):
        setattr(a, k, base[k])
    a.settings = [s for s in SETTINGS if any(r["setting"] == s for r in res["runs"])]
    for r in res["runs"]:
        if r.get("osc_active_pct") is None and r["frozen_pct"] == 0:
            r["osc_active_pct"] = r["osc_pct"]
        if r.get("osc_active_pct") is None:
            r["osc_active_pct"] = active_osc(Path(a.work) / f"{r['setting']}_{r['method']}_seed{r['seed']}" /
                                             T.CHECKPOINT)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    text = render(res, a, res["commands"][0])
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
