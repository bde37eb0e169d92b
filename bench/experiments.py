"""Nagel et al. (ICML 2022), "Overcoming Oscillations in QAT": Tables 1, 2, 4/5, 6 and Figs. 2/3 analogues on
Fashion-MNIST 28x28, from committed full-precision checkpoints (oscqat/app/checkpoints/, made by
bench/train_fp.py), with per-tensor LSQ QAT written against the public `oscqat` API.

Every table cell is one run = one function call `run_one(model, setting, method, seed)` that writes its own JSON
(bench/results/experiments/runs/MODEL_SETTING_METHOD_seedS.json) when it finishes, so partial results survive;
`merge` builds results_tables.md (mean ± std over the seeds on disk, n shown) and the plots from those files.

    python bench/experiments.py run --plan a c d studies  # every planned run not yet on disk, in this order
    python bench/experiments.py one --model small-mobilenet --setting W3A32 --method lsq --seed 0
    python bench/experiments.py merge                     # tables + plots from runs/*.json

Protocol (all runs): FP checkpoint -> oscqat.prepare (per-tensor, MSE range init; first/last layer 8 bit; only
<= 4-bit layers tracked/dampened/frozen) -> 1500 QAT steps, batch 32, SGD momentum 0.9 lr 0.01 cosine to 0
(weight decay 2.5e-5 on conv/linear weights, as the paper's W3 recipe), scales Adam lr 1e-4 cosine, tracker EMA
momentum m = 0.01 (the official implementation's TrackOscillation default; time constant 100 steps, settled
long before the end of 1500 steps — QATConfig's 0.001 would need ~5000), warm-up 25% (no freezing or dampening
before step 375), no data augmentation -> test accuracy with the training BN statistics (pre-BN) and after
re-estimating them on 50 x 128 training images (post-BN). Dampening uses the paper's eq. 5 (sum over weights,
damp_reduction='sum') so lambda has the paper's meaning.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import oscqat  # noqa: E402
from oscqat.app import models as M  # noqa: E402
from oscqat.app.data import Batches, load_dataset  # noqa: E402
from oscqat.app.checkpoint import load_fp as load_fp_checkpoint  # noqa: E402
from oscqat.app.common import evaluate  # noqa: E402
from oscqat.app.models import build_model  # noqa: E402
from oscqat.app.qat_stage import pick_depthwise  # noqa: E402
from oscqat.app.optim import qat_optimizers  # noqa: E402

OUT = ROOT / "bench" / "results" / "experiments"
RUNS = OUT / "runs"
SETTINGS = {"W4A32": (4, 32), "W3A32": (3, 32), "W2A32": (2, 32), "W4A4": (4, 4), "W3A3": (3, 3)}
# method -> (QATConfig.method, lambda schedule, lambda, f_th schedule, (f_start, f_end))
METHODS = {
    "lsq": ("lsq", None, 0.0, None, None),
    "dampen-const": ("dampen", "const", 1e-3, None, None),        # paper Table 4: best constant lambda
    "dampen-cos": ("dampen", "cos", 1e-2, None, None),            # paper Table 4/6: lambda = cos(0, 1e-2)
    "freeze-const": ("freeze", None, 0.0, "const", (0.015, 0.015)),   # paper Table 5: best constant f_th
    "freeze-cos": ("freeze", None, 0.0, "cos", (0.04, 0.01)),         # paper Table 5/6: f_th = cos(0.04, 0.01)
    "tr": ("lsq", None, 0.0, None, None),                         # transition-rate scheduling (own issue)
}
DEFAULTS = dict(steps=1500, batch_size=32, lr=0.01, weight_decay=2.5e-5, scale_lr=1e-4, momentum=0.01,
                warmup=0.25, bn_batches=50, bn_batch_size=128, kl_batches=20, kl_batch_size=256, record_last=300,
                ema_decay=0.995, qc_batches=100, bn_momentum=None, tr_start=2e-3, tr_end=2e-5,
                lr_schedule="cosine", dw_spread=None, bn_noise_seeds=())

# Priority plans (the order runs are done in). (model, setting, method, seeds)
_LITE = [(st, m) for st in ("W4A4", "W3A32") for m in ("lsq", "dampen-cos", "freeze-cos")]
PLANS = {
    # ImageNet-pretrained EfficientNet-Lite0 fine-tuned to Fashion-MNIST 32x32, per-tensor weights: one seed of
    # every cell first; "lite-b" takes the same runs from the other end, for a second process
    "lite": [("efficientnet-lite0", st, m, (sd,)) for sd in (0, 1, 2) for st, m in _LITE],
    "lite-b": [("efficientnet-lite0", st, m, (sd,)) for sd in (2, 1, 0) for st, m in reversed(_LITE)],
    # the run whose BN re-estimation lowered accuracy most, again, with re-estimations from 3 other batch draws
    "lite-bnnoise": [("efficientnet-lite0", "W4A4", "dampen-cos", (2,), {"bn_noise_seeds": (101, 202, 303)},
                      "bnnoise")],
    # the same net under a constant LR, where the from-scratch study found the paper's effects (oscillations last)
    "lite-constlr": [("efficientnet-lite0", "W4A4", m, (sd,), {"lr_schedule": "constant"}, "constlr")
                     for sd in (0, 1) for m in ("lsq", "freeze-cos", "dampen-cos")],
    "a": [("small-mobilenet", "W3A32", "lsq", (0, 1, 2)), ("small-resnet", "W3A32", "lsq", (0, 1, 2)),
          ("small-mobilenet", "W4A32", "lsq", (0, 1, 2)), ("small-resnet", "W4A32", "lsq", (0, 1, 2))],
    "c": [("small-mobilenet", "W3A32", "freeze-cos", (0, 1, 2)), ("small-mobilenet", "W3A32", "dampen-cos", (0, 1, 2)),
          ("small-mobilenet", "W3A32", "freeze-const", (0, 1, 2)),
          ("small-mobilenet", "W3A32", "dampen-const", (0, 1, 2))],
    "d": [("small-mobilenet", "W4A4", m, (0,)) for m in ("lsq", "dampen-cos", "freeze-cos", "tr")]
    + [("small-mobilenet", "W3A3", m, (0,)) for m in ("lsq", "dampen-cos", "freeze-cos", "tr")]
    + [("small-mobilenet", s, m, (1, 2)) for s in ("W4A4", "W3A3") for m in ("lsq", "dampen-cos", "freeze-cos", "tr")],
    # plan d's W3A3 seeds from the other end, for a second process beside `run --plan d`
    "d2": [("small-mobilenet", "W3A3", m, (1, 2)) for m in ("tr", "freeze-cos", "dampen-cos", "lsq")],
    # the order used on the shared CPU: one seed of every key cell first, then more seeds
    "q1": [("small-mobilenet", "W3A32", "lsq", (0,)), ("small-mobilenet", "W3A32", "freeze-cos", (0,))],
    "q2a": [("small-resnet", "W3A32", "lsq", (0,)), ("small-mobilenet", "W3A32", "dampen-cos", (0,)),
            ("small-mobilenet", "W3A32", "lsq", (1, 2)), ("small-resnet", "W3A32", "lsq", (1, 2))],
    "q2": [("small-resnet", "W3A32", "lsq", (0,)), ("small-mobilenet", "W3A32", "dampen-cos", (0,)),
           ("small-mobilenet", "W3A32", "lsq", (1, 2)), ("small-resnet", "W3A32", "lsq", (1, 2)),
           ("small-mobilenet", "W3A32", "freeze-cos", (1,)), ("small-mobilenet", "W3A32", "dampen-cos", (1,)),
           ("small-mobilenet", "W4A32", "lsq", (0,)), ("small-resnet", "W4A32", "lsq", (0,)),
           ("small-mobilenet", "W4A4", "lsq", (0,)), ("small-mobilenet", "W4A4", "freeze-cos", (0,)),
           ("small-mobilenet", "W4A4", "dampen-cos", (0,)), ("small-mobilenet", "W4A4", "tr", (0,)),
           ("small-mobilenet", "W3A3", "lsq", (0,)), ("small-mobilenet", "W3A3", "freeze-cos", (0,)),
           ("small-mobilenet", "W3A3", "dampen-cos", (0,)), ("small-mobilenet", "W3A3", "tr", (0,)),
           ("small-mobilenet", "W3A32", "freeze-const", (0,)), ("small-mobilenet", "W3A32", "dampen-const", (0,)),
           ("small-mobilenet", "W3A32", "freeze-cos", (2,)), ("small-mobilenet", "W3A32", "dampen-cos", (2,))],
    # controlled studies. bits 2/3/4 on both nets (no new FP model needed):
    "bits": [("small-mobilenet", "W2A32", "lsq", (0, 1, 2)), ("small-resnet", "W2A32", "lsq", (0, 1, 2))],
    # BatchNorm momentum during QAT (0.1 = PyTorch default used everywhere else; 0.01 averages the running
    # statistics over ~100 steps, i.e. over many oscillation periods):
    "bnmom": [("small-mobilenet", "W3A32", "lsq", (0, 1, 2), {"bn_momentum": 0.01, "lr_schedule": "constant"},
               "constlr-bnmom0.01"),
              ("small-resnet", "W3A32", "lsq", (0, 1, 2), {"bn_momentum": 0.01, "lr_schedule": "constant"},
               "constlr-bnmom0.01")],
    "bits-constlr": [(m, st, "lsq", (0, 1, 2), {"lr_schedule": "constant"}, "constlr")
                     for st in ("W4A32", "W2A32") for m in ("small-mobilenet", "small-resnet")],
    # per-channel range spread of the depthwise weights (function-preserving, see spread_depthwise)
    "spread": [("small-mobilenet", "W3A32", "lsq", (0, 1, 2), {"dw_spread": 30.0}, "spread30"),
               ("small-mobilenet", "W3A32", "freeze-cos", (0,), {"dw_spread": 30.0}, "spread30"),
               ("small-mobilenet", "W3A32", "dampen-cos", (0,), {"dw_spread": 30.0}, "spread30")],
    "spread2": [("small-mobilenet", "W3A32", "freeze-cos", (1, 2), {"dw_spread": 30.0}, "spread30"),
                ("small-mobilenet", "W3A32", "dampen-cos", (1, 2), {"dw_spread": 30.0}, "spread30")],
    # the order of the last hour on the shared CPU
    "p3": [("small-mobilenet", "W3A32", "lsq", (2,), {"dw_spread": 30.0}, "spread30"),
           ("small-mobilenet", "W3A32", "freeze-cos", (0,), {"dw_spread": 30.0}, "spread30"),
           ("small-mobilenet", "W3A32", "dampen-cos", (0,), {"dw_spread": 30.0}, "spread30"),
           ("small-mobilenet", "W3A32", "freeze-cos", (0,), {"lr_schedule": "constant"}, "constlr"),
           ("small-mobilenet", "W3A32", "dampen-cos", (0,), {"lr_schedule": "constant"}, "constlr"),
           ("small-mobilenet", "W3A32", "lsq", (0,), {"dw_spread": 30.0, "lr_schedule": "constant"},
            "spread30-constlr"),
           ("small-mobilenet", "W3A32", "dampen-cos", (1,)), ("small-mobilenet", "W3A32", "freeze-const", (0,)),
           ("small-mobilenet", "W3A32", "dampen-const", (0,)),
           ("small-mobilenet", "W4A32", "lsq", (0,)), ("small-resnet", "W4A32", "lsq", (0,)),
           *[("small-mobilenet", st, m, (0,)) for st in ("W4A4", "W3A3") for m in ("lsq", "freeze-cos", "dampen-cos",
                                                                                   "tr")]],
    "p4": [("small-mobilenet", "W3A32", "dampen-cos", (1,)), ("small-mobilenet", "W3A32", "freeze-const", (0,)),
           ("small-mobilenet", "W3A32", "dampen-const", (0,)),
           *[("small-mobilenet", "W3A32", m, (0,), {"dw_spread": 30.0, "lr_schedule": "constant"}, "spread30-constlr")
             for m in ("freeze-cos", "dampen-cos")],
           ("small-mobilenet", "W3A32", "lsq", (1,), {"dw_spread": 30.0, "lr_schedule": "constant"},
            "spread30-constlr"),
           ("small-mobilenet", "W4A32", "lsq", (0,)), ("small-resnet", "W4A32", "lsq", (0,)),
           *[("small-mobilenet", st, m, (0,)) for st in ("W3A3", "W4A4") for m in ("lsq", "freeze-cos", "dampen-cos",
                                                                                   "tr")]],
    "p5": [("small-mobilenet", "W3A32", "dampen-const", (0,)),
           *[("small-mobilenet", "W3A3", m, (0,)) for m in ("lsq", "freeze-cos", "dampen-cos", "tr")],
           *[("small-mobilenet", "W3A32", m, (0,), {"dw_spread": 30.0, "lr_schedule": "constant"}, "spread30-constlr")
             for m in ("freeze-cos", "dampen-cos")],
           ("small-mobilenet", "W4A32", "lsq", (0,)), ("small-resnet", "W4A32", "lsq", (0,)),
           *[("small-mobilenet", "W4A4", m, (0,)) for m in ("lsq", "freeze-cos", "dampen-cos", "tr")]],
    # the rest of the controlled studies (3 seeds per cell)
    "studies": [*[("small-mobilenet", "W3A32", m, (0, 1, 2), {"lr_schedule": "constant"}, "constlr")
                  for m in ("freeze-cos", "dampen-cos")],
                *[("small-mobilenet", "W3A32", m, (0, 1, 2), {"dw_spread": 30.0, "lr_schedule": "constant"},
                   "spread30-constlr") for m in ("lsq", "freeze-cos", "dampen-cos")],
                ("small-resnet", "W3A32", "lsq", (0, 1, 2), {"lr_schedule": "constant"}, "constlr"),
                *[("small-mobilenet", "W3A32", m, (1, 2), {"dw_spread": 30.0}, "spread30")
                  for m in ("freeze-cos", "dampen-cos")]],
    # the LR at the end of training: constant weight LR (no cosine decay) keeps weights moving to the last step
    "constlr": [("small-mobilenet", "W3A32", "lsq", (0, 1, 2), {"lr_schedule": "constant"}, "constlr"),
                ("small-resnet", "W3A32", "lsq", (0, 1, 2), {"lr_schedule": "constant"}, "constlr")],
    "constlr-remedies": [("small-mobilenet", "W3A32", "freeze-cos", (0, 1, 2), {"lr_schedule": "constant"}, "constlr"),
                         ("small-mobilenet", "W3A32", "dampen-cos", (0, 1, 2), {"lr_schedule": "constant"}, "constlr")],
    # weights per output channel of the depthwise-position conv: 9 (small-mobilenet), 25 (5x5 depthwise), 72
    # (grouped 3x3, 8 channels per group); needs their FP checkpoints (oscqat/app/checkpoints/README.md):
    "wpc": [("small-mobilenet-k5", "W3A32", "lsq", (0, 1, 2)), ("small-mobilenet-g8", "W3A32", "lsq", (0, 1, 2))],
    # the same under a constant LR, where the oscillations (and the BN effects) last to the end of training
    "wpc-constlr": [(m, "W3A32", "lsq", (0, 1, 2), {"lr_schedule": "constant"}, "constlr")
                    for m in ("small-mobilenet-k5", "small-mobilenet-g8")],
}

_DATA = {}
# models trained at another size than Fashion-MNIST's 28x28 (their FP checkpoint records it too)
IMAGE_SIZE = {"efficientnet-lite0": 32}


def dataset(model_name: str = ""):
    size = IMAGE_SIZE.get(model_name)
    if size not in _DATA:
        _DATA[size] = load_dataset("fashion-mnist", seed=0, image_size=size)
    return _DATA[size]


def run_path(model_name, setting, method, seed, tag="") -> Path:
    return RUNS / f"{model_name}_{setting}_{method}{tag}_seed{seed}.json"


@torch.no_grad()
def spread_depthwise(model: nn.Module, spread: float, seed: int = 1234) -> None:
    """Function-preserving re-parametrisation for the range-spread study: multiply each output channel c of every
    depthwise conv by a_c = spread ** -u_c (u_c ~ U[0, 1], fixed seed) and the following BatchNorm's running mean
    by a_c, running variance by a_c^2. BN normalises the scale away, so the float network computes the same
    function (training and eval), but the per-channel weight ranges now differ by up to `spread`x, as in
    ImageNet-trained MobileNetV2 (Nagel et al. 2019): under a per-tensor scale the small channels get 1-2 levels."""
    g = torch.Generator().manual_seed(seed)
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.children())
        for conv, bn in zip(kids, kids[1:]):
            if isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.groups == conv.in_channels \
                    and isinstance(bn, nn.BatchNorm2d):
                a = spread ** -torch.rand(conv.out_channels, generator=g)
                conv.weight.mul_(a.view(-1, 1, 1, 1))
                var = bn.running_var.clone()
                bn.running_mean.mul_(a)
                bn.running_var.mul_(a * a)
                # BN's eps does not scale: correct gamma so that eval mode is exactly the same function
                bn.weight.mul_(torch.sqrt(a * a * var + bn.eps) / (a * torch.sqrt(var + bn.eps)))


def load_fp(model_name: str, ds) -> tuple[nn.Module, dict]:
    path = M.fp_checkpoint(model_name, "fashion-mnist")
    if path is None:
        raise FileNotFoundError(f"no committed FP checkpoint for {model_name}; run bench/train_fp.py first")
    ck = load_fp_checkpoint(path)
    if ck.get("fp_epochs", 0) < ck.get("epochs_planned", 0):   # train_fp.py saves after every epoch
        raise RuntimeError(f"{path}: training still in progress (epoch {ck['fp_epochs']} of {ck['epochs_planned']})")
    model = build_model(model_name, ds.num_classes, ds.in_channels)
    model.load_state_dict(ck["model"])
    return model, {"fp_acc": ck["fp_acc"], "fp_checkpoint": str(path.relative_to(ROOT)), "fp_epochs": ck["fp_epochs"]}


# ----------------------------------------------------------------------------------------------- measurements
def layer_kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if m.groups > 1 and m.groups == m.in_channels:
        return "depthwise"
    if m.groups > 1:
        return "grouped"
    if m.kernel_size == (1, 1) and m.groups == 1:
        return "pointwise"
    return "conv"


def gauss_kl(mu_p, var_p, mu_q, var_q):
    """KL(N(mu_p, var_p) || N(mu_q, var_q)) per channel (the paper's footnote 1)."""
    return 0.5 * (torch.log(var_q / var_p) + (var_p + (mu_p - mu_q) ** 2) / var_q - 1.0)


@torch.no_grad()
def bn_kl(model: nn.Module, batches) -> list[dict]:
    """Table 1: per BN layer, KL between the population statistics of its input (the final model in eval mode
    over training batches) and its running (estimated) statistics; mean and max over channels."""
    kinds, last = {}, None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last = m
        elif isinstance(m, nn.BatchNorm2d) and last is not None:
            kinds[name] = (layer_kind(last), int(last.weight[0].numel()))
    sums, hooks = {}, []
    for name, m in model.named_modules():
        if name in kinds:
            def hook(mod, inp, _out, name=name):
                x = inp[0].double()
                s = sums.setdefault(name, [0, 0.0, 0.0])
                s[0] += x.shape[0] * x.shape[2] * x.shape[3]
                s[1] = s[1] + x.sum(dim=(0, 2, 3))
                s[2] = s[2] + (x * x).sum(dim=(0, 2, 3))
            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        for x, _ in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    rows = []
    for name, (kind, fan_in) in kinds.items():
        n, s1, s2 = sums[name]
        mu = s1 / n
        var = (s2 / n - mu * mu).clamp_min(0)
        bn = model.get_submodule(name)
        kl = gauss_kl(mu, var + bn.eps, bn.running_mean.double(), bn.running_var.double() + bn.eps)
        rows.append({"bn": name, "kind": kind, "fan_in": fan_in, "kl": float(kl.mean()), "kl_max": float(kl.max())})
    return rows


@torch.no_grad()
def grid_distance(model: nn.Module, bins: int = 40) -> dict:
    """Fig. 3: histogram of w/s - round(w/s) (latent weight's distance to its grid point, in units of s) of the
    in-range weights of the tracked layers, per layer kind; frozen weights excluded."""
    out = {}
    for name, layer in oscqat.quant_layers(model):
        q = layer.weight_quant
        if q.freq is None:
            continue
        s = q.scale.detach().float().reshape(-1, *([1] * (layer.weight.dim() - 1)))
        v = layer.weight.detach().float() / s
        keep = (v >= q.qmin - 0.5) & (v <= q.qmax + 0.5) & ~q.frozen()
        frac = (v - torch.round(v))[keep]
        h = torch.histc(frac, bins=bins, min=-0.5, max=0.5)
        kind = layer_kind(layer)
        out[kind] = (torch.tensor(out[kind]) + h).tolist() if kind in out else h.tolist()
    return out


def osc_layers(model) -> list[dict]:
    rep = oscqat.oscillation_report(model)
    kinds = {n: (layer_kind(l), int(l.weight[0].numel())) for n, l in oscqat.quant_layers(model)}
    return [{"layer": r["layer"], "kind": kinds[r["layer"]][0], "fan_in": kinds[r["layer"]][1], "numel": r["numel"],
             "osc_pct": r["osc_pct"], "osc_unfrozen_pct": r["osc_unfrozen_pct"], "frozen_pct": r["frozen_pct"],
             "mean_freq": r["mean_freq"]} for r in rep["layers"]]


# ----------------------------------------------------------------------------------------------- one run
def run_one(model_name: str, setting: str, method: str, seed: int, cfg: dict | None = None, tag: str = "",
            write: bool = True) -> dict:
    c = dict(DEFAULTS, **(cfg or {}))
    t0 = time.time()
    ds = dataset(model_name)
    wb, ab = SETTINGS[setting]
    qmethod, lam_kind, lam_max, fth_kind, fth = METHODS[method]
    torch.manual_seed(seed)
    model, fp = load_fp(model_name, ds)
    if c["dw_spread"]:
        spread_depthwise(model, c["dw_spread"])
    if c["bn_momentum"] is not None:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = c["bn_momentum"]
    config = oscqat.QATConfig(
        weight_bits=wb, act_bits=ab if ab != 32 else 8, quantize_activations=ab != 32, per_channel=False,
        method=qmethod, first_last_bits=8, momentum=c["momentum"], warmup=c["warmup"],
        damp_lambda=lam_max if lam_max else 0.01, damp_reduction="sum",
        freeze_start=fth[0] if fth else 0.04, freeze_end=fth[1] if fth else 0.01)
    calib = Batches(ds.train_x, ds.train_y, 64, shuffle=True, seed=seed + 555, max_batches=8)
    model = oscqat.prepare(model, config, calib_data=calib)
    model.train()
    steps = c["steps"]
    # SGD for the weights (weight decay on conv/linear weights), Adam for the scales (cosine); the weights' LR
    # cosine, or "constant": the study of the LR at the end
    opt_w, opt_s, lr_w, lr_s = qat_optimizers(model, c["lr"], c["weight_decay"], c["scale_lr"], steps,
                                              weight_schedule=c["lr_schedule"])
    sched = oscqat.QATSchedule(model, steps, config)
    tr = None
    if method == "tr":   # TR target cosine tr_start -> tr_end; TALR drives the tracked latent weights' LR
        tr = oscqat.TransitionRateSchedule(model, opt_w, steps, tr_start=c["tr_start"], tr_end=c["tr_end"])
    tracked = [q for q in oscqat.weight_quantizers(model) if q.tracking]
    n_tracked = sum(q.prev_int.numel() for q in tracked)
    switches = []
    ema = oscqat.QATModelEMA(model, decay=c["ema_decay"]) if (ab != 32 and method == "lsq") else None
    data = Batches(ds.train_x, ds.train_y, c["batch_size"], shuffle=True, seed=seed, drop_last=True)
    hist = {"step": [], "osc_pct": [], "frozen_pct": [], "loss": [], "lam": [], "f_th": []}
    rec = {"layer": None, "ints": [], "latent": []}
    step, epoch, tl, tn = 0, 0, 0.0, 0
    warm = int(c["warmup"] * steps)
    while step < steps:
        data.set_epoch(epoch)
        epoch += 1
        for x, y in data:
            if step >= steps:
                break
            out = model(x)
            task = F.cross_entropy(out, y)
            if lam_kind == "const":
                lam = lam_max if step >= warm else 0.0
            else:
                lam = sched.lam
            loss = task + lam * oscqat.dampening_loss(model) if lam > 0 else task
            opt_w.zero_grad(set_to_none=True)
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_w.step()
            opt_s.step()
            lr_w.step()             # with "tr": only the groups TALR does not own (BN, 8-bit first/last layers)
            lr_s.step()
            if tr is not None:
                tr.step()
            f_th = sched.freeze_threshold
            sched.step()
            step += 1
            if ema is not None:
                ema.update(model)
            if step > 1:           # transition rate: fraction of tracked integers that changed this step
                switches.append(torch.stack([q.last_counts[0] for q in tracked]).sum())
            tl += float(task.detach()) * len(y)
            tn += len(y)
            if step > steps - c["record_last"]:           # Fig. 2: one depthwise layer's integers and latents
                if rec["layer"] is None:
                    picked = pick_depthwise(model)
                    rec["layer"] = picked[0] if picked else None
                if rec["layer"] is not None:
                    layer = model.get_submodule(rec["layer"])
                    q = layer.weight_quant
                    rec["ints"].append(q.prev_int.detach().flatten().clone())
                    rec["latent"].append((layer.weight.detach() / q.scale.detach().reshape(-1, 1, 1, 1))
                                         .flatten().clone())
            if step % 50 == 0 or step == steps:
                r = oscqat.oscillation_report(model)["total"]
                tr_rate = float(torch.stack(switches).float().mean()) / n_tracked if switches else 0.0
                for k, v in (("step", step), ("osc_pct", r["osc_pct"]), ("frozen_pct", r["frozen_pct"]),
                             ("loss", tl / max(1, tn)), ("lam", lam), ("f_th", f_th), ("tr", tr_rate),
                             ("lr", float(opt_w.param_groups[-1]["lr"]))):
                    hist.setdefault(k, []).append(v)
                tl, tn, switches = 0.0, 0, []
    t_train = time.time() - t0
    test = Batches(ds.test_x, ds.test_y, 500)
    acc_pre = evaluate(model, test)
    rep = oscqat.oscillation_report(model)["total"]
    kl = bn_kl(model, Batches(ds.train_x, ds.train_y, c["kl_batch_size"], shuffle=True, seed=seed + 4242,
                              max_batches=c["kl_batches"]))
    grid = grid_distance(model)
    layers = osc_layers(model)
    bn_data = Batches(ds.train_x, ds.train_y, c["bn_batch_size"], shuffle=True, seed=seed + 777,
                      max_batches=c["bn_batches"])
    bn_model = copy.deepcopy(model)
    oscqat.reestimate_bn(bn_model, bn_data, num_batches=c["bn_batches"])
    acc_post = evaluate(bn_model, test)
    noise = {}
    for s in c["bn_noise_seeds"]:   # the BN re-estimation's own noise: other training batches, 50 and 200 of them
        for nb in (c["bn_batches"], 4 * c["bn_batches"]):
            m = copy.deepcopy(model)
            oscqat.reestimate_bn(m, Batches(ds.train_x, ds.train_y, c["bn_batch_size"], shuffle=True, seed=s,
                                            max_batches=nb), num_batches=nb)
            noise[f"seed{s}_batches{nb}"] = evaluate(m, test)
    res = {"model": model_name, "setting": setting, "method": method, "seed": seed, "tag": tag, **fp,
           "acc_pre_bn": acc_pre, "acc_post_bn": acc_post, "osc_pct": rep["osc_pct"],
           "osc_unfrozen_pct": rep["osc_unfrozen_pct"], "frozen_pct": rep["frozen_pct"], "mean_freq": rep["mean_freq"],
           "steps": step, "epochs_seen": step * c["batch_size"] / len(ds.train_y), "config": c,
           "qat_config": {k: v for k, v in vars(config).items() if k != "extra"},
           "bn_kl": kl, "grid_hist": grid, "layers": layers, "history": hist, "acc_post_bn_noise": noise}
    if ema is not None:                                   # EMA (+ QC), Gupta & Asthana: same LSQ trajectory
        em = copy.deepcopy(ema.model)
        res["ema_pre_bn"] = evaluate(em, test)
        oscqat.reestimate_bn(em, bn_data, num_batches=c["bn_batches"])
        res["ema_post_bn"] = evaluate(em, test)
        qc_data = Batches(ds.train_x, ds.train_y, 64, shuffle=True, seed=seed + 999, max_batches=c["qc_batches"])
        oscqat.quantization_correction(em, qc_data, F.cross_entropy, epochs=1, lr=1e-3)
        res["ema_qc"] = evaluate(em, test)
    if rec["layer"] is not None and rec["ints"]:
        ints = torch.stack(rec["ints"]).float()             # (K, numel)
        lat = torch.stack(rec["latent"])
        q = model.get_submodule(rec["layer"]).weight_quant
        changes = (ints[1:] != ints[:-1]).sum(0)
        top = torch.argsort(changes, descending=True)[:8]
        res["trace"] = {"layer": rec["layer"], "first_step": steps - len(rec["ints"]) + 1,
                        "index": top.tolist(), "changes": changes[top].tolist(),
                        "ints": ints[:, top].T.tolist(), "latent": [[round(v, 4) for v in r] for r in lat[:, top].T.tolist()],
                        "freq": q.freq.flatten()[top].tolist(), "frozen": q.frozen().flatten()[top].tolist(),
                        "layer_changes_mean": float(changes.float().mean())}
    res["wall_s"] = time.time() - t0
    res["train_s"] = t_train
    if write:
        RUNS.mkdir(parents=True, exist_ok=True)
        p = run_path(model_name, setting, method, seed, tag)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        os.replace(tmp, p)
    return res


# ----------------------------------------------------------------------------------------------- merge
PAPER_T2 = {("small-resnet", "W4A32"): ("ResNet18 W4", 70.15, 0.03, 70.20, 0.02),
            ("small-resnet", "W3A32"): ("ResNet18 W3", 69.63, 0.01, 69.70, 0.05),
            ("small-mobilenet", "W4A32"): ("MobileNetV2 W4", 68.99, 0.44, 71.01, 0.05),
            ("small-mobilenet", "W3A32"): ("MobileNetV2 W3", 64.97, 1.23, 69.50, 0.04)}
PAPER_T45 = {"lsq": ("baseline", 64.97, 69.50, 4.93), "dampen-const": ("λ = 1e-3", 66.99, 69.96, 0.21),
             "dampen-cos": ("λ = cos(0, 1e-2)", 70.18, 70.26, 1.11),
             "freeze-const": ("f_th = 0.015", 69.79, 70.13, 1.23),
             "freeze-cos": ("f_th = cos(0.04, 0.01)", 69.97, 70.33, 0.04)}
PAPER_T6 = {("W4A4", "lsq"): 69.5, ("W4A4", "dampen-cos"): 70.5, ("W4A4", "freeze-cos"): 70.6,
            ("W3A3", "lsq"): 65.3, ("W3A3", "dampen-cos"): 67.8, ("W3A3", "freeze-cos"): 67.6}
KIND_COLORS = {"depthwise": "tab:red", "grouped": "tab:orange", "pointwise": "tab:blue", "conv": "tab:green",
               "linear": "tab:gray"}


def load_runs(tag: str = "") -> list[dict]:
    out = []
    for p in sorted(RUNS.glob("*.json")):
        r = json.loads(p.read_text())
        if r.get("tag", "") == tag:
            out.append(r)
    return out


def sel(runs, **kw):
    return [r for r in runs if all(r.get(k) == v for k, v in kw.items())]


def ms(vals, fmt="{:.2f}"):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    m = statistics.fmean(vals)
    return f"{fmt.format(m)} ± {fmt.format(statistics.stdev(vals))}" if len(vals) > 1 else f"{fmt.format(m)}"


def mean(vals):
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else float("nan")


STEM_BN = {"features.0.1", "1"}   # the BN after the 8-bit first conv (not tracked): left out of the aggregates


def kind_kl(r, kind, key="kl"):
    v = [x[key] for x in r["bn_kl"] if x["kind"] == kind and x["bn"] not in STEM_BN]
    if not v:
        return None
    return max(v) if key == "kl_max" else statistics.fmean(v)


def conv_of(bn_name: str) -> str:
    """The conv right before a BN in the same nn.Sequential (index - 1)."""
    head, _, last = bn_name.rpartition(".")
    if not last.isdigit():
        return ""
    return f"{head}.{int(last) - 1}" if head else str(int(last) - 1)


def tables(runs) -> list[str]:
    L = []
    fp = {m: sel(runs, model=m)[0]["fp_acc"] for m in ("small-mobilenet", "small-resnet") if sel(runs, model=m)}
    L += ["## Table 2 analogue: weight-only LSQ, accuracy before / after BN re-estimation", "",
          "| net | weights | FP acc | pre-BN | post-BN | post − pre | osc. % (f > 0.005) | n | paper (ImageNet): "
          "pre-BN / post-BN |", "|---|---|---|---|---|---|---|---|---|"]
    for m in ("small-mobilenet", "small-resnet"):
        for st in ("W4A32", "W3A32", "W2A32"):
            rs = sel(runs, model=m, setting=st, method="lsq")
            if not rs:
                continue
            pp = PAPER_T2.get((m, st))
            ptxt = f"{pp[0]}: {pp[1]:.2f}±{pp[2]:.2f} / {pp[3]:.2f}±{pp[4]:.2f} ({pp[3] - pp[1]:+.2f})" if pp else "–"
            L.append(f"| {m} | {st[:2]} | {fp.get(m, float('nan')):.2f} | {ms([r['acc_pre_bn'] for r in rs])} | "
                     f"{ms([r['acc_post_bn'] for r in rs])} | "
                     f"{ms([r['acc_post_bn'] - r['acc_pre_bn'] for r in rs])} | "
                     f"{ms([r['osc_pct'] for r in rs], '{:.2f}')} | {len(rs)} | {ptxt} |")
    L += ["", "## Table 1 analogue: BN statistics discrepancy, depthwise vs pointwise (weights 3 bit, LSQ)", "",
          "KL(population ‖ running) of each BN's input, Gaussian per channel (paper's footnote 1); the population is "
          "the final model (eval mode, before BN re-estimation) over 20 x 256 training images. Mean over channels, "
          "then over layers of a kind, then over seeds; max = the largest channel KL in any layer of that kind "
          "(mean over seeds).", "",
          "| net | layer kind | weights / out channel | mean KL | max KL | osc. % of the kind | n | paper (W3) |",
          "|---|---|---|---|---|---|---|---|"]
    paper_t1 = {"depthwise": "MobileNetV2 DW: E 0.29–1.25, max 27–55", "pointwise": "MobileNetV2 PW: E 0.0004–0.03, "
                "max 0.004–0.79", "conv": "ResNet18 conv: E 0.0001–0.0014, max 0.0006–0.013"}
    for m in ("small-mobilenet", "small-resnet"):
        rs = sel(runs, model=m, setting="W3A32", method="lsq")
        if not rs:
            continue
        for kind in ("depthwise", "pointwise", "conv"):
            if kind_kl(rs[0], kind) is None:
                continue
            fans = sorted({x["fan_in"] for x in rs[0]["bn_kl"] if x["kind"] == kind and x["bn"] not in STEM_BN})
            mx = [kind_kl(r, kind, "kl_max") for r in rs]
            osc = [mean([l["osc_pct"] for l in r["layers"] if l["kind"] == kind]) for r in rs]
            L.append(f"| {m} | {kind} | {fans[0]}–{fans[-1]} | {ms([kind_kl(r, kind) for r in rs], '{:.4f}')} | "
                     f"{ms(mx, '{:.3f}')} | {ms(osc, '{:.2f}')} | {len(rs)} | {paper_t1[kind]} |")
    rs = sel(runs, model="small-mobilenet", setting="W3A32", method="lsq")
    if rs:
        L += ["", "Per layer (small-mobilenet, W3, LSQ; mean over seeds):", "",
              "| BN after | kind | weights / out ch. | mean KL | max KL | osc. % of the conv |", "|---|---|---|---|---|---|"]
        oscs = {}
        for r in rs:
            for l in r["layers"]:
                oscs.setdefault(l["layer"], []).append(l["osc_pct"])
        for i, x in enumerate(rs[0]["bn_kl"]):
            conv_name = conv_of(x["bn"])
            L.append(f"| {x['bn']} | {x['kind']} | {x['fan_in']} | {mean([r['bn_kl'][i]['kl'] for r in rs]):.4f} | "
                     f"{mean([r['bn_kl'][i]['kl_max'] for r in rs]):.3f} | "
                     f"{ms(oscs.get(conv_name, [None]), '{:.2f}')} |")
    L += ["", "## Tables 4/5 analogue: dampening and freezing, small-mobilenet, weights 3 bit", "",
          "| method | pre-BN | post-BN | post − pre | osc. % (f > 0.005) | osc. % not frozen | frozen % | n | "
          "paper: pre-BN / post-BN / osc. % |", "|---|---|---|---|---|---|---|---|---|"]
    for meth in ("lsq", "dampen-const", "dampen-cos", "freeze-const", "freeze-cos"):
        rs = sel(runs, model="small-mobilenet", setting="W3A32", method=meth)
        if not rs:
            continue
        pp = PAPER_T45[meth]
        L.append(f"| {meth} ({pp[0]}) | {ms([r['acc_pre_bn'] for r in rs])} | {ms([r['acc_post_bn'] for r in rs])} | "
                 f"{ms([r['acc_post_bn'] - r['acc_pre_bn'] for r in rs])} | {ms([r['osc_pct'] for r in rs], '{:.2f}')} | "
                 f"{ms([r['osc_unfrozen_pct'] for r in rs], '{:.2f}')} | {ms([r['frozen_pct'] for r in rs], '{:.2f}')} "
                 f"| {len(rs)} | {pp[1]:.2f} / {pp[2]:.2f} / {pp[3]:.2f} |")
    L += ["", "## Table 6 analogue: weights and activations quantized, small-mobilenet", "",
          "| W/A | method | pre-BN | post-BN (reported) | Δ to FP | osc. % | n | paper val. acc. (Δ to FP 71.7) |",
          "|---|---|---|---|---|---|---|---|"]
    for st in ("W4A4", "W3A3"):
        for meth in ("lsq", "dampen-cos", "freeze-cos", "tr", "ema+qc"):
            base = "lsq" if meth == "ema+qc" else meth
            rs = sel(runs, model="small-mobilenet", setting=st, method=base)
            if meth == "ema+qc":
                rs = [r for r in rs if "ema_qc" in r]
            if not rs:
                continue
            post = [r["ema_qc"] if meth == "ema+qc" else r["acc_post_bn"] for r in rs]
            pre = [r["ema_pre_bn"] if meth == "ema+qc" else r["acc_pre_bn"] for r in rs]
            pp = PAPER_T6.get((st, meth))
            L.append(f"| {st[1]}/{st[3]} | {meth} | {ms(pre)} | {ms(post)} | "
                     f"{mean(post) - rs[0]['fp_acc']:+.2f} | "
                     f"{ms([r['osc_pct'] for r in rs], '{:.2f}') if meth != 'ema+qc' else '(as lsq)'} | {len(rs)} | "
                     f"{f'{pp:.1f} ({pp - 71.7:+.1f})' if pp else '–'} |")
    L += ["", "ema+qc: the LSQ runs' exponential moving average of weights and scales (oscqat.QATModelEMA, decay "
          "0.995), BN re-estimated, then quantization correction (oscqat.quantization_correction, 100 x 64 images, "
          "1 epoch, Adam 1e-3) — the same training trajectories as the lsq row, so the comparison is paired; "
          "'pre-BN' for ema+qc is the EMA model before re-estimation."]
    extra = [r for r in load_runs_all() if r.get("tag") or r["model"] in M.STUDY_VARIANTS]
    if extra:
        extra += [r for r in runs if r["setting"] == "W3A32" and r["method"] == "lsq"
                  and r["model"] not in M.STUDY_VARIANTS]
        L += ["", "## Controlled studies (tagged runs)", "",
              "| tag | net | setting | method | FP | pre-BN | post-BN | post − pre | osc. % | 3x3-layer KL mean / max | "
              "pw KL mean / max | n |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        keys = sorted({(r["tag"], r["model"], r["setting"], r["method"]) for r in extra})
        for tag, m, st, meth in keys:
            rs = [r for r in extra if (r["tag"], r["model"], r["setting"], r["method"]) == (tag, m, st, meth)]
            L.append(f"| {tag} | {m} | {st} | {meth} | {rs[0]['fp_acc']:.2f} | "
                     f"{ms([r['acc_pre_bn'] for r in rs])} | "
                     f"{ms([r['acc_post_bn'] for r in rs])} | {ms([r['acc_post_bn'] - r['acc_pre_bn'] for r in rs])} | "
                     f"{ms([r['osc_pct'] for r in rs])} | {ms([kl3(r) for r in rs], '{:.4f}')} / "
                     f"{ms([kl3(r, 'kl_max') for r in rs], '{:.3f}')} | "
                     f"{ms([kind_kl(r, 'pointwise') for r in rs], '{:.4f}')} / "
                     f"{ms([kind_kl(r, 'pointwise', 'kl_max') for r in rs], '{:.3f}')} | {len(rs)} |")
    return L


def kl3(r, key="kl"):
    """BN KL of the 3x3 layers (depthwise, grouped or full conv, whichever the net has)."""
    for kind in ("depthwise", "grouped", "conv"):
        v = kind_kl(r, kind, key)
        if v is not None and kind != "conv" or (kind == "conv" and v is not None and r["model"] == "small-resnet"):
            return v
    return None


def runs_all_w3() -> list[dict]:
    return [r for r in load_runs_all() if not r.get("tag") and r["setting"] == "W3A32" and r["method"] == "lsq"]


def load_runs_all() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]


def plots(runs) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    allr = load_runs_all()

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(OUT / name, dpi=110)
        plt.close(fig)
        made.append(name)
    # Fig. 2: integer traces of the most-changing weights of a depthwise layer, one panel per weight
    meths = [m for m in ("lsq", "dampen-cos", "freeze-cos") if sel(runs, model="small-mobilenet", setting="W3A32",
                                                                   method=m, seed=0)]
    nw = 4
    if meths:
        fig, axes = plt.subplots(nw, len(meths), figsize=(4.6 * len(meths), 1.7 * nw + 1), squeeze=False,
                                 sharex=True)
        for j, meth in enumerate(meths):
            r = sel(runs, model="small-mobilenet", setting="W3A32", method=meth, seed=0)[0]
            tr = r.get("trace")
            if not tr:
                continue
            steps = list(range(tr["first_step"], tr["first_step"] + len(tr["ints"][0])))
            axes[0][j].set_title(f"{meth}: {tr['layer']}\n(mean {tr['layer_changes_mean']:.2f} integer changes "
                                 f"per weight in these {len(steps)} steps)", fontsize=8)
            for k in range(min(nw, len(tr["ints"]))):
                ax = axes[k][j]
                ax.step(steps, tr["ints"][k], where="post", color="tab:blue", lw=1.5, label="integer")
                ax.plot(steps, tr["latent"][k], color="tab:orange", lw=0.9, label="latent w/s")
                lo, hi = min(tr["ints"][k] + tr["latent"][k]), max(tr["ints"][k] + tr["latent"][k])
                for b in range(math.floor(lo), math.ceil(hi)):
                    ax.axhline(b + 0.5, color="gray", lw=0.5, ls=":")
                ax.set_ylim(math.floor(lo) - 0.3, math.ceil(hi) + 0.3)
                ax.text(0.01, 0.04, f"w[{tr['index'][k]}]: {tr['changes'][k]} changes, f = {tr['freq'][k]:.3f}"
                        + (", frozen" if tr["frozen"][k] else ""), transform=ax.transAxes, fontsize=7)
                ax.grid(alpha=0.2)
            axes[-1][j].set_xlabel("QAT step")
        axes[0][0].legend(fontsize=7, loc="upper right")
        fig.suptitle("Fig. 2 analogue: the 4 most-switching weights of the most-oscillating depthwise layer\n"
                     "over the last steps (small-mobilenet W3, seed 0; dotted: decision thresholds)", fontsize=9)
        save(fig, "fig2_integer_traces.png")
    # Fig. 3: distance to grid, depthwise and pointwise, before/after the remedies
    meths = [m for m in ("lsq", "dampen-cos", "freeze-cos", "dampen-const", "freeze-const")
             if sel(runs, model="small-mobilenet", setting="W3A32", method=m)]
    if meths:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, kind in zip(axes, ("depthwise", "pointwise")):
            for i, meth in enumerate(meths):
                rs = sel(runs, model="small-mobilenet", setting="W3A32", method=meth)
                h = torch.tensor([r["grid_hist"][kind] for r in rs if kind in r["grid_hist"]]).sum(0)
                if h.numel() == 0:
                    continue
                h = h / h.sum() * len(h)
                centers = torch.linspace(-0.5 + 0.5 / len(h), 0.5 - 0.5 / len(h), len(h))
                ax.step(centers.tolist(), h.tolist(), where="mid", lw=1.8 if meth == "lsq" else 1.2,
                        label=f"{meth} (n={len(rs)})", color=f"C{i}")
            ax.axvline(-0.5, color="k", lw=0.5)
            ax.axvline(0.5, color="k", lw=0.5)
            ax.set_title(f"{kind} layers: latent weight's distance to its grid point")
            ax.set_xlabel("w/s − round(w/s)   (±0.5 = decision threshold)")
            ax.set_ylabel("density (uniform = 1)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Fig. 3 analogue: small-mobilenet W3, end of training, non-frozen in-range weights", fontsize=10)
        save(fig, "fig3_grid_distance.png")
    # Table 1: BN KL per layer, default protocol and the constant-LR / range-spread studies
    regimes = (("", "cosine LR (default)", "o", "-"), ("constlr", "constant LR", "^", "--"),
               ("spread30-constlr", "constant LR + dw range spread 30x", "*", ":"))
    nets = [m for m in ("small-mobilenet", "small-resnet") if sel(runs, model=m, setting="W3A32", method="lsq")]
    if nets:
        fig, axes = plt.subplots(1, len(nets), figsize=(7.5 * len(nets), 4.4), squeeze=False,
                                 gridspec_kw={"width_ratios": [1.6, 1][:len(nets)]})
        for ax, m in zip(axes[0], nets):
            x0 = None
            for tag, label, mk, ls in regimes:
                rs = [r for r in allr if r["model"] == m and r["setting"] == "W3A32" and r["method"] == "lsq"
                      and r.get("tag", "") == tag]
                if not rs:
                    continue
                x0 = rs[0]["bn_kl"]
                idx = [i for i, x in enumerate(x0) if x["bn"] not in STEM_BN]
                vals = [mean([r["bn_kl"][i]["kl"] for r in rs]) for i in idx]
                ax.plot(range(len(idx)), vals, color="0.6", ls=ls, lw=0.8)
                ax.scatter(range(len(idx)), vals, c=[KIND_COLORS[x0[i]["kind"]] for i in idx], marker=mk,
                           s=40 if mk == "*" else 22, zorder=3)
                ax.plot([], [], color="0.4", ls=ls, marker=mk, label=f"{label} (n={len(rs)})")
            idx = [i for i, x in enumerate(x0) if x["bn"] not in STEM_BN]
            ax.set_yscale("log")
            ax.set_xticks(range(len(idx)))
            ax.set_xticklabels([x0[i]["bn"].replace("features.", "f").replace(".conv.", ".") for i in idx],
                               rotation=90, fontsize=6)
            for t, i in zip(ax.get_xticklabels(), idx):
                t.set_color(KIND_COLORS[x0[i]["kind"]])
            for kind, c in KIND_COLORS.items():
                if any(x0[i]["kind"] == kind for i in idx):
                    ax.scatter([], [], color=c, label=kind)
            ax.legend(fontsize=7)
            ax.set_ylabel("KL(population || running), mean over channels")
            ax.set_title(f"{m}, weights 3 bit, LSQ: BN statistics error per BN layer", fontsize=9)
            ax.grid(alpha=0.3, axis="y")
        save(fig, "table1_bn_kl.png")
    # weights per output channel vs BN KL and oscillations, per layer (both nets, W3 LSQ)
    pick = lambda m, tag: [r for r in allr if r["model"] == m and r["setting"] == "W3A32"  # noqa: E731
                           and r["method"] == "lsq" and r.get("tag", "") == tag]
    nets = [m for m in ("small-mobilenet", "small-resnet", *M.STUDY_VARIANTS) if pick(m, "")]
    if nets:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        marks = {"small-mobilenet": "o", "small-resnet": "s", "small-mobilenet-k5": "^", "small-mobilenet-g8": "D"}
        present = set()
        for m in nets:
            for tag, filled in (("", False), ("constlr", True)):
                rs = pick(m, tag)
                if not rs:
                    continue
                for i, x in enumerate(rs[0]["bn_kl"]):
                    if x["bn"] in STEM_BN:
                        continue
                    present.add(x["kind"])
                    c = KIND_COLORS[x["kind"]]
                    axes[0].scatter(x["fan_in"], mean([r["bn_kl"][i]["kl"] for r in rs]), marker=marks[m], s=24,
                                    facecolors=c if filled else "none", edgecolors=c)
                for j, l in enumerate(rs[0]["layers"]):
                    c = KIND_COLORS[l["kind"]]
                    o = mean([r["layers"][j]["osc_pct"] for r in rs])
                    axes[1].scatter(l["fan_in"], max(o, 1e-3), marker=marks[m], s=24,
                                    facecolors=c if filled else "none", edgecolors=c)
        for ax, yl in zip(axes, ("BN KL (mean over channels)", "% weights with f > 0.005")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("weights per output channel (fan-in)")
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3)
        for kind, c in KIND_COLORS.items():
            if kind in present:
                axes[1].scatter([], [], color=c, label=kind)
        for m in nets:
            axes[1].scatter([], [], color="k", marker=marks[m], label=m)
        axes[1].scatter([], [], facecolors="none", edgecolors="k", label="cosine LR (default)")
        axes[1].scatter([], [], color="k", label="constant LR")
        axes[1].legend(fontsize=7, ncol=2, loc="lower left")
        fig.suptitle("Per layer (4-bit-or-less layers), weights 3 bit, LSQ, mean over seeds: BN statistics error and "
                     "oscillating weights vs weights per output channel", fontsize=9)
        save(fig, "fanin_kl_osc.png")
    # Table 2: pre/post BN bars, default protocol and the studies where oscillations persist
    groups = []
    for m in ("small-mobilenet", *M.STUDY_VARIANTS, "small-resnet"):
        for st in ("W4A32", "W3A32", "W2A32"):
            for tag, lab in (("", "cosine LR"), ("constlr", "const. LR"),
                             ("constlr-bnmom0.01", "const. LR\nBN mom. 0.01"),
                             ("spread30-constlr", "const. LR\n+ range spread")):
                rs = [r for r in allr if r["model"] == m and r["setting"] == st and r["method"] == "lsq"
                      and r.get("tag", "") == tag]
                if rs:
                    groups.append((f"{m.replace('small-', '')} {st[:2]}\n{lab}", rs))
    if groups:
        fig, ax = plt.subplots(figsize=(1.5 * len(groups) + 2, 4.2))
        for i, (lab, rs) in enumerate(groups):
            for j, (key, c) in enumerate((("acc_pre_bn", "tab:orange"), ("acc_post_bn", "tab:blue"))):
                v = [r[key] for r in rs]
                ax.bar(i + (j - 0.5) * 0.38, mean(v), 0.36, yerr=statistics.stdev(v) if len(v) > 1 else 0,
                       color=c, capsize=3, label=("pre-BN" if j == 0 else "post-BN re-estimation") if i == 0 else None)
                ax.scatter([i + (j - 0.5) * 0.38] * len(v), v, color="k", s=8, zorder=3)
            gap = mean([r["acc_post_bn"] - r["acc_pre_bn"] for r in rs])
            ax.text(i, max(mean([r["acc_post_bn"] for r in rs]), mean([r["acc_pre_bn"] for r in rs])) + 0.3,
                    f"{gap:+.2f}\nn={len(rs)}", ha="center", fontsize=7)
        for m, ls, c in (("small-mobilenet", "--", "tab:red"), ("small-resnet", ":", "tab:red"),
                         *((v, "-.", c) for v, c in zip(M.STUDY_VARIANTS, ("tab:purple", "tab:brown")))):
            fp = [r["fp_acc"] for r in allr if r["model"] == m]
            if fp:
                ax.axhline(fp[0], color=c, ls=ls, lw=0.8, label=f"FP {m}")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g[0] for g in groups], fontsize=7)
        lo = min(min(r["acc_pre_bn"] for r in rs) for _, rs in groups)
        ax.set_ylim(max(0, lo - 1.5), 94.2)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Table 2 analogue: LSQ weight-only, before / after BN re-estimation (dots: seeds; text: gain)",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(alpha=0.3, axis="y")
        save(fig, "table2_bn_reestimation.png")
    # oscillation history, cosine LR (solid) and constant LR (dashed)
    meths = [m for m in METHODS if sel(runs, model="small-mobilenet", setting="W3A32", method=m)]
    if meths:
        fig, ax = plt.subplots(figsize=(10, 4.2))
        for i, meth in enumerate(meths):
            for tag, ls, lab in (("", "-", "cosine LR"), ("constlr", "--", "constant LR")):
                rs = [r for r in allr if r["model"] == "small-mobilenet" and r["setting"] == "W3A32"
                      and r["method"] == meth and r.get("tag", "") == tag]
                if not rs:
                    continue
                st = rs[0]["history"]["step"]
                v = [mean([r["history"]["osc_pct"][k] for r in rs if len(r["history"]["osc_pct"]) > k])
                     for k in range(len(st))]
                ax.plot(st, v, ls=ls, label=f"{meth}, {lab} (n={len(rs)})", color=f"C{i}")
        ax.set_xlabel("QAT step")
        ax.set_ylabel("% tracked weights with f > 0.005")
        ax.set_title("small-mobilenet W3: oscillating weights during QAT (warm-up ends at step 375)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        save(fig, "oscillation_history.png")
    return made


def pretrained_plot(runs, model="efficientnet-lite0") -> list[str]:
    """Oscillating weights and the weights' learning rate over the QAT steps of the pretrained net's runs."""
    rs_all = sel(runs, model=model)
    if not rs_all:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = [st for st in ("W4A4", "W3A32", "W3A3") if sel(rs_all, setting=st)]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, st in zip(axes[0], settings):
        for i, meth in enumerate(("lsq", "dampen-cos", "freeze-cos", "tr")):
            rs = sel(rs_all, setting=st, method=meth)
            if not rs:
                continue
            steps = rs[0]["history"]["step"]
            for key, ls in (("osc_pct", "-"), ("frozen_pct", ":")):
                v = [mean([r["history"][key][k] for r in rs if len(r["history"][key]) > k]) for k in range(len(steps))]
                if key == "frozen_pct" and not any(v):
                    continue
                ax.plot(steps, v, ls=ls, color=f"C{i}",
                        label=f"{meth} {'oscillating' if key == 'osc_pct' else 'frozen'} (n={len(rs)})")
        lr = rs_all[0]["history"].get("lr")
        if lr:
            ax2 = ax.twinx()
            ax2.plot(rs_all[0]["history"]["step"], lr, color="gray", lw=0.8, alpha=0.6)
            ax2.set_ylabel("weights' learning rate (gray)", fontsize=8)
        ax.axvline(DEFAULTS["warmup"] * DEFAULTS["steps"], color="k", lw=0.5, ls="--")
        ax.set_xlabel("QAT step (dashed: end of warm-up, freezing/dampening start)")
        ax.set_ylabel("% of tracked weights (oscillating: f > 0.005)")
        ax.set_title(f"{st}: oscillations peak mid-training and die out as the cosine LR falls", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Pretrained {model} → Fashion-MNIST 32x32, per-tensor weights: oscillating (solid) and frozen "
                 f"(dotted) weights during QAT, mean over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT / "pretrained_oscillation_history.png", dpi=110)
    plt.close(fig)
    return ["pretrained_oscillation_history.png"]


def paired(runs, model, setting, method, key):
    """method - lsq on the same seed (the same calibration batches and batch order), for each seed both ran."""
    base = {r["seed"]: r[key] for r in sel(runs, model=model, setting=setting, method="lsq")}
    return [r[key] - base[r["seed"]] for r in sel(runs, model=model, setting=setting, method=method)
            if r["seed"] in base]


def pretrained_tables(runs, model="efficientnet-lite0") -> list[str]:
    """The pretrained net's cells: accuracy, BN gap, oscillations, BN KL by layer kind, paired gains over LSQ."""
    rs_all = sel(runs, model=model)
    if not rs_all:
        return []
    L = ["", f"## Pretrained {model} fine-tuned to Fashion-MNIST 32x32, per-tensor weights (FP "
              f"{rs_all[0]['fp_acc']:.2f} %)", "",
         "| setting | method | pre-BN | post-BN | post − pre | Δ pre vs lsq (paired) | Δ post vs lsq (paired) | "
         "osc. % | frozen % | BN KL dw / pw (mean) | n |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for st in ("W4A4", "W3A32", "W3A3"):
        for meth in ("lsq", "dampen-cos", "freeze-cos", "tr", "ema+qc"):
            rs = sel(runs, model=model, setting=st, method="lsq" if meth == "ema+qc" else meth)
            if meth == "ema+qc":
                rs = [r for r in rs if "ema_qc" in r]
            if not rs:
                continue
            if meth == "ema+qc":
                pre, post = [r["ema_pre_bn"] for r in rs], [r["ema_qc"] for r in rs]
                base = {r["seed"]: r for r in rs}
                dpre = [r["ema_pre_bn"] - base[r["seed"]]["acc_pre_bn"] for r in rs]
                dpost = [r["ema_qc"] - base[r["seed"]]["acc_post_bn"] for r in rs]
                osc, kl = "(as lsq) | –", "–"
            else:
                pre, post = [r["acc_pre_bn"] for r in rs], [r["acc_post_bn"] for r in rs]
                dpre = paired(runs, model, st, meth, "acc_pre_bn") if meth != "lsq" else []
                dpost = paired(runs, model, st, meth, "acc_post_bn") if meth != "lsq" else []
                osc = f"{ms([r['osc_pct'] for r in rs])} | {ms([r['frozen_pct'] for r in rs])}"
                kl = (f"{ms([kind_kl(r, 'depthwise') for r in rs], '{:.3f}')} / "
                      f"{ms([kind_kl(r, 'pointwise') for r in rs], '{:.3f}')}")
            L.append(f"| {st} | {meth} | {ms(pre)} | {ms(post)} | {ms([b - a for a, b in zip(pre, post)])} | "
                     f"{ms(dpre) if dpre else '–'} | {ms(dpost) if dpost else '–'} | {osc} | {kl} | {len(rs)} |")
    for r in [r for r in load_runs_all() if r["model"] == model and r.get("acc_post_bn_noise")]:
        noise = r["acc_post_bn_noise"]
        by_n = {}
        for k, v in noise.items():
            by_n.setdefault(int(k.split("batches")[1]), []).append(v)
        L += ["", f"BN re-estimation's own noise ({r['setting']} {r['method']} seed {r['seed']}, tag {r['tag']}): the "
              f"same trained model, pre-BN {r['acc_pre_bn']:.2f} %, post-BN {r['acc_post_bn']:.2f} % with the "
              f"protocol's batches; with other draws of training batches: "
              + "; ".join(f"{n} x {r['config']['bn_batch_size']} images: "
                          + ", ".join(f"{v:.2f}" for v in vs) + f" % ({ms(vs)})" for n, vs in sorted(by_n.items()))]
    L += ["", "Paired Δ: the method's accuracy minus LSQ's on the same seed (same calibration batches and batch "
          "order), mean ± std over seeds. ema+qc: the LSQ runs' EMA model (pre-BN: before re-estimation; post-BN: "
          "after re-estimation and quantization correction), paired with the same LSQ run."]
    return L


def merge() -> None:
    allr = load_runs_all()
    runs = [r for r in allr if not r.get("tag")]
    L = ["<!-- generated by `python bench/experiments.py merge` from runs/*.json; do not edit -->", ""]
    L += tables([r for r in runs if r["model"] != "efficientnet-lite0"])
    L += pretrained_tables(runs)
    made = plots([r for r in runs if r["model"] != "efficientnet-lite0"]) + pretrained_plot(runs)
    L += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in made), "",
          f"Runs on disk: {len(runs)} (+ {len(allr) - len(runs)} tagged); total training wall time "
          f"{sum(r['wall_s'] for r in allr) / 60:.0f} min on one shared CPU core."]
    (OUT / "results_tables.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


# ----------------------------------------------------------------------------------------------- CLI
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--plan", nargs="+", default=["a", "c", "d"], choices=list(PLANS),
                   help="a: Table 2; c: Tables 4/5; d: Table 6; studies / bits / bits-constlr / bnmom / wpc: controlled "
                        "studies; q*/p*: the orders used on the shared CPU (results.md)")
    r.add_argument("--max-seeds", type=int, default=3, help="only seeds < this (fewer seeds for a quick pass)")
    r.add_argument("--stop-at", default=None, help="UTC HH:MM: start no run after this time")
    r.add_argument("--est-run-s", type=float, default=0, help="with --stop-at: skip a run that would end after it")
    o = sub.add_parser("one")
    o.add_argument("--model", default="small-mobilenet")
    o.add_argument("--setting", default="W3A32", choices=list(SETTINGS))
    o.add_argument("--method", default="lsq", choices=list(METHODS))
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    o.add_argument("--bn-momentum", type=float, default=None, help="BatchNorm momentum during QAT (study)")
    o.add_argument("--tag", default="")
    sub.add_parser("merge")
    for q in (r, o):
        q.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if a.cmd == "merge":
        return merge()
    torch.set_num_threads(a.threads)
    if a.cmd == "one":
        cfg = {"steps": a.steps, "bn_momentum": a.bn_momentum}
        res = run_one(a.model, a.setting, a.method, a.seed, cfg, tag=a.tag)
        print(json.dumps({k: res[k] for k in ("model", "setting", "method", "seed", "fp_acc", "acc_pre_bn",
                                              "acc_post_bn", "osc_pct", "frozen_pct", "wall_s")}))
        return
    last_wall = a.est_run_s
    for plan in a.plan:
        for entry in PLANS[plan]:
            model_name, setting, method, seeds = entry[:4]
            cfg, tag = (entry[4], entry[5]) if len(entry) > 4 else ({}, "")
            for seed in seeds:
                if seed >= a.max_seeds or run_path(model_name, setting, method, seed, tag).exists():
                    continue
                if method == "tr" and not hasattr(oscqat, "TransitionRateSchedule"):
                    print(f"skip {model_name} {setting} tr seed {seed}: no oscqat.TransitionRateSchedule", flush=True)
                    continue
                if a.stop_at:
                    now = time.gmtime()
                    hh, mm = map(int, a.stop_at.split(":"))
                    if now.tm_hour * 60 + now.tm_min + last_wall / 60 > hh * 60 + mm:
                        print(f"skip {model_name} {setting} {method} seed {seed}: would end after {a.stop_at} "
                              f"UTC (last run took {last_wall:.0f}s)", flush=True)
                        continue
                claim = run_path(model_name, setting, method, seed, tag).with_suffix(".claim")
                try:   # another process of the same plan (e.g. "lite-b" beside "lite") may be running it
                    RUNS.mkdir(parents=True, exist_ok=True)
                    os.close(os.open(claim, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    continue
                t = time.time()
                try:
                    res = run_one(model_name, setting, method, seed, cfg, tag)
                except Exception as e:  # noqa: BLE001 - one failed run must not stop the plan
                    print(f"FAILED {model_name} {setting} {method} seed {seed}: {type(e).__name__}: {e}", flush=True)
                    continue
                finally:
                    claim.unlink()
                last_wall = time.time() - t
                print(f"{time.strftime('%H:%M:%S', time.gmtime())} {model_name} {setting} {method} seed {seed}: "
                      f"fp {res['fp_acc']:.2f} pre-BN {res['acc_pre_bn']:.2f} post-BN {res['acc_post_bn']:.2f} "
                      f"osc {res['osc_pct']:.3f}% frozen {res['frozen_pct']:.2f}% "
                      + (f"ema {res['ema_post_bn']:.2f} ema+qc {res['ema_qc']:.2f} " if "ema_qc" in res else "")
                      + f"({time.time() - t:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
