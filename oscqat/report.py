"""Oscillation report: per layer and in total, % oscillating (freq > threshold), % frozen, mean frequency."""
from __future__ import annotations

import torch
from torch import nn

from .prepare import quant_layers

OSC_THRESHOLD = 0.005


@torch.no_grad()
def oscillation_report(model: nn.Module, threshold: float = OSC_THRESHOLD) -> dict:
    layers, tot = [], {"numel": 0, "oscillating": 0, "frozen": 0, "freq_sum": 0.0}
    for name, layer in quant_layers(model):
        q = layer.weight_quant
        if q.freq is None:
            continue
        numel = q.freq.numel()
        osc = int((q.freq > threshold).sum())
        frozen = int(q.frozen().sum())
        fsum = float(q.freq.double().sum())
        layers.append({"layer": name, "bits": q.bits, "numel": numel,
                       "depthwise": getattr(layer, "groups", 1) > 1 and layer.groups == layer.in_channels,
                       "osc_pct": 100.0 * osc / numel, "frozen_pct": 100.0 * frozen / numel,
                       "mean_freq": fsum / numel})
        for k, v in (("numel", numel), ("oscillating", osc), ("frozen", frozen), ("freq_sum", fsum)):
            tot[k] += v
    n = max(1, tot["numel"])
    total = {"numel": tot["numel"], "osc_pct": 100.0 * tot["oscillating"] / n,
             "frozen_pct": 100.0 * tot["frozen"] / n, "mean_freq": tot["freq_sum"] / n}
    return {"threshold": threshold, "layers": layers, "total": total}


def format_report(report: dict) -> str:
    rows = [f"{'layer':40s} {'bits':>4s} {'numel':>9s} {'osc%':>7s} {'frozen%':>8s} {'mean f':>9s}"]
    for r in report["layers"] + [dict(report["total"], layer="TOTAL", bits="")]:
        rows.append(f"{r['layer']:40s} {str(r['bits']):>4s} {r['numel']:9d} {r['osc_pct']:7.3f} "
                    f"{r['frozen_pct']:8.3f} {r['mean_freq']:9.5f}")
    return "\n".join(rows)
