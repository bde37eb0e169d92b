"""Plots of `oscqat train` (matplotlib, Agg backend): the paper's Fig. 2 (integer values of the most oscillating
weights of a depthwise layer over the last iterations), Fig. 3 (latent-weight distance to the nearest grid point)
and the fraction of oscillating/frozen weights over training."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .train import is_depthwise, quant_layers


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def reversal_counts(ints: torch.Tensor) -> torch.Tensor:
    """Per column of `ints` (steps x weights): direction reversals, i.e. changes opposite to the previous
    non-zero change."""
    sgn = torch.sign(torch.diff(ints.to(torch.int16), dim=0))
    last = torch.zeros(ints.shape[1], dtype=sgn.dtype)
    rev = torch.zeros(ints.shape[1], dtype=torch.int32)
    for row in sgn:
        nz = row != 0
        rev += (nz & (row == -last)).int()
        last = torch.where(nz, row, last)
    return rev


def plot_integer_traces(record: dict, freq: torch.Tensor | None, path, top: int = 6) -> bool:
    fig = integer_traces_figure(record, freq, top)
    if fig is None:
        return False
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return True


def integer_traces_figure(record: dict, freq: torch.Tensor | None, top: int = 6):
    """Fig. 2: the integer values of the `top` weights of `record['layer']` that changed direction most often in
    the recorded window (ties broken by the tracker's frequency), one panel each, no offsets."""
    if not record.get("ints"):
        return None
    plt = _plt()
    ints = torch.stack([t.to(torch.int16) for t in record["ints"]])          # (K, numel)
    rev = reversal_counts(ints)
    score = rev.double() + (freq.flatten().double().cpu() if freq is not None else 0.0) * 1e-3
    idx = torch.argsort(score, descending=True)[:min(top, ints.shape[1])].tolist()
    steps = record["steps"]
    fig, axes = plt.subplots(len(idx), 1, figsize=(8, 1.1 + 1.15 * len(idx)), sharex=True, squeeze=False)
    for ax, i in zip(axes[:, 0], idx):
        v = ints[:, i]
        ax.plot(steps, v.tolist(), drawstyle="steps-post", lw=1.0, color="C0")
        lo, hi = int(v.min()), int(v.max())
        if hi - lo <= 6:
            ax.set_yticks(range(lo, hi + 1))
        ax.set_ylim(lo - 0.5, hi + 0.5)
        ax.set_ylabel("integer", fontsize=8)
        ax.tick_params(labelsize=8)
        f = f", f={float(freq.flatten()[i]):.3f}" if freq is not None else ""
        ax.set_title(f"w[{i}]: {int(rev[i])} reversals{f}", fontsize=8, loc="left", pad=2)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("QAT step")
    kind = "depthwise layer" if record.get("depthwise", True) else "layer (no tracked depthwise layer)"
    mf = f" (mean freq {record['mean_freq']:.4f} at step {record['start']})" if record.get("mean_freq") is not None \
        else ""
    fig.suptitle(f"most oscillating {kind}: {record['layer']}{mf}\n"
                 f"integer values of its {len(idx)} most-reversing weights over the last {len(steps)} steps",
                 fontsize=9)
    fig.tight_layout()
    return fig


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
        out["depthwise" if is_depthwise(layer) else "other"].append(dist.flatten().cpu())
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


def traces_of_most_oscillating(model: nn.Module, record: dict) -> tuple[dict, torch.Tensor | None]:
    """From `oscqat train`'s record of integers (per recorded layer), the record of the layer whose weights
    oscillate most at the end of training (highest mean frequency; depthwise layers first), and its frequencies."""
    if record.get("layers") is None:            # a single-layer record (checkpoints of before)
        return record, model.get_submodule(record["layer"]).weight_quant.freq if record.get("layer") else None
    if not record["layers"] or not record["steps"]:
        return {}, None
    freqs = {n: model.get_submodule(n).weight_quant.freq for n in record["layers"]}
    name = max(record["layers"], key=lambda n: float(freqs[n].double().mean()))
    layer = model.get_submodule(name)
    return {"layer": name, "ints": record["ints"][name], "steps": record["steps"], "depthwise": is_depthwise(layer),
            "mean_freq": float(freqs[name].double().mean()), "start": record["steps"][-1]}, freqs[name]


def write_all(model: nn.Module, history: dict, record: dict, out) -> dict:
    out = Path(out)
    written = {}
    record, freq = traces_of_most_oscillating(model, record)
    for name, fn in (("integer_traces", lambda p: plot_integer_traces(record, freq, p)),
                     ("grid_distance", lambda p: plot_grid_distance(model, p)),
                     ("oscillation_history", lambda p: plot_oscillation_history(history, p))):
        p = out / f"{name}.png"
        if fn(p):
            written[name] = str(p)
    return written
