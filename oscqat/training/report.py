"""Oscillation report: per layer and in total, % oscillating (freq > threshold), % frozen, mean frequency.

A frozen weight's frequency decays only by (1 - m) per step, so for about 1/m steps after freezing it still
counts as oscillating; `osc_unfrozen_pct` counts only the weights that can still move."""
from __future__ import annotations

import torch
from torch import nn

from ..nn.layers import is_depthwise, quant_layers, quantizers
from ..nn.wrappers import prepared
from ..ops.library import at_floor

OSC_THRESHOLD = 0.005


@torch.no_grad()
def oscillation_report(model: nn.Module, threshold: float = OSC_THRESHOLD) -> dict:
    """`model`: prepared, or its DDP / FSDP / torch.compile wrapper (the state is per rank and identical on every
    rank; under FSDP2 each rank holds the whole state, docs/semantics.md "Distributed")."""
    model = prepared(model, "oscillation_report")
    layers, tot = [], {"numel": 0, "oscillating": 0, "osc_unfrozen": 0, "frozen": 0, "freq_sum": 0.0}
    for name, layer in quant_layers(model):
        q = layer.weight_quant
        if q.freq is None:
            continue
        numel = q.freq.numel()
        oscillating = q.freq > threshold
        frozen_mask = q.frozen()
        osc = int(oscillating.sum())
        osc_unfrozen = int((oscillating & ~frozen_mask).sum())
        frozen = int(frozen_mask.sum())
        fsum = float(q.freq.double().sum())
        layers.append({"layer": name, "bits": q.bits, "numel": numel,
                       "depthwise": is_depthwise(layer),
                       "osc_pct": 100.0 * osc / numel, "osc_unfrozen_pct": 100.0 * osc_unfrozen / numel,
                       "frozen_pct": 100.0 * frozen / numel,
                       "mean_freq": fsum / numel})
        for k, v in (("numel", numel), ("oscillating", osc), ("osc_unfrozen", osc_unfrozen), ("frozen", frozen),
                     ("freq_sum", fsum)):
            tot[k] += v
    n = max(1, tot["numel"])
    total = {"numel": tot["numel"], "osc_pct": 100.0 * tot["oscillating"] / n,
             "osc_unfrozen_pct": 100.0 * tot["osc_unfrozen"] / n,
             "frozen_pct": 100.0 * tot["frozen"] / n, "mean_freq": tot["freq_sum"] / n}
    floor = [(q, int(at_floor(q.scale, q.scale_min).sum())) for q in quantizers(model)]
    floor = [{"quantizer": q.layer_name, "at_floor": k, "scales": q.scale.numel(), "scale_min": q.scale_min}
             for q, k in floor if k]
    total["scales_at_floor"] = sum(r["at_floor"] for r in floor)
    return {"threshold": threshold, "layers": layers, "total": total, "scales_at_floor": floor}


def format_report(report: dict) -> str:
    rows = [f"{'layer':40s} {'bits':>4s} {'numel':>9s} {'osc%':>7s} {'osc,unfrozen%':>13s} {'frozen%':>8s} "
            f"{'mean f':>9s}"]
    for r in report["layers"] + [dict(report["total"], layer="TOTAL", bits="")]:
        rows.append(f"{r['layer']:40s} {str(r['bits']):>4s} {r['numel']:9d} {r['osc_pct']:7.3f} "
                    f"{r['osc_unfrozen_pct']:13.3f} {r['frozen_pct']:8.3f} {r['mean_freq']:9.5f}")
    floor = report.get("scales_at_floor", [])
    rows.append(f"scales at their floor: {sum(r['at_floor'] for r in floor)}"
                + "".join(f"\n  {r['quantizer']}: {r['at_floor']} of {r['scales']} at {r['scale_min']:g}"
                          for r in floor))
    return "\n".join(rows)
