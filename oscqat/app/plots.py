"""Plots of `oscqat train` (matplotlib, Agg backend): the paper's Fig. 2 (integer values of the most oscillating
weights of a depthwise layer over the last iterations), Fig. 3 (latent-weight distance to the nearest grid point)
and the fraction of oscillating/frozen weights over training."""
from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from torch import nn

import oscqat

quant_layers = oscqat.quant_layers
is_depthwise = oscqat.is_depthwise


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


OSC_THRESHOLD = 0.005      # what oscqat.oscillation_report calls oscillating (f > this); write_all passes the model's
F_DEFINED = "f: the tracker's oscillation frequency, an EMA of the weight's integer reversing direction per step"


def _wrap(*paragraphs: str, width: int = 105) -> str:
    """Title text: each paragraph wrapped to `width` characters (fontsize 8 on a 7-8 inch figure)."""
    return "\n".join(textwrap.fill(p, width) for p in paragraphs)


def _save(fig, path) -> bool:
    if fig is None:
        return False
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return True


def plot_integer_traces(record: dict, freq: torch.Tensor | None, path, top: int = 6,
                        threshold: float = OSC_THRESHOLD) -> bool:
    return _save(integer_traces_figure(record, freq, top, threshold), path)


def integer_traces_figure(record: dict, freq: torch.Tensor | None, top: int = 6, threshold: float = OSC_THRESHOLD):
    """Fig. 2: the integer values of the `top` weights of `record['layer']` that changed direction most often in
    the recorded window (ties broken by the tracker's frequency), one panel each, no offsets. The title says how
    many of the layer's weights oscillate (f > `threshold`), and that none does when none does."""
    if not record.get("ints"):
        return None
    plt = _plt()
    ints = torch.stack([t.to(torch.int16) for t in record["ints"]])          # (K, numel)
    rev = reversal_counts(ints)
    score = rev.double() + (freq.flatten().double().cpu() if freq is not None else 0.0) * 1e-3
    idx = torch.argsort(score, descending=True)[:min(top, ints.shape[1])].tolist()
    steps = record["steps"]
    fig, axes = plt.subplots(len(idx), 1, figsize=(8, 1.6 + 1.15 * len(idx)), sharex=True, squeeze=False)
    for ax, i in zip(axes[:, 0], idx):
        v = ints[:, i]
        ax.plot(steps, v.tolist(), drawstyle="steps-post", lw=1.0, color="C0")
        lo, hi = int(v.min()), int(v.max())
        if hi - lo <= 6:
            ax.set_yticks(range(lo, hi + 1))
        ax.set_ylim(lo - 0.5, hi + 0.5)
        ax.set_ylabel("integer", fontsize=8)
        ax.tick_params(labelsize=8)
        f = f", f = {float(freq.flatten()[i]):.3f}" if freq is not None else ""
        ax.set_title(f"weight {i}: {int(rev[i])} reversal{'s' if int(rev[i]) != 1 else ''} in the window{f}",
                     fontsize=8, loc="left", pad=2)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("QAT step")
    kinds = "depthwise layers" if record.get("depthwise", True) else "layers (no tracked layer is depthwise)"
    name = record["layer"]
    if freq is not None:
        n_osc, numel = int((freq > threshold).sum()), freq.numel()
        mf = f"mean f {float(freq.double().mean()):.2g}"
        head = (f"no weight of {name} oscillates (none has f > {threshold:g}): it has the highest mean f of the "
                f"{kinds} ({mf}), shown anyway" if n_osc == 0 else
                f"{name}, of the {kinds} the one that oscillates most: {n_osc} of its {numel} weights "
                f"({100 * n_osc / numel:.2g}%) have f > {threshold:g} ({mf})")
    else:
        head = f"{name} (of the {kinds})"
    fig.suptitle(_wrap(head, f"its integers over the last {len(steps)} QAT steps, the {len(idx)} weights that "
                             f"reversed direction most often: an oscillating weight flips between two neighbouring "
                             f"integers", F_DEFINED, width=120), fontsize=8)
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
    return _save(grid_distance_figure(model), path)


def grid_distance_figure(model: nn.Module):
    """Fig. 3: where the latent weights sit between grid points, with what to read from it in the title."""
    d = grid_distances(model)
    if not any(len(v) for v in d.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, v in d.items():
        if len(v):
            ax.hist(v.numpy(), bins=50, range=(-0.5, 0.5), density=True, histtype="step", lw=1.5,
                    label=f"{k} layers ({len(v)} weights)")
    ax.axvline(-0.5, color="C3", ls=":", lw=0.9)
    ax.axvline(0.5, color="C3", ls=":", lw=0.9, label="rounding thresholds")
    ax.set_xlabel("w/s - round(w/s): latent weight w to its nearest grid point, in steps s (s: the layer's scale)")
    ax.set_ylabel("density")
    ax.set_title(_wrap("where the latent weights sit between grid points (low-bit layers; frozen and clipped "
                       "weights left out)", "peaks at +-0.5: weights on a rounding threshold, where they oscillate; "
                       "a peak at 0: weights at grid points (dampening pulls them there); flat: neither"),
                 fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_oscillation_history(history: dict, path, threshold: float = OSC_THRESHOLD) -> bool:
    return _save(oscillation_history_figure(history, threshold), path)


def oscillation_history_figure(history: dict, threshold: float = OSC_THRESHOLD):
    """The share of oscillating and of frozen weights over QAT, with what to read from it in the title."""
    if not history.get("step"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step"], history["osc_pct"], label=f"% oscillating (f > {threshold:g})")
    ax.plot(history["step"], history["frozen_pct"], label="% frozen (held at their integer by freezing)")
    ax.set_xlabel("QAT step")
    ax.set_ylabel("% of the low-bit layers' weights")
    ax.set_title(_wrap("oscillating and frozen weights during QAT: freezing and dampening (from the end of the "
                       "warm-up) should bring the oscillating share down", F_DEFINED), fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


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
    threshold = oscqat.oscillation_report(model)["threshold"]
    for name, fn in (("integer_traces", lambda p: plot_integer_traces(record, freq, p, threshold=threshold)),
                     ("grid_distance", lambda p: plot_grid_distance(model, p)),
                     ("oscillation_history", lambda p: plot_oscillation_history(history, p, threshold))):
        p = out / f"{name}.png"
        if fn(p):
            written[name] = str(p)
    return written
