"""Bytes per element of each Triton kernel, derived from its compiled PTX (sm_90, no GPU needed), against the
documented bytes model (kernels/triton/backend.py); then a GPU roofline ESTIMATE of the MobileNetV2 weight-set step and
of a W4A4 training step's quantization work, with the kernel launches per step counted from the launch code.

    python bench/gpu_bytes.py [--markdown bench/results/gpu/bytes.md]   (runs with TRITON_INTERPRET unset)

Per element = sum over the tensors indexed per element of the bytes their global loads/stores move per thread,
divided by the elements per thread (the widest tile, 8). Static counts: a load predicated per weight (ema where
frozen) counts in full, i.e. the model at f = 1. The estimate is bytes / 3.35 TB/s (H100 SXM) + launches x 4 us;
nothing here ran on a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from oscqat.kernels.triton import aot  # noqa: E402

HBM = 3.35e12
LAUNCH_US = 4.0
# (kernel, flags that must be set, flags that must not) -> documented bytes per element at f = 1, E = elem size
MODEL = {
    "weight_fwd, no state": ("_weight_fwd_kernel", set(), {"HAS_STATE"}, lambda e: 2 * e),
    "weight_fwd, state": ("_weight_fwd_kernel", {"HAS_STATE"}, {"TRACK"}, lambda e: 2 * e + 1 + 4),
    "weight_fwd_track": ("_weight_fwd_kernel", {"TRACK"}, set(), lambda e: 2 * e + 20),
    "weight_bwd, no state": ("_weight_bwd_kernel", set(), {"HAS_STATE"}, lambda e: 3 * e),
    "weight_bwd, state": ("_weight_bwd_kernel", {"HAS_STATE"}, set(), lambda e: 3 * e + 1 + 4),
    "act_fwd": ("_act_fwd_kernel", set(), set(), lambda e: 2 * e),
    "act_bwd": ("_act_bwd_kernel", set(), set(), lambda e: 3 * e),
}


def derived_bytes():
    log = aot.launches(shapes=[(1, 4096)], ns=[1 << 20], dtypes=(torch.float32, torch.bfloat16))
    cfgs = [c for c in aot.configs(log) if aot.elems_per_program(c) == 2048]
    rows = []
    for name, (kern, need, avoid, model) in MODEL.items():
        for dt in ("fp32", "bf16"):
            cands = [c for c in cfgs if c.kernel == kern and dt in c.describe().split()[1]]
            for c in cands:
                flags = {k for k, v in c.constants().items() if v is True}
                if need <= flags and not (avoid & flags) and "DAMP" in flags | ({"DAMP"} if "act" in kern else set()):
                    break
            else:
                continue
            r = aot.compile_config(c, 90)
            per_thread = aot.elems_per_program(c) // aot.threads(c)
            per_arg = {}
            for op, nbytes, _, arg in r.accesses:
                if arg in c.per_element:
                    per_arg.setdefault(arg, [0, 0])[op == "st"] += nbytes
            total = sum(a + b for a, b in per_arg.values()) / per_thread
            e = 4 if dt == "fp32" else 2
            rows.append((name, dt, total, model(e), r.regs, {k[:-4]: (a / per_thread, b / per_thread)
                                                             for k, (a, b) in per_arg.items()}))
    return rows


def _count(fn):
    log = []
    with aot._recording(log):
        fn()
    return len(log)


def weightset_estimate():
    """Every Conv2d/Linear weight of torchvision mobilenet_v2 (bench/workloads.py's weight set), per-tensor W4,
    tracked forward + freezing + dampening, backward with state: bytes and launches."""
    import torchvision
    m = torchvision.models.mobilenet_v2()
    ws = [mod.weight for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    K = aot.K
    n = sum(w.numel() for w in ws)
    launches = 0
    for w in ws:
        wm = torch.empty(w.shape, device="meta")
        s = torch.empty(1, device="meta")
        st = [torch.empty(w.shape, dtype=d, device="meta") for d in (torch.int8, torch.int8, torch.float32,
                                                                      torch.float32)]
        f_th, gd = torch.empty((), device="meta"), torch.empty((), device="meta")
        launches += _count(lambda: K.weight_fwd_track(wm, s, *st, f_th, -8, 7, 0.01, True, 3.0))
        launches += _count(lambda: K.weight_bwd(wm, wm, s, st[1], st[3], gd, -8, 7, 0.1, True, 3.0, True))
    return len(ws), n, n * (28 + 17), launches


def act_estimate(batch=32, res=224):
    """Input of every Conv2d/Linear of torchvision mobilenet_v2 (batch 32, 224x224, on meta tensors), fp32, A4:
    act_fwd + act_bwd per layer, and the weight quantizers of the same step (tracked, dampened)."""
    import torchvision
    m = torchvision.models.mobilenet_v2().to("meta")
    sizes = []
    hooks = [mod.register_forward_pre_hook(lambda mod, a: sizes.append(a[0].numel()))
             for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    m(torch.empty(batch, 3, res, res, device="meta"))
    for h in hooks:
        h.remove()
    K = aot.K
    launches = 0
    for N in sizes:
        x = torch.empty(N, device="meta")
        s = torch.empty(1, device="meta")
        launches += _count(lambda: K.act_fwd(x, s, None, 0, 15))
        launches += _count(lambda: K.act_bwd(x, x, s, None, 0, 15, 0.1))
    return len(sizes), sum(sizes), sum(sizes) * (8 + 12), launches


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--markdown")
    a = ap.parse_args(argv)
    out = ["# GPU bytes per element (from PTX) and a roofline ESTIMATE", "",
           f"{datetime.date.today()}, {platform.node() or 'host'} ({platform.machine()}, {os.cpu_count()} CPUs, "
           f"no GPU), torch {torch.__version__}, triton {aot.triton.__version__}; "
           f"command: `python bench/gpu_bytes.py --markdown {a.markdown or '-'}`", "",
           "## Bytes per element: compiled PTX (sm_90, 2048-element tile, 8 per thread) vs the documented model",
           "", "| kernel | dtype | PTX B/elem | model B/elem (f = 1) | match | regs | per tensor: ld / st B/elem |",
           "|---|---|---|---|---|---|---|"]
    mismatches = 0
    for name, dt, got, want, regs, per in derived_bytes():
        ok = abs(got - want) < 1e-9
        mismatches += not ok
        detail = ", ".join(f"{k} {ld:g}/{st:g}" for k, (ld, st) in per.items())
        out.append(f"| {name} | {dt} | {got:g} | {want:g} | {'yes' if ok else '**NO**'} | {regs} | {detail} |")
    nw, n, wbytes, wl = weightset_estimate()
    na, nact, abytes, al = act_estimate()
    wt = wbytes / HBM * 1e6
    at = abytes / HBM * 1e6
    wlay = aot.K
    out += ["", f"Mismatches: {mismatches}.", "",
            "## Roofline ESTIMATE (not a measurement: no GPU ran anything)", "",
            f"H100 SXM HBM {HBM / 1e12:.2f} TB/s, {LAUNCH_US:g} us per kernel launch, launches back to back.", "",
            "| work per QAT step | tensors | elements | bytes (model) | launches | bandwidth time | "
            "launch time | estimate |", "|---|---|---|---|---|---|---|---|",
            f"| MobileNetV2 weight set: tracked fwd + freeze + D, bwd (28 + 17 B/weight fp32) | {nw} | {n:,} | "
            f"{wbytes / 1e6:.1f} MB | {wl} | {wt:.1f} us | {wl * LAUNCH_US:.0f} us | "
            f"{wt + wl * LAUNCH_US:.0f} us |",
            f"| W4A4 step, activation quantizers, torchvision mobilenet_v2 batch 32 @ 224 (8 + 12 B/elem fp32) | "
            f"{na} | {nact:,} | {abytes / 1e6:.1f} MB | {al} | {at:.0f} us | {al * LAUNCH_US:.0f} us | "
            f"{at + al * LAUNCH_US:.0f} us |",
            f"| the W4A4 step's quantization work (both rows) | | | {(wbytes + abytes) / 1e6:.1f} MB | {wl + al} | "
            f"{wt + at:.0f} us | {(wl + al) * LAUNCH_US:.0f} us | {wt + at + (wl + al) * LAUNCH_US:.0f} us |",
            "", f"Launches counted by recording the backend's launch code (tile {wlay.TILE}; a grid of more than "
            "one program adds a finalize launch per reduction). The weight set is launch-bound on a GPU: "
            "one multi-tensor launch per step would cut its estimate to about the bandwidth time."]
    text = "\n".join(out) + "\n"
    print(text)
    if a.markdown:
        os.makedirs(os.path.dirname(a.markdown), exist_ok=True)
        with open(a.markdown, "w") as f:
            f.write(text)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
