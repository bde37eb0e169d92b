"""Triton kernels of the op contract (docs/semantics.md). Imported only when `triton` is importable.

Every kernel is one pass over its tensors; reductions are written as per-program partials and summed by a tiny
deterministic second pass (`_finalize_kernel`), or written directly when the grid has a single program. No
float atomics, no host-device synchronisation.

Rules every kernel follows, so that integers, masks, states, w_hat, activation outputs, dL/dw and dL/dx are
bit-identical to the `torch` reference backend (on GPU and under TRITON_INTERPRET=1):
- all arithmetic in fp32; launched with `enable_fp_fusion=False` (no a*b+c contraction);
- r = 1/s by `tl.div_rn` (div.rn.f32 on NVIDIA in every supported Triton; plain `/` is div.full, and
  Triton 3.6 compiles `tl.fdiv(..., ieee_rounding=True)` to div.full too);
- round half to even without libdevice (`_round_half_even`, via `tl.floor`);
- bf16 is widened and narrowed with integer bit operations (the interpreter's own fp32->bf16 cast truncates);
  fp16/fp64 use Triton's casts (round to nearest even on GPU and in the interpreter);
- clamps are `where` chains, so NaN propagates as `torch.clamp` does.

Weight kernels work on 2-D tiles [BLOCK_C channels, BLOCK_K elements of a channel] of the (C, N/C) view of the
weight: the reciprocal is computed once per row of a tile, no per-element integer division is needed, and a
per-channel reduction is a row sum of the tile.
"""
from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # pragma: no cover
    _Interpreted = ()


def _device(fn):
    """@triton.jit for device helpers; under the interpreter the plain function, which runs the same tl calls
    inside the interpreted kernel without the interpreter's costly per-call re-patching of triton.language."""
    jitted = triton.jit(fn)
    return fn if isinstance(jitted, _Interpreted) else jitted


@_device
def _round_half_even(x):
    """torch.round (half to even) for every fp32 x, signed zeros included: floor(x + 0.5) is never used."""
    f = tl.floor(x)
    d = x - f                      # exact
    h = f * 0.5                    # exact
    odd = tl.floor(h) != h
    up = (d > 0.5) | ((d == 0.5) & odd)
    r = tl.where(up, f + 1.0, f)
    # x in [-0.5, 0): floor is -1 and -1 + 1 = +0.0, but torch.round gives -0.0. x * 0.0 is that -0.0 (x < 0);
    # a -0.0 literal is not: triton 3.8 folds it to +0.0.
    return tl.where(up & (f == -1.0), x * 0.0, r)


@_device
def _widen(v, IS_BF16: tl.constexpr):
    """A loaded tile as fp32 (bf16 by bits: exact, and the same in the interpreter and on GPU)."""
    if IS_BF16:
        u = v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return u.to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@_device
def _narrow(v, IS_BF16: tl.constexpr):
    """fp32 -> bf16 rounded to nearest even (as c10::BFloat16 / cvt.rn.bf16.f32); others are cast by the store."""
    if IS_BF16:
        b = v.to(tl.uint32, bitcast=True)
        rb = ((b >> 16) & 1) + 0x7FFF
        h = (b + rb) >> 16
        h = tl.where(v != v, 0x7FC0, h)
        return h.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v


@_device
def _clamp(v, lo, hi):
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@_device
def _quantize(x, n_f, p_f):
    """(clamp(R, n, p), n <= R <= p) for R = round_half_to_even(x): the integer and the STE range mask."""
    rr = _round_half_even(x)
    return _clamp(rr, n_f, p_f), (rr >= n_f) & (rr <= p_f)


@_device
def _decode_flags(fl):
    """(fz, last_dir, uninitialised) of the int32-widened int8 flags: the flag encoding of docs/semantics.md, the
    one decoding of this backend (the reference's is `oscqat.ops.reference.decode_flags`, the C++/CUDA's csrc/flags.h).
    Every int8 value decodes; only -128 is uninitialised, and -127..-2 decode as 0 (fz = 0, last_dir = 0)."""
    valid = fl >= -1
    fz = tl.where(valid, (fl + 1) >> 2, 0)
    last_dir = tl.where(valid, fl - 4 * fz, 0)
    return fz, last_dir, fl == -128


@_device
def _tile(pid, C, K, NKB, I64: tl.constexpr, ONE_ROW: tl.constexpr, BLOCK_C: tl.constexpr,
          BLOCK_K: tl.constexpr):
    if ONE_ROW:     # per-tensor scale (C == 1): offsets are the columns, no multiply by K (loads vectorise
                    # when Triton sees K % 16 == 0, as for any tile: the mask cols < K decides)
        kb = pid
        rows = tl.arange(0, BLOCK_C)
    else:
        cb = pid // NKB
        kb = pid - cb * NKB
        rows = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    if I64:
        kb = kb.to(tl.int64)
    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < C
    m2 = rmask[:, None] & (cols < K)[None, :]
    if I64:
        offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    else:
        offs = rows[:, None] * K + cols[None, :]
    return kb, rows, rmask, m2, offs


@triton.jit(do_not_specialize=("C", "NKB"))
def _weight_fwd_kernel(w_ptr, s_ptr, prev_ptr, flags_ptr, freq_ptr, ema_ptr, fth_ptr, out_ptr,
                       dpart_ptr, cpart_ptr, d_ptr, counts_ptr,
                       C, K, NKB, n_f, p_f, mom, omom, div,
                       HAS_STATE: tl.constexpr, TRACK: tl.constexpr, DAMP: tl.constexpr, FINAL: tl.constexpr,
                       W_BF16: tl.constexpr, I64: tl.constexpr, ONE_ROW: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """Weight forward, one pass: w_hat, the dampening term D, and (TRACK) the state update and counts.

    Bytes moved per element (E = bytes of w's dtype: 4 fp32, 2 bf16/fp16; f = fraction of frozen weights):
      untracked, no state:   E (w) + E (w_hat)                                  = 2E      (8 fp32, 4 bf16)
      untracked, with state: 2E + 1 (flags) + 4f (ema, read only where frozen)  = 2E+1+4f (9..13 fp32)
      tracked:               read  E (w) + 1 (prev_int) + 1 (flags) + 4 (freq) + 4 (ema)
                             write E (w_hat) + 1 (prev_int) + 1 (flags) + 4 (freq) + 4 (ema)
                                                                       = 2E+20    (28 fp32, 24 bf16/fp16)
    D and counts add 4 + 8 bytes per program (per BLOCK_C*BLOCK_K elements), nothing per element.
    (DRAM moves whole 32-byte sectors: an ema read 'only where frozen' costs 32 bytes per sector of 8 weights
    holding a frozen one, so 4f is its lower bound, reached when frozen weights cluster.)
    """
    pid = tl.program_id(0)
    kb, rows, rmask, m2, offs = _tile(pid, C, K, NKB, I64, ONE_ROW, BLOCK_C, BLOCK_K)
    s = tl.load(s_ptr + rows, mask=rmask, other=1.0)
    r = tl.div_rn(tl.full([BLOCK_C], 1.0, tl.float32), s)
    s2 = s[:, None]
    w = _widen(tl.load(w_ptr + offs, mask=m2, other=0.0), W_BF16)
    x = w * r[:, None]
    w_int, _ = _quantize(x, n_f, p_f)
    if HAS_STATE:
        fl = tl.load(flags_ptr + offs, mask=m2, other=0).to(tl.int32)
        fz, last_dir, uninit = _decode_flags(fl)
        frozen = fz >= 1
        if TRACK:
            e = tl.load(ema_ptr + offs, mask=m2, other=0.0)
        else:
            e = tl.load(ema_ptr + offs, mask=m2 & frozen, other=0.0)
        w_eff = tl.where(frozen, e, w_int)
    else:
        w_eff = w_int
    w_hat = s2 * w_eff
    tl.store(out_ptr + offs, _narrow(w_hat, W_BF16), mask=m2)

    if DAMP:
        lo = s2 * n_f
        hi = s2 * p_f
        err = w_hat - _clamp(w, lo, hi)
        dsum = tl.sum(tl.sum(tl.where(m2, err * err, 0.0), axis=1), axis=0)

    if TRACK:
        prev = tl.load(prev_ptr + offs, mask=m2, other=0).to(tl.float32)
        fr = tl.load(freq_ptr + offs, mask=m2, other=0.0)
        fth = tl.zeros_like(fr) + tl.load(fth_ptr).to(tl.float32)   # a tile: the interpreter mistypes scalar & tile
        init = ~uninit
        delta = w_eff - prev
        switched = (delta != 0.0) & init
        direction = tl.where(delta > 0.0, 1, tl.where(delta < 0.0, -1, 0))
        osc = switched & (direction == -last_dir)
        new_freq = tl.where(uninit, 0.0, omom * fr + tl.where(osc, mom, 0.0))
        new_dir = tl.where(switched, direction, last_dir)
        newly = (fth > 0.0) & (new_freq > fth) & (fz == 0) & init
        ema_step = omom * e + mom * w_eff
        new_ema = tl.where(uninit, w_eff, tl.where(newly, _round_half_even(e), tl.where(frozen, e, ema_step)))
        new_fz = tl.where(newly, 2, tl.where(frozen, 1, 0))
        new_flags = tl.where(uninit, 0, new_dir + 4 * new_fz)
        tl.store(prev_ptr + offs, w_eff.to(tl.int32).to(tl.int8), mask=m2)
        tl.store(flags_ptr + offs, new_flags.to(tl.int8), mask=m2)
        tl.store(freq_ptr + offs, new_freq, mask=m2)
        # frozen weights get back the frozen_int just loaded (new_ema == e there): an unpredicated store
        # vectorises, and a per-weight mask would save no DRAM traffic unless a whole 32-byte sector is frozen
        tl.store(ema_ptr + offs, new_ema, mask=m2)
        n_sw = tl.sum(tl.sum(tl.where(m2 & switched, 1, 0), axis=1), axis=0)
        n_osc = tl.sum(tl.sum(tl.where(m2 & osc, 1, 0), axis=1), axis=0)

    if FINAL:
        if DAMP:
            tl.store(d_ptr, tl.div_rn(dsum, div))
        else:
            tl.store(d_ptr, 0.0)
        if TRACK:
            tl.store(counts_ptr, n_sw)
            tl.store(counts_ptr + 1, n_osc)
    else:
        if DAMP:
            tl.store(dpart_ptr + pid, dsum)
        else:
            tl.store(d_ptr, 0.0, mask=pid == 0)
        if TRACK:
            tl.store(cpart_ptr + 2 * pid, n_sw)
            tl.store(cpart_ptr + 2 * pid + 1, n_osc)


@triton.jit(do_not_specialize=("C", "NKB"))
def _weight_bwd_kernel(g_ptr, w_ptr, s_ptr, flags_ptr, ema_ptr, coef_ptr, gw_ptr, gpart_ptr, gs_ptr,
                       C, K, NKB, n_f, p_f, gscale,
                       HAS_STATE: tl.constexpr, TRACKED: tl.constexpr, DAMP: tl.constexpr, FINAL: tl.constexpr,
                       G_BF16: tl.constexpr, W_BF16: tl.constexpr, I64: tl.constexpr, ONE_ROW: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight backward, one pass: dL/dw (STE mask + dampening gradient) and dL/ds partials per channel row.

    Bytes moved per element (E = bytes of w/g's dtype, f = fraction of frozen weights):
      no state:   E (g) + E (w) + E (dL/dw)                              = 3E       (12 fp32, 6 bf16)
      with state: 3E + 1 (flags) + 4f (ema, read only where frozen)       = 3E+1+4f  (13..17 fp32, 7..11 bf16)
    dL/ds adds 4 bytes per channel row per program, nothing per element.
    """
    pid = tl.program_id(0)
    kb, rows, rmask, m2, offs = _tile(pid, C, K, NKB, I64, ONE_ROW, BLOCK_C, BLOCK_K)
    s = tl.load(s_ptr + rows, mask=rmask, other=1.0)
    r = tl.div_rn(tl.full([BLOCK_C], 1.0, tl.float32), s)
    s2 = s[:, None]
    g = _widen(tl.load(g_ptr + offs, mask=m2, other=0.0), G_BF16)
    w = _widen(tl.load(w_ptr + offs, mask=m2, other=0.0), W_BF16)
    x = w * r[:, None]
    w_int, in_rng = _quantize(x, n_f, p_f)
    if HAS_STATE:
        fl = tl.load(flags_ptr + offs, mask=m2, other=0).to(tl.int32)
        fz, _, _ = _decode_flags(fl)
        if TRACKED:
            frozen = fz == 1
            mask = in_rng & (fz != 1)
        else:
            frozen = fz >= 1
            mask = in_rng & (fz < 1)
        e = tl.load(ema_ptr + offs, mask=m2 & frozen, other=0.0)
        w_eff = tl.where(frozen, e, w_int)
    else:
        w_eff = w_int
        mask = in_rng
    maskf = tl.where(mask, 1.0, 0.0)
    gw = g * maskf
    if DAMP:
        coef = tl.load(coef_ptr)
        lo = s2 * n_f
        hi = s2 * p_f
        inside = (w >= lo) & (w <= hi)
        t = coef * (_clamp(w, lo, hi) - s2 * w_eff)
        gw = gw + t * tl.where(inside, 1.0, 0.0)
    tl.store(gw_ptr + offs, _narrow(gw, G_BF16), mask=m2)
    term = g * (w_eff - x * maskf)
    rowsum = tl.sum(tl.where(m2, term, 0.0), axis=1)
    if FINAL:
        tl.store(gs_ptr + rows, rowsum * gscale, mask=rmask)
    else:
        tl.store(gpart_ptr + kb * C + rows, rowsum, mask=rmask)


@_device
def _act_block(pid, N, I64: tl.constexpr, BLOCK: tl.constexpr):
    if I64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < N


@triton.jit
def _act_fwd_kernel(x_ptr, s_ptr, o_ptr, y_ptr, N, n_f, p_f,
                    HAS_OFFSET: tl.constexpr, X_BF16: tl.constexpr, I64: tl.constexpr, BLOCK: tl.constexpr):
    """LSQ(+) activation forward. Bytes moved per element: E (x) + E (y) = 2E (8 fp32, 4 bf16/fp16)."""
    pid = tl.program_id(0)
    offs, m = _act_block(pid, N, I64, BLOCK)
    s = tl.load(s_ptr + tl.arange(0, 1))
    r = tl.div_rn(tl.full([1], 1.0, tl.float32), s)
    x = _widen(tl.load(x_ptr + offs, mask=m, other=0.0), X_BF16)
    if HAS_OFFSET:
        o = tl.load(o_ptr + tl.arange(0, 1))
        xs = (x - o) * r
    else:
        xs = x * r
    q, _ = _quantize(xs, n_f, p_f)
    y = q * s
    if HAS_OFFSET:
        y = y + o
    tl.store(y_ptr + offs, _narrow(y, X_BF16), mask=m)


@triton.jit
def _act_bwd_kernel(g_ptr, x_ptr, s_ptr, o_ptr, gx_ptr, part_ptr, gs_ptr, go_ptr, N, n_f, p_f, gscale,
                    HAS_OFFSET: tl.constexpr, FINAL: tl.constexpr, G_BF16: tl.constexpr, X_BF16: tl.constexpr,
                    I64: tl.constexpr, BLOCK: tl.constexpr):
    """LSQ(+) activation backward: dL/dx and per-program partials of dL/ds, dL/do (no full-size temporaries).

    Bytes moved per element: E (g) + E (x) + E (dL/dx) = 3E (12 fp32, 6 bf16/fp16); 8 bytes per program.
    """
    pid = tl.program_id(0)
    offs, m = _act_block(pid, N, I64, BLOCK)
    s = tl.load(s_ptr + tl.arange(0, 1))
    r = tl.div_rn(tl.full([1], 1.0, tl.float32), s)
    g = _widen(tl.load(g_ptr + offs, mask=m, other=0.0), G_BF16)
    x = _widen(tl.load(x_ptr + offs, mask=m, other=0.0), X_BF16)
    if HAS_OFFSET:
        o = tl.load(o_ptr + tl.arange(0, 1))
        xs = (x - o) * r
    else:
        xs = x * r
    q, in_rng = _quantize(xs, n_f, p_f)
    inf = tl.where(in_rng, 1.0, 0.0)
    tl.store(gx_ptr + offs, _narrow(g * inf, G_BF16), mask=m)
    ps = tl.sum(tl.where(m, g * (q - xs * inf), 0.0), axis=0)
    if HAS_OFFSET:
        po = tl.sum(tl.where(m, g * tl.where(in_rng, 0.0, 1.0), 0.0), axis=0)
    else:
        po = 0.0
    if FINAL:
        tl.store(gs_ptr, ps * gscale)
        tl.store(go_ptr, po * gscale)
    else:
        tl.store(part_ptr + 2 * pid, ps)
        tl.store(part_ptr + 2 * pid + 1, po)


@triton.jit
def _finalize_kernel(part_ptr, out0_ptr, out1_ptr, R, NC, factor,
                     MODE: tl.constexpr, SPLIT: tl.constexpr, IS_INT: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_NC: tl.constexpr):
    """out[c] = sum_r part[r, c] (then * factor for MODE 1, / factor for MODE 2), in a fixed order.

    SPLIT: column 0 goes to out0, column 1 to out1 (two separate outputs). Bytes: 4 per partial."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_NC + tl.arange(0, BLOCK_NC)
    cm = cols < NC
    if IS_INT:
        acc = tl.zeros([BLOCK_NC], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_NC], dtype=tl.float32)
    # A while loop, not `range(0, R, BLOCK_R)`: triton 3.6's interpreter converts a runtime range bound by
    # int() of a 1-element array, which NumPy >= 2.4 rejects (triton-lang/triton#9171, fixed in triton 3.8).
    r0 = 0
    while r0 < R:
        rows = r0 + tl.arange(0, BLOCK_R)
        v = tl.load(part_ptr + rows[:, None] * NC + cols[None, :], mask=(rows < R)[:, None] & cm[None, :], other=0)
        acc += tl.sum(v, axis=0)
        r0 += BLOCK_R
    if MODE == 1:
        acc = acc * factor
    elif MODE == 2:
        acc = tl.div_rn(acc, tl.full([BLOCK_NC], factor, tl.float32))
    if SPLIT:
        tl.store(out0_ptr + cols, acc, mask=cols == 0)
        tl.store(out1_ptr + (cols - 1), acc, mask=cols == 1)
    else:
        tl.store(out0_ptr + cols, acc, mask=cm)
