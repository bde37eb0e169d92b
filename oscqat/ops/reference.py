"""The `torch` backend: pure-PyTorch reference of docs/semantics.md, which every other backend must match.

Every function here is a raw kernel of the op contract (no autograd, no validation): `oscqat.ops.library` wraps
them. Shapes: `w` of N elements, `scale` 1-D fp32 of 1 or C values (C divides N, channel = i // (N / C)),
state buffers of w's shape. Nothing here synchronises with the device.
"""
from __future__ import annotations

import torch

UNINIT = -128
# The values of `flags` that a fresh quantizer and the tracked forward write: UNINIT, and last_dir + 4 * fz with
# last_dir in {-1, 0, 1}, fz in {0, 1, 2}. Every other int8 value still decodes (decode_flags), the same way on
# every backend, but a checkpoint holding one is refused (oscqat/nn/state_check.py).
WRITTEN_FLAGS = (UNINIT, -1, 0, 1, 3, 4, 5, 7, 8, 9)


def _by_channel(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return t.reshape(scale.numel(), -1)


def _quantize(w, scale, n, p):
    wf = _by_channel(w, scale).float()
    s = scale.float().reshape(-1, 1)
    x = wf * (1.0 / s)
    rounded = torch.round(x)
    return wf, s, x, rounded.clamp(n, p), (rounded >= n) & (rounded <= p)


# The flag encoding (docs/semantics.md, "The flag encoding"): these two functions are its one decoding here;
# kernels/triton/kernels.py (`_decode_flags`) and csrc/flags.h are the others'.
def decode_flags(flags: torch.Tensor):
    """(fz, last_dir) as int32 from the packed int8 `flags`, for every int8 value: below -1, fz = last_dir = 0."""
    f = flags.int()
    valid = f >= -1
    fz = torch.where(valid, (f + 1) >> 2, 0)
    last_dir = torch.where(valid, f - 4 * fz, 0)
    return fz, last_dir


def uninitialised(flags: torch.Tensor) -> torch.Tensor:
    """Where `flags` says "not yet initialised": -128 only (-127..-2 decode as 0, initialised)."""
    return flags == UNINIT


def _frozen_view(flags, ema, scale, untracked: bool):
    fz, _ = decode_flags(_by_channel(flags, scale))
    frozen = fz >= 1 if untracked else fz == 1
    return frozen, _by_channel(ema, scale)


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d fp32 device tensor made by a fill, not a host copy (no sync). Dividing by it is an IEEE division on
    every device; dividing by a Python number is a multiply by its reciprocal on CUDA."""
    return torch.full((), value, dtype=torch.float32, device=like.device)


def damp_coef(grad_d: torch.Tensor, damp_div: float) -> torch.Tensor:
    """2 * gD / div as a 0-d fp32 tensor: one exact doubling and one IEEE division, on every device."""
    return 2.0 * grad_d.float() / _const(damp_div, grad_d)


def _damp_term(wf, s, w_eff, n, p, div):
    err = s * w_eff - torch.clamp(wf, s * n, s * p)
    return (err * err).sum() / _const(div, wf)


def weight_fwd(w, scale, flags, ema, n: int, p: int, damp: bool, damp_div: float):
    """Untracked forward: (w_hat, D). `flags`/`ema` may be None (no state: nothing frozen)."""
    wf, s, _, w_int, _ = _quantize(w, scale, n, p)
    w_eff = w_int
    if flags is not None:
        frozen, frozen_int = _frozen_view(flags, ema, scale, untracked=True)
        w_eff = torch.where(frozen, frozen_int, w_int)
    w_hat = (s * w_eff).to(w.dtype).reshape(w.shape)
    d = _damp_term(wf, s, w_eff, n, p, damp_div) if damp else wf.new_zeros(())
    return w_hat, d


def weight_fwd_track(w, scale, prev_int, flags, freq, ema, f_th, n: int, p: int, momentum: float,
                     damp: bool, damp_div: float):
    """Tracked forward: (w_hat, D, counts[changes, oscillations]); updates the four state buffers in place."""
    wf, s, _, w_int, _ = _quantize(w, scale, n, p)
    fl = _by_channel(flags, scale)
    fz, last_dir = decode_flags(fl)
    uninit = uninitialised(fl)
    ema_c = _by_channel(ema, scale)
    frozen = fz >= 1
    w_eff = torch.where(frozen, ema_c, w_int)
    w_hat = (s * w_eff).to(w.dtype).reshape(w.shape)
    d = _damp_term(wf, s, w_eff, n, p, damp_div) if damp else wf.new_zeros(())

    m, om = _const(momentum, wf), _const(1.0 - momentum, wf)
    delta = w_eff - _by_channel(prev_int, scale).float()
    switched = (delta != 0) & ~uninit
    direction = torch.sign(delta).int()
    osc = switched & (direction == -last_dir)
    freq_c = _by_channel(freq, scale)
    new_freq = torch.where(uninit, 0.0, om * freq_c + torch.where(osc, m, 0.0))
    new_dir = torch.where(switched, direction, last_dir)
    newly = (f_th > 0) & (new_freq > f_th) & (fz == 0) & ~uninit
    ema_step = om * ema_c + m * w_eff
    new_ema = torch.where(uninit, w_eff,
                          torch.where(newly, torch.round(ema_c), torch.where(frozen, ema_c, ema_step)))
    new_fz = torch.where(newly, 2, torch.where(frozen, 1, 0))
    new_flags = torch.where(uninit, 0, new_dir + 4 * new_fz)

    prev_int.copy_(w_eff.reshape(prev_int.shape).to(torch.int8))
    flags.copy_(new_flags.reshape(flags.shape).to(torch.int8))
    freq.copy_(new_freq.reshape(freq.shape))
    ema.copy_(new_ema.reshape(ema.shape))
    counts = torch.stack([switched.sum(), osc.sum()]).to(torch.int32)
    return w_hat, d, counts


def weight_bwd(g, w, scale, flags, ema, grad_d, n: int, p: int, grad_scale: float, damp: bool,
               damp_div: float, tracked: bool):
    """(dL/dw in w's dtype, dL/ds fp32 of scale's shape). `tracked`: the forward was a tracked one."""
    wf, s, x, w_int, in_rng = _quantize(w, scale, n, p)
    gf = _by_channel(g, scale).float()
    mask = in_rng
    w_eff = w_int
    if flags is not None:
        frozen, frozen_int = _frozen_view(flags, ema, scale, untracked=not tracked)
        w_eff = torch.where(frozen, frozen_int, w_int)
        mask = in_rng & ~frozen
    gw = gf * mask
    if damp:
        lo, hi = s * n, s * p
        inside = (wf >= lo) & (wf <= hi)
        coef = damp_coef(grad_d, damp_div)
        gw = gw + coef * (torch.clamp(wf, lo, hi) - s * w_eff) * inside
    gs = (gf * (w_eff - x * mask)).sum(dim=1) * grad_scale
    return gw.to(g.dtype).reshape(w.shape), gs.reshape(scale.shape)


def _act_quantize(x, scale, offset, n, p):
    xf = x.float()
    s = scale.float().reshape(())
    shifted = xf - offset.float().reshape(()) if offset is not None else xf
    xs = shifted * (1.0 / s)
    rounded = torch.round(xs)
    return xf, s, xs, rounded.clamp(n, p), (rounded >= n) & (rounded <= p)


def act_fwd(x, scale, offset, n: int, p: int):
    _, s, _, q, _ = _act_quantize(x, scale, offset, n, p)
    y = q * s
    if offset is not None:
        y = y + offset.float().reshape(())
    return y.to(x.dtype)


def act_bwd(g, x, scale, offset, n: int, p: int, grad_scale: float, *, total=torch.sum):
    """(dL/dx in x's dtype, dL/ds fp32 like scale, dL/do fp32 like scale; zeros without an offset). `total`: how
    the sums are taken (the order is free, docs/semantics.md)."""
    _, _, xs, q, in_rng = _act_quantize(x, scale, offset, n, p)
    gf = g.float()
    gx = (gf * in_rng).to(g.dtype)
    gs = (total(gf * (q - xs * in_rng)) * grad_scale).reshape(scale.shape)
    if offset is None:
        go = torch.zeros_like(scale, dtype=torch.float32)
    else:
        go = (total(gf * (~in_rng)) * grad_scale).reshape(scale.shape)
    return gx, gs, go
