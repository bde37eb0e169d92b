"""Plots of `oscqat train` (matplotlib, Agg backend): the paper's Fig. 2 (integer values of the most oscillating
weights of a depthwise layer over the last iterations), Fig. 3 (latent-weight distance to the nearest grid point)
and the fraction of oscillating/frozen weights over training."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..prepare import quant_layers


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_integer_traces(record: dict, freq: torch.Tensor | None, path, top: int = 6) -> bool:
    """Fig. 2: integers of the `top` weights of `record['layer']` that changed direction most often in the window
    (ties broken by the tracker's frequency)."""
    if not record.get("ints"):
        return False
    plt = _plt()
    ints = torch.stack([t.to(torch.int16) for t in record["ints"]])          # (K, numel)
    d = torch.diff(ints, dim=0)
    sgn = torch.sign(d)
    # reversals: a change opposite to the previous non-zero change
    last = torch.zeros(ints.shape[1], dtype=sgn.dtype)
    rev = torch.zeros(ints.shape[1], dtype=torch.int32)
    for row in sgn:
        nz = row != 0
        rev += (nz & (row == -last)).int()
        last = torch.where(nz, row, last)
    score = rev.double() + (freq.flatten().double().cpu() if freq is not None else 0.0) * 1e-3
    idx = torch.argsort(score, descending=True)[:top]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    steps = record["steps"]
    for j, i in enumerate(idx.tolist()):
        ax.plot(steps, (ints[:, i] + 0.06 * (j - top / 2)).tolist(), drawstyle="steps-post", lw=1.2,
                label=f"w[{i}] ({int(rev[i])} rev.)")
    ax.set_xlabel("training step")
    ax.set_ylabel("integer value")
    ax.set_title(f"{record['layer']}: most oscillating weights, last {len(steps)} steps")
    ax.legend(fontsize=7, ncol=3, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


@torch.no_grad()
def grid_distances(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per group ('depthwise', 'other'): w/s - round(w/s) of in-range latent weights of tracked (<= 4-bit)
    layers, in units of the scale, in [-0.5, 0.5]."""
    out: dict[str, list] = {"depthwise": [], "other": []}
    for _, layer in quant_layers(model):
        q = layer.weight_quant
        if q.freq is None:
            continue
        s = q.scale.detach().float().reshape(-1, *([1] * (layer.weight.dim() - 1)))
        x = layer.weight.detach().float() / s
        ok = (x >= q.qmin - 0.5) & (x <= q.qmax + 0.5)
        frozen = q.frozen()
        dist = (x - torch.round(x))[ok & ~frozen]
        dw = getattr(layer, "groups", 1) > 1 and layer.groups == layer.in_channels
        out["depthwise" if dw else "other"].append(dist.flatten().cpu())
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}


def plot_grid_distance(model: nn.Module, path) -> bool:
    d = grid_distances(model)
    if not any(len(v) for v in d.values()):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, v in d.items():
        if len(v):
            ax.hist(v.numpy(), bins=50, range=(-0.5, 0.5), density=True, histtype="step", lw=1.5,
                    label=f"{k} ({len(v)} weights)")
    ax.set_xlabel("distance of latent weight to nearest grid point (units of s)")
    ax.set_ylabel("density")
    ax.set_title("latent weights vs quantization grid (not frozen, in range)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_oscillation_history(history: dict, path) -> bool:
    if not history.get("step"):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history["step"], history["osc_pct"], label="% oscillating (f > 0.005)")
    ax.plot(history["step"], history["frozen_pct"], label="% frozen")
    ax.set_xlabel("QAT step")
    ax.set_ylabel("% of tracked weights")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_all(model: nn.Module, history: dict, record: dict, out) -> dict:
    out = Path(out)
    written = {}
    freq = None
    if record.get("layer"):
        freq = model.get_submodule(record["layer"]).weight_quant.freq
    for name, fn in (("integer_traces", lambda p: plot_integer_traces(record, freq, p)),
                     ("grid_distance", lambda p: plot_grid_distance(model, p)),
                     ("oscillation_history", lambda p: plot_oscillation_history(history, p))):
        p = out / f"{name}.png"
        if fn(p):
            written[name] = str(p)
    return written
