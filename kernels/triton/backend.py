"""The `triton` backend of the oscqat op contract (docs/semantics.md), installed as `oscqat.kernels.triton.backend`.

Same functions, signatures and return types as `oscqat.ops.reference`; the kernels are in `kernels.py`.
Runs CUDA (and ROCm) tensors with compiled kernels, and CPU tensors in Triton's interpreter when
TRITON_INTERPRET=1 was set before this module was imported. Nothing here synchronises with the device.

Bytes moved per element (E = 4 for fp32 tensors, 2 for bf16/fp16; f = fraction of frozen weights):
  weight_fwd        2E (no state), 2E + 1 + 4f (with flags/ema)
  weight_fwd_track  2E + 20       (w, prev_int, flags, freq, ema read; w_hat, prev_int, flags, freq, ema
                                  written: frozen weights rewrite their ema slot unchanged, so it vectorises)
  weight_bwd        3E (no state), 3E + 1 + 4f (with flags/ema)
  act_fwd           2E
  act_bwd           3E
The 4f terms (ema read only where frozen) are lower bounds: DRAM moves 32-byte sectors, i.e. 8 weights.
Reductions (D, counts, dL/ds, dL/do) add a few bytes per program of ~2048 elements, and one tiny
second launch when the grid has more than one program. bench/gpu_bytes.py derives these numbers from the
compiled PTX (tests/test_triton_aot.py checks the instruction widths).
"""
from __future__ import annotations

import os

import torch

from oscqat.errors import BackendUnavailable
from oscqat.ops.reference import damp_coef

DEVICE_TYPES = ("cuda", "cpu")

try:
    import triton

    from . import kernels as _k
except Exception as e:  # noqa: BLE001 - any failure to import triton means the backend cannot run
    triton = None
    _k = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"
    _INTERPRETED = False
else:
    _IMPORT_ERROR = None
    try:
        from triton.runtime.interpreter import InterpretedFunction as _Interpreted
        _INTERPRETED = isinstance(_k._weight_fwd_kernel, _Interpreted)
    except ImportError:
        _INTERPRETED = False

# Elements per program: the interpreter runs programs one after another in Python, so it gets few, large ones.
TILE = 1 << 18 if _INTERPRETED else 2048
# On GPU, tiles of a (C, K) weight view use the power-of-two BLOCK_K that pads K least (see _weight_tiles).
FIT_TILES = not _INTERPRETED
MAX_WARPS = 8               # 2048 elements on 8 warps: 8 per thread (the tracked forward spills at 16)
_FINAL_TILE = 4096          # partials per program of the finalize pass
_I32_LIMIT = 2 ** 31 - 1


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check(name: str = "triton", device_type: str = "cuda") -> None:
    """Raise BackendUnavailable, with the reason, unless this backend can run tensors on `device_type`."""
    if _IMPORT_ERROR is not None:
        raise BackendUnavailable(f"oscqat backend {name!r} needs the 'triton' package, which cannot be imported "
                                 f"here ({_IMPORT_ERROR}); install it with `pip install triton`")
    if device_type == "cpu":
        if not _INTERPRETED:
            late = (" (it is set now, but was not when oscqat.kernels.triton was imported)" if _interpret_env() else "")
            raise BackendUnavailable(
                f"oscqat backend {name!r} runs CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
                f"before triton and oscqat are imported{late}")
        return
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"oscqat backend {name!r} needs a CUDA GPU for cuda tensors, and "
                                     f"torch.cuda.is_available() is False here")
        return
    raise BackendUnavailable(f"oscqat backend {name!r} runs only cuda tensors (and cpu tensors under "
                             f"TRITON_INTERPRET=1), not {device_type!r} tensors")


def _guard(t: torch.Tensor) -> None:
    if _k is None or (t.device.type == "cpu" and not _INTERPRETED):
        check("triton", t.device.type)


def _np2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _weight_tiles(C: int, K: int):
    """(BLOCK_C, BLOCK_K, NKB, grid): tiles of the (C, K) view. On GPU BLOCK_K is the power of two (>= 32, or
    K's) that wastes the fewest lanes, a smaller one only when it saves >5% of the padding."""
    kp = _np2(K)
    bk = min(kp, TILE)
    if FIT_TILES and bk > 32:
        best_pad = _cdiv(K, bk) * bk
        b = bk // 2
        while b >= 32:
            pad = _cdiv(K, b) * b
            if pad < best_pad * 0.95:
                bk, best_pad = b, pad
            b //= 2
    bc = max(1, min(TILE // bk, _np2(C)))
    nkb = _cdiv(K, bk)
    return bc, bk, nkb, _cdiv(C, bc) * nkb


def _i64(C: int, K: int, bc: int, bk: int) -> bool:
    return (C + bc) * K + bk > _I32_LIMIT


def _launch(kernel, grid: int, elems: int, *args, **meta):
    warps = max(1, min(MAX_WARPS, elems // 256))
    if meta.get("FINAL"):
        # A one-program grid has no occupancy to win. Uncapped, ptxas aims at several programs per SM and may
        # spill to get there (sm_90: one register of weight_bwd's [HAS_STATE, FINAL] tiles, where the
        # div.rn.f32 slow-path call costs registers); the per-thread maximum lets it use what it needs.
        meta["maxnreg"] = 255
    kernel[(grid,)](*args, **meta, num_warps=warps, enable_fp_fusion=False)


def _finalize(part, out0, out1, R, NC, factor, mode, split=False):
    bnc = min(_np2(NC), 1024)
    br = max(1, min(_np2(R), _FINAL_TILE // bnc))
    _launch(_k._finalize_kernel, _cdiv(NC, bnc), br * bnc, part, out0, out0 if out1 is None else out1, R, NC,
            float(factor), MODE=mode, SPLIT=split, IS_INT=not part.is_floating_point(), BLOCK_R=br, BLOCK_NC=bnc)


class _DeviceCtx:
    """torch.cuda.device(t.device) only when it is not already the current device (Triton launches there)."""

    __slots__ = ("ctx",)

    def __init__(self, t):
        self.ctx = None
        if t.device.type == "cuda" and t.device.index is not None and t.device.index != torch.cuda.current_device():
            self.ctx = torch.cuda.device(t.device)

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _dense(t):
    return t if t.is_contiguous() else t.contiguous()


def _check_state(*bufs):
    for b in bufs:
        if b is not None and not b.is_contiguous():
            raise ValueError("oscqat triton backend: state buffers must be contiguous (they are updated in place)")


def _f32(t):
    return t if t.dtype == torch.float32 else t.float()


def _momenta(momentum: float):
    # fp32(m) and fp32(1 - m) with 1 - m in double (docs/semantics.md); Triton passes Python floats as fp32.
    return float(momentum), float(1.0 - momentum)


# ---------------------------------------------------------------- weights
def _weight_fwd_impl(w, scale, prev_int, flags, freq, ema, f_th, n, p, momentum, damp, damp_div, track):
    _guard(w)
    w = _dense(w)
    scale = _dense(_f32(scale))
    has_state = flags is not None
    if track:
        _check_state(prev_int, flags, freq, ema)
    elif has_state:
        flags, ema = _dense(flags), _dense(ema)
    N = w.numel()
    C = scale.numel()
    dev = w.device
    if N == 0:
        z = torch.zeros((), dtype=torch.float32, device=dev)
        return torch.empty(w.shape, dtype=w.dtype, device=dev), z, torch.zeros(2, dtype=torch.int32, device=dev)
    K = N // C
    bc, bk, nkb, grid = _weight_tiles(C, K)
    final = grid == 1
    out = torch.empty(w.shape, dtype=w.dtype, device=dev)
    d = torch.empty((), dtype=torch.float32, device=dev)
    counts = torch.empty(2, dtype=torch.int32, device=dev) if track else d
    dpart = torch.empty(grid, dtype=torch.float32, device=dev) if (damp and not final) else d
    cpart = torch.empty(grid * 2, dtype=torch.int32, device=dev) if (track and not final) else counts
    dummy = scale
    m, om = _momenta(momentum)
    with _DeviceCtx(w):
        _launch(_k._weight_fwd_kernel, grid, bc * bk, w, scale,
                prev_int if track else dummy, flags if has_state else dummy, freq if track else dummy,
                ema if has_state else dummy, f_th if track else dummy, out, dpart, cpart, d, counts,
                C, K, nkb, float(n), float(p), m, om, float(damp_div),
                HAS_STATE=has_state, TRACK=track, DAMP=bool(damp), FINAL=final,
                W_BF16=w.dtype == torch.bfloat16, I64=_i64(C, K, bc, bk), ONE_ROW=C == 1, BLOCK_C=bc,
                BLOCK_K=bk)
        if not final:
            if damp:
                _finalize(dpart, d, None, grid, 1, damp_div, mode=2)
            if track:
                _finalize(cpart, counts, None, grid, 2, 1.0, mode=0)
    return out, d, counts


def weight_fwd(w, scale, flags, ema, n: int, p: int, damp: bool, damp_div: float):
    """Untracked forward: (w_hat, D). `flags`/`ema` may be None (no state: nothing frozen)."""
    w_hat, d, _ = _weight_fwd_impl(w, scale, None, flags, None, ema, None, n, p, 0.0, damp, damp_div, False)
    return w_hat, d


def weight_fwd_track(w, scale, prev_int, flags, freq, ema, f_th, n: int, p: int, momentum: float,
                     damp: bool, damp_div: float):
    """Tracked forward: (w_hat, D, counts[changes, oscillations]); updates the four state buffers in place."""
    return _weight_fwd_impl(w, scale, prev_int, flags, freq, ema, f_th, n, p, momentum, damp, damp_div, True)


def weight_bwd(g, w, scale, flags, ema, grad_d, n: int, p: int, grad_scale: float, damp: bool,
               damp_div: float, tracked: bool):
    """(dL/dw in g's dtype, dL/ds fp32 of scale's shape). `tracked`: the forward was a tracked one."""
    _guard(w)
    g = _dense(g)
    w = _dense(w)
    scale32 = _dense(_f32(scale))
    has_state = flags is not None
    if has_state:
        flags, ema = _dense(flags), _dense(ema)
    N = w.numel()
    C = scale32.numel()
    dev = w.device
    if N == 0:
        return torch.empty(w.shape, dtype=g.dtype, device=dev), torch.zeros(scale.shape, dtype=torch.float32,
                                                                             device=dev)
    K = N // C
    bc, bk, nkb, grid = _weight_tiles(C, K)
    final = grid == 1
    gw = torch.empty(w.shape, dtype=g.dtype, device=dev)
    gs = torch.empty(scale.shape, dtype=torch.float32, device=dev)
    gpart = gs if final else torch.empty(nkb * C, dtype=torch.float32, device=dev)
    coef = damp_coef(grad_d, damp_div) if damp else scale32
    with _DeviceCtx(w):
        _launch(_k._weight_bwd_kernel, grid, bc * bk, g, w, scale32, flags if has_state else scale32,
                ema if has_state else scale32, coef, gw, gpart, gs, C, K, nkb, float(n), float(p),
                float(grad_scale), HAS_STATE=has_state, TRACKED=bool(tracked), DAMP=bool(damp), FINAL=final,
                G_BF16=g.dtype == torch.bfloat16, W_BF16=w.dtype == torch.bfloat16, I64=_i64(C, K, bc, bk),
                ONE_ROW=C == 1, BLOCK_C=bc, BLOCK_K=bk)
        if not final:
            _finalize(gpart, gs, None, nkb, C, grad_scale, mode=1)
    return gw, gs


# ---------------------------------------------------------------- activations
def _act_grid(N: int):
    block = min(TILE, max(16, _np2(N)))
    return block, _cdiv(N, block)


def act_fwd(x, scale, offset, n: int, p: int):
    _guard(x)
    x = _dense(x)
    scale = _dense(_f32(scale))
    off = scale if offset is None else _dense(_f32(offset))
    N = x.numel()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if N == 0:
        return y
    block, grid = _act_grid(N)
    has_off = offset is not None
    with _DeviceCtx(x):
        _launch(_k._act_fwd_kernel, grid, block, x, scale, off, y, N, float(n), float(p), HAS_OFFSET=has_off,
                X_BF16=x.dtype == torch.bfloat16, I64=N + block > _I32_LIMIT, BLOCK=block)
    return y


def act_bwd(g, x, scale, offset, n: int, p: int, grad_scale: float):
    """(dL/dx in g's dtype, dL/ds fp32 like scale, dL/do fp32 like scale; zeros without an offset)."""
    _guard(x)
    g = _dense(g)
    x = _dense(x)
    scale32 = _dense(_f32(scale))
    off = scale32 if offset is None else _dense(_f32(offset))
    N = x.numel()
    dev = x.device
    gx = torch.empty(x.shape, dtype=g.dtype, device=dev)
    if N == 0:
        return gx, torch.zeros(scale.shape, dtype=torch.float32, device=dev), \
            torch.zeros(scale.shape, dtype=torch.float32, device=dev)
    block, grid = _act_grid(N)
    final = grid == 1
    gs = torch.empty(scale.shape, dtype=torch.float32, device=dev)
    go = torch.empty(scale.shape, dtype=torch.float32, device=dev)
    part = gs if final else torch.empty(2 * grid, dtype=torch.float32, device=dev)
    has_off = offset is not None
    with _DeviceCtx(x):
        _launch(_k._act_bwd_kernel, grid, block, g, x, scale32, off, gx, part, gs, go, N, float(n), float(p),
                float(grad_scale), HAS_OFFSET=has_off, FINAL=final,
                G_BF16=g.dtype == torch.bfloat16, X_BF16=x.dtype == torch.bfloat16, I64=N + block > _I32_LIMIT,
                BLOCK=block)
        if not final:
            _finalize(part, gs, go, grid, 2, grad_scale, mode=1, split=True)
    return gx, gs, go


__all__ = ["DEVICE_TYPES", "TILE", "act_bwd", "act_fwd", "check", "weight_bwd", "weight_fwd", "weight_fwd_track"]
