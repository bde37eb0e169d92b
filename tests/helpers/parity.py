"""Shared parity harness: any backend against the reference (`torch`) backend, on generated cases.

Tolerances (why they are what they are):
- w_hat, activation outputs, dL/dx, integer states, masks, counts: identical bits. They are elementwise and
  docs/semantics.md fixes every rounding.
- dL/dw: identical bits (elementwise, order fixed by the semantics).
- dL/ds, dL/do and the dampening term D are reductions; a backend may sum in another order. fp32 summation in
  blocks of at most ~128 sequential adds, or any tree, errs by at most ~128 * 2^-24 * sum|terms| ~ 8e-6 of the
  sum of absolute terms, so we allow 2e-5 * sum|terms| (+1e-30).
"""
from __future__ import annotations

import math
import os

import torch

from hypothesis import strategies as st

from oscqat.ops import reference as ref

DEVICE = os.environ.get("OSCQAT_TEST_DEVICE", "cpu")
SUM_RTOL = 2e-5
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def bounds(bits: int, signed: bool = True):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def make_weight_case(seed: int, shape, channels: int, bits: int, dtype, special: str = "normal",
                     frozen_frac: float = 0.3, f_th: float = 0.02, device: str = DEVICE):
    """A weight tensor, scale and a plausible mid-training state. `special`: normal | ties | far | tiny."""
    gen = torch.Generator().manual_seed(seed)
    n, p = bounds(bits)
    numel = math.prod(shape)
    scale = (torch.rand(channels, generator=gen) * 0.09 + 0.01)
    per_ch = numel // channels
    if special == "ties":   # exact .5 ties: w = (k + 0.5) * s with s a power of two
        scale = 2.0 ** -torch.randint(3, 8, (channels,), generator=gen).float()
        k = torch.randint(n - 2, p + 2, (numel,), generator=gen).float() + 0.5
        w = k.reshape(channels, per_ch) * scale[:, None]
    else:
        spread = {"normal": 1.2, "far": 40.0, "tiny": 1e-3}[special]
        w = torch.randn(channels, per_ch, generator=gen) * scale[:, None] * (p - n) / 2 * spread
    w = w.reshape(shape).to(dtype)
    prev_int = torch.randint(n, p + 1, shape, generator=gen).to(torch.int8)
    last_dir = torch.randint(-1, 2, shape, generator=gen)
    fz = (torch.rand(shape, generator=gen) < frozen_frac).long() * torch.randint(1, 3, shape, generator=gen)
    flags = (last_dir + 4 * fz).to(torch.int8)
    flags[torch.rand(shape, generator=gen) < 0.1] = ref.UNINIT
    freq = torch.rand(shape, generator=gen) * 0.05
    freq[torch.rand(shape, generator=gen) < 0.2] = 0.0
    ema = torch.rand(shape, generator=gen) * (p - n) + n
    ties = torch.rand(shape, generator=gen) < 0.1   # exact .5: round(ema) at freezing must go to even
    ema = torch.where(ties, torch.floor(ema) + 0.5, ema)
    frozen = fz >= 1
    ema = torch.where(frozen, torch.round(ema), ema)
    g = torch.randn(shape, generator=gen).to(dtype)
    to = dict(device=device)
    return dict(w=w.to(**to), scale=scale.to(**to), prev_int=prev_int.to(**to), flags=flags.to(**to),
                freq=freq.to(**to), ema=ema.to(**to), g=g.to(**to), n=n, p=p,
                f_th=torch.tensor(f_th, device=device), grad_d=torch.tensor(0.7, device=device),
                grad_scale=1.0 / math.sqrt(per_ch * p), damp_div=float(per_ch))


def _sum_tol(terms: torch.Tensor, dim=None) -> torch.Tensor:
    a = terms.abs().float()
    return (a.sum() if dim is None else a.sum(dim)) * SUM_RTOL + 1e-30


def assert_bits(a: torch.Tensor, b: torch.Tensor, what: str):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    if a.is_floating_point():
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    else:
        same = a == b
    bad = (~same).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} elements differ, first at {bad[0].tolist()}: {a[tuple(bad[0])]} vs {b[tuple(bad[0])]}"


def assert_sum_close(a, b, tol, what):
    diff = (a.float() - b.float()).abs()
    assert bool((diff <= tol).all()), f"{what}: max |diff| {diff.max().item():.3e} > tol {tol.min().item():.3e}"


def _clone_state(c):
    return {k: c[k].clone() for k in ("prev_int", "flags", "freq", "ema")}


def check_weight(impl, c, damp: bool, momentum: float = 0.01):
    """Untracked and tracked forward, then both backwards, of `impl` against the reference."""
    args = (c["w"], c["scale"])
    # untracked
    a = impl.weight_fwd(*args, c["flags"], c["ema"], c["n"], c["p"], damp, c["damp_div"])
    r = ref.weight_fwd(*args, c["flags"], c["ema"], c["n"], c["p"], damp, c["damp_div"])
    assert_bits(a[0], r[0], "w_hat (untracked)")
    d_tol = r[1].abs() * SUM_RTOL + 1e-30        # D's terms are non-negative: sum|terms| / div = D
    assert_sum_close(a[1], r[1], d_tol, "dampening term")
    a = impl.weight_fwd(*args, None, None, c["n"], c["p"], damp, c["damp_div"])
    r = ref.weight_fwd(*args, None, None, c["n"], c["p"], damp, c["damp_div"])
    assert_bits(a[0], r[0], "w_hat (stateless)")
    # tracked
    sa, sr = _clone_state(c), _clone_state(c)
    a = impl.weight_fwd_track(*args, sa["prev_int"], sa["flags"], sa["freq"], sa["ema"], c["f_th"], c["n"],
                              c["p"], momentum, damp, c["damp_div"])
    r = ref.weight_fwd_track(*args, sr["prev_int"], sr["flags"], sr["freq"], sr["ema"], c["f_th"], c["n"],
                             c["p"], momentum, damp, c["damp_div"])
    assert_bits(a[0], r[0], "w_hat (tracked)")
    assert_sum_close(a[1], r[1], r[1].abs() * SUM_RTOL + 1e-30, "dampening term (tracked)")
    assert_bits(a[2], r[2], "counts")
    for k in sa:
        assert_bits(sa[k], sr[k], f"state {k}")
    # backward, after the tracked forward (with its updated state) and after an untracked one
    for tracked, state in ((True, sr), (False, c)):
        for flags, ema in ((state["flags"], state["ema"]), (None, None)):
            bargs = (c["g"], c["w"], c["scale"], flags, ema, c["grad_d"], c["n"], c["p"], c["grad_scale"], damp,
                     c["damp_div"], tracked)
            ga, gsa = impl.weight_bwd(*bargs)
            gr, gsr = ref.weight_bwd(*bargs)
            assert_bits(ga, gr, f"dL/dw (tracked={tracked}, state={flags is not None})")
            terms = _scale_grad_terms(c, flags, ema, tracked)
            assert_sum_close(gsa, gsr, _sum_tol(terms, dim=1) * c["grad_scale"],
                             f"dL/ds (tracked={tracked}, state={flags is not None})")
    return sa


def _scale_grad_terms(c, flags, ema, tracked):
    wf, s, x, w_int, in_rng = ref._quantize(c["w"], c["scale"], c["n"], c["p"])
    mask, w_eff = in_rng, w_int
    if flags is not None:
        frozen, frozen_int = ref._frozen_view(flags, ema, c["scale"], untracked=not tracked)
        w_eff = torch.where(frozen, frozen_int, w_int)
        mask = in_rng & ~frozen
    g = ref._by_channel(c["g"], c["scale"]).float()
    return torch.cat([g * w_eff, g * x * mask], dim=1)


def make_act_case(seed: int, shape, bits: int, dtype, signed: bool, offset: bool, special="normal",
                  device: str = DEVICE):
    gen = torch.Generator().manual_seed(seed)
    n, p = bounds(bits, signed)
    scale = torch.rand(1, generator=gen) * 0.2 + 0.02
    if special == "ties":
        scale = torch.tensor([2.0 ** -3])
        x = (torch.randint(n - 3, p + 3, shape, generator=gen).float() + 0.5) * scale
    else:
        x = torch.randn(shape, generator=gen) * scale * p * {"normal": 0.7, "far": 30.0, "tiny": 1e-3}[special]
    off = (torch.randn(1, generator=gen) * scale * 2) if offset else None
    if off is not None and special == "ties":
        off = torch.tensor([0.25])
    g = torch.randn(shape, generator=gen).to(dtype)
    feats = max(1, math.prod(shape) // max(1, shape[0]))
    return dict(x=x.to(dtype).to(device), scale=scale.to(device), offset=None if off is None else off.to(device),
                g=g.to(device), n=n, p=p, grad_scale=1.0 / math.sqrt(feats * p))


def check_act(impl, c):
    y = impl.act_fwd(c["x"], c["scale"], c["offset"], c["n"], c["p"])
    assert_bits(y, ref.act_fwd(c["x"], c["scale"], c["offset"], c["n"], c["p"]), "activation output")
    bargs = (c["g"], c["x"], c["scale"], c["offset"], c["n"], c["p"], c["grad_scale"])
    gx, gs, go = impl.act_bwd(*bargs)
    rx, rs, ro = ref.act_bwd(*bargs)
    assert_bits(gx, rx, "dL/dx")
    _, _, xs, q, in_rng = ref._act_quantize(c["x"], c["scale"], c["offset"], c["n"], c["p"])
    gf = c["g"].float()
    terms = torch.cat([(gf * q).flatten(), (gf * xs * in_rng).flatten()])
    assert_sum_close(gs, rs, _sum_tol(terms) * c["grad_scale"], "activation dL/ds")
    assert_sum_close(go, ro, _sum_tol(gf) * c["grad_scale"], "activation dL/do")


def check_deterministic(impl, c, damp=True):
    """Two runs of every op give identical bits."""
    outs = []
    for _ in range(2):
        st = _clone_state(c)
        fw = impl.weight_fwd_track(c["w"], c["scale"], st["prev_int"], st["flags"], st["freq"], st["ema"],
                                   c["f_th"], c["n"], c["p"], 0.01, damp, c["damp_div"])
        bw = impl.weight_bwd(c["g"], c["w"], c["scale"], st["flags"], st["ema"], c["grad_d"], c["n"], c["p"],
                             c["grad_scale"], damp, c["damp_div"], True)
        outs.append(list(fw) + list(bw) + list(st.values()))
    for i, (a, b) in enumerate(zip(*outs)):
        assert_bits(a, b, f"run-to-run output {i}")


SHAPES = st.sampled_from([(1,), (7,), (3, 5), (8, 1, 3, 3), (16, 1, 3, 3), (5, 7, 1, 1), (33, 65), (4, 3, 3, 3),
                          (1, 1000), (129, 17), (2, 4099)])


@st.composite
def weight_cases(draw, device: str = DEVICE):
    """Parameters for make_weight_case: odd sizes, 1 element, 1 channel, ties, far values, all/none frozen."""
    shape = draw(SHAPES)
    channels = draw(st.sampled_from([1, shape[0]]))
    return dict(seed=draw(st.integers(0, 2 ** 31 - 1)), shape=shape, channels=channels,
                bits=draw(st.integers(2, 8)), dtype=draw(st.sampled_from(DTYPES)),
                special=draw(st.sampled_from(["normal", "normal", "ties", "far", "tiny"])),
                frozen_frac=draw(st.sampled_from([0.0, 0.3, 1.0])), f_th=draw(st.sampled_from([0.0, 0.02, 0.001])),
                device=device)


@st.composite
def act_cases(draw, device: str = DEVICE):
    shape = draw(st.sampled_from([(1,), (2, 7), (4, 3, 5, 5), (3, 1000), (2, 8, 17, 3)]))
    return dict(seed=draw(st.integers(0, 2 ** 31 - 1)), shape=shape, bits=draw(st.integers(2, 8)),
                dtype=draw(st.sampled_from(DTYPES)), signed=draw(st.booleans()), offset=draw(st.booleans()),
                special=draw(st.sampled_from(["normal", "ties", "far", "tiny"])), device=device)
