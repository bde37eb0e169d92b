"""Quick CPU check: one QAT step over MobileNetV2's weights (tracked forward with freezing and dampening, then
the backward with dampening), `cpp` backend against the `torch` reference. Run: python csrc/bench_cpu.py"""
from __future__ import annotations

import argparse
import math
import time

import torch

from oscqat.ops import cpp as cpp_backend, reference
from oscqat.app.models import mobilenet_v2


def weight_set(per_channel: bool, bits: int = 4):
    model = mobilenet_v2()
    n, p = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    gen = torch.Generator().manual_seed(0)
    layers = []
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            w = mod.weight.detach().contiguous()
            C = w.shape[0] if per_channel else 1
            s = w.reshape(C, -1).abs().amax(1).clamp_min(1e-8) / p
            numel = w.numel()
            state = dict(prev_int=torch.randint(n, p + 1, w.shape, generator=gen, dtype=torch.int8),
                         flags=torch.randint(-1, 2, w.shape, generator=gen, dtype=torch.int8),
                         freq=torch.rand(w.shape, generator=gen) * 0.03,
                         ema=torch.rand(w.shape, generator=gen) * (p - n) + n)
            layers.append(dict(w=w, scale=s.float(), g=torch.randn(w.shape, generator=gen), state=state,
                               div=float(numel // w.shape[0]), gs=1.0 / math.sqrt(numel // C * p)))
    return layers, n, p


def step(impl, layers, n, p, f_th, grad_d):
    for L in layers:
        st = L["state"]
        impl.weight_fwd_track(L["w"], L["scale"], st["prev_int"], st["flags"], st["freq"], st["ema"], f_th, n, p,
                              0.01, True, L["div"])
        impl.weight_bwd(L["g"], L["w"], L["scale"], st["flags"], st["ema"], grad_d, n, p, L["gs"], True,
                        L["div"], True)


def bench(impl, layers, n, p, reps):
    f_th, grad_d = torch.tensor(0.02), torch.tensor(0.5)
    step(impl, layers, n, p, f_th, grad_d)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(impl, layers, n, p, f_th, grad_d)
        times.append(time.perf_counter() - t0)
    return min(times), sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    print(f"threads: {torch.get_num_threads()}")
    for per_channel in (False, True):
        layers, n, p = weight_set(per_channel)
        numel = sum(L["w"].numel() for L in layers)
        res = {}
        for name, impl in (("torch", reference), ("cpp", cpp_backend)):
            # fresh copies of the state for each backend
            ls = [dict(L, state={k: v.clone() for k, v in L["state"].items()}) for L in layers]
            res[name] = bench(impl, ls, n, p, args.reps)
        print(f"MobileNetV2 {len(layers)} layers, {numel / 1e6:.2f} M weights, per_channel={per_channel}: "
              f"torch {res['torch'][0] * 1e3:.1f} ms (median {res['torch'][1] * 1e3:.1f}), "
              f"cpp {res['cpp'][0] * 1e3:.1f} ms (median {res['cpp'][1] * 1e3:.1f}), "
              f"speed-up {res['torch'][0] / res['cpp'][0]:.1f}x (min) {res['torch'][1] / res['cpp'][1]:.1f}x (median)")


if __name__ == "__main__":
    main()
