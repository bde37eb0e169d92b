"""Asymmetric activation grids (unsigned + learned LSQ+ offset, chosen at calibration after SiLU/Hardswish/GELU
or a small negative tail) against the signed grids oscqat used before (QATConfig.asym_act_tail=0), on
torchvision's MobileNetV3-Small (Hardswish) and Fashion-MNIST, W4A4.

Protocol: one full-precision model trained from random initialisation (`--fp-steps`), then for each seed and each
grid choice the same QAT run from it (`--qat-steps`, SGD cosine, method 'lsq' so that only the grids differ),
BatchNorm re-estimated, test accuracy on the test split. Both choices see the same batches in the same order.

    python bench/asym_acts.py --json bench/results/asym_acts/results.json   (CPU, 1 thread)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import oscqat
from oscqat.app.data import Batches, describe, load_dataset


def build(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    m.features[0][0] = nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False)   # 28x28 grey images
    return m


def run(model, batches, steps: int, lr: float, step_fn=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    model.train()
    done = 0
    while done < steps:
        batches.set_epoch(done // len(batches))
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
            opt.step(); opt.zero_grad(); sched.step()
            done += 1
            if done == steps:
                break


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return float(sum((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum() for i in range(0, len(y), 500))) / len(y)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--subset", type=int, default=10000)
    p.add_argument("--test-subset", type=int, default=0, help="0: the whole test split")
    p.add_argument("--fp-steps", type=int, default=300)
    p.add_argument("--qat-steps", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset("fashion-mnist", subset=a.subset, test_subset=a.test_subset)
    out = {"dataset": describe(ds.info), "args": vars(a), "runs": []}
    t0 = time.time()
    fp = build(0)
    run(fp, Batches(ds.train_x, ds.train_y, 64, shuffle=True, seed=0), a.fp_steps, 0.05)
    out["fp_accuracy_running_bn"] = accuracy(fp, ds.test_x, ds.test_y)
    oscqat.reestimate_bn(fp, Batches(ds.train_x, ds.train_y, 64, shuffle=True, seed=7), num_batches=20)
    out["fp_accuracy"] = accuracy(fp, ds.test_x, ds.test_y)
    print(f"FP {out['fp_accuracy']:.4f}, {out['fp_accuracy_running_bn']:.4f} before BN re-estimation "
          f"({time.time() - t0:.0f} s)", flush=True)
    for seed in a.seeds:
        for tail in (0.0, 0.1):
            model = copy.deepcopy(fp)
            calib = [ds.train_x[i * 64:(i + 1) * 64] for i in range(8)]
            cfg = oscqat.QATConfig(a.bits, a.bits, "lsq", asym_act_tail=tail)
            oscqat.prepare(model, cfg, calib_data=calib, verbose=False)
            n_asym = len(model.oscqat_summary.asymmetric)
            before = accuracy(model, ds.test_x, ds.test_y)
            torch.manual_seed(seed)
            train = Batches(ds.train_x, ds.train_y, 64, shuffle=True, seed=100 + seed)
            run(model, train, a.qat_steps, 0.01)
            oscqat.reestimate_bn(model, Batches(ds.train_x, ds.train_y, 64, shuffle=True, seed=7), num_batches=20)
            acc = accuracy(model, ds.test_x, ds.test_y)
            row = {"seed": seed, "grids": "asymmetric" if tail else "signed", "asymmetric_quantizers": n_asym,
                   "accuracy_after_calibration": before, "accuracy": acc}
            out["runs"].append(row)
            print(row, f"({time.time() - t0:.0f} s)", flush=True)
            if a.json:                     # after every run: a partial grid is kept
                with open(a.json, "w") as f:
                    json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
