"""Ahead-of-time compilation of the triton backend's kernels for NVIDIA GPUs, on a machine without a GPU.

- `launches()` drives the backend's own launch code (kernels/triton/backend.py) on meta tensors over shapes, dtypes
  and flags, and records every kernel launch it asks for instead of running it;
- `specialize()` turns a launch into what Triton's JIT would compile for it on a given GPU: signature,
  constexprs, specialisation attributes (16-byte-aligned pointers, integers divisible by 16 or equal to 1) and
  options (num_warps, no fp fusion), by Triton's own binder, so its rules are not copied here;
- `compile_config()` compiles one of them with `triton.compile` for a `GPUTarget` (Triton's bundled ptxas, no
  driver) and reads back registers, spills and the global loads/stores of the PTX.

Import only in a process where TRITON_INTERPRET was unset when triton was imported (the kernels must be
JITFunctions, not interpreted functions). Used by tests/test_triton_aot.py and bench/gpu_bytes.py.
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import re
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from oscqat.kernels.triton import backend as K
from oscqat.kernels.triton import kernels as _k

ARCHS = (80, 90, 100)
KERNELS = ("_weight_fwd_kernel", "_weight_bwd_kernel", "_act_fwd_kernel", "_act_bwd_kernel", "_finalize_kernel")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TYPE_BYTES = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "bf16": 2, "b32": 4, "u32": 4,
               "s32": 4, "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8}


def _first_of_each(values, key):
    out = {}
    for v in values:
        out.setdefault(key(v), v)
    return sorted(out.values())


def weight_shapes() -> list[tuple[int, int]]:
    """(C, K) pairs that reach every tile the launch code picks (its own K._weight_tiles decides): one K per
    (BLOCK_K, K == 1, K % 16 == 0, one block per row) for K up to 2^17, one C per BLOCK_C bound (np2(C)) and
    C == 1; their products; and for each such K a C, and for each such C a K, past the int32 offset limit."""
    ks = _first_of_each(range(1, 2 ** 17), lambda k: (K._weight_tiles(1, k)[1], k == 1, k % 16 == 0,
                                                        K._weight_tiles(1, k)[2] == 1))
    cs = _first_of_each(range(1, 2 * K.TILE + 2), lambda c: (min(K._np2(c), K.TILE), c == 1))
    big = [(K._I32_LIMIT // k + 1, k) for k in ks] + [(c, K._I32_LIMIT // c + d) for c in cs for d in (1, 16)]
    return [(c, k) for c in cs for k in ks] + big


def act_sizes() -> list[int]:
    """One N per (BLOCK, one program, N == 1, N % 16 == 0), and N past the int32 offset limit."""
    ns = _first_of_each(range(1, 4 * K.TILE), lambda n: (*K._act_grid(n), n == 1, n % 16 == 0)
                        if K._act_grid(n)[1] <= 2 else (K._act_grid(n)[0], 3, n % 16 == 0))
    return ns + [K._I32_LIMIT + 1, K._I32_LIMIT + 17]


@dataclass
class Launch:
    kernel: str
    grid: int
    args: tuple
    kwargs: dict
    elems: int = 0          # elements of the op's tensor: which arguments are per element


class _Recorder:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(Launch(self.name, grid[0], args, kwargs))


@contextlib.contextmanager
def _recording(log):
    saved = {n: getattr(_k, n) for n in KERNELS}
    guard = K._guard
    try:
        for n in KERNELS:
            setattr(_k, n, _Recorder(n, log))
        K._guard = lambda t: None           # meta tensors: nothing runs
        yield
    finally:
        for n, fn in saved.items():
            setattr(_k, n, fn)
        K._guard = guard


def _weight_calls(C: int, Kn: int, dtype):
    meta = dict(device="meta")
    shape = (C, Kn)
    w = torch.empty(shape, dtype=dtype, **meta)
    s = torch.empty(C, **meta)
    st = dict(prev_int=torch.empty(shape, dtype=torch.int8, **meta),
              flags=torch.empty(shape, dtype=torch.int8, **meta), freq=torch.empty(shape, **meta),
              ema=torch.empty(shape, **meta))
    f_th = torch.empty((), **meta)
    gd = torch.empty((), **meta)
    for damp in (False, True):
        yield lambda: K.weight_fwd(w, s, None, None, -8, 7, damp, 3.0)
        yield lambda: K.weight_fwd(w, s, st["flags"], st["ema"], -8, 7, damp, 3.0)
        yield lambda: K.weight_fwd_track(w, s, *st.values(), f_th, -8, 7, 0.01, damp, 3.0)
        for tracked in (False, True):
            yield lambda: K.weight_bwd(w, w, s, None, None, gd, -8, 7, 0.1, damp, 3.0, tracked)
            yield lambda: K.weight_bwd(w, w, s, st["flags"], st["ema"], gd, -8, 7, 0.1, damp, 3.0, tracked)


def _act_calls(N: int, dtype):
    x = torch.empty(N, dtype=dtype, device="meta")
    s = torch.empty(1, device="meta")
    for off in (None, s):
        yield lambda: K.act_fwd(x, s, off, 0, 15)
        yield lambda: K.act_bwd(x, x, s, off, 0, 15, 0.1)


def launches(shapes=None, ns=None, dtypes=DTYPES) -> list[Launch]:
    """Every launch the backend's launch code makes for weights of (C, K) in `shapes` (default
    weight_shapes()) and activations of N in `ns` (default act_sizes()), for each dtype and flag combination."""
    shapes = weight_shapes() if shapes is None else shapes
    ns = act_sizes() if ns is None else ns
    log: list[Launch] = []
    with _recording(log):
        for dtype in dtypes:
            for C, Kn in shapes:
                for call in _weight_calls(C, Kn, dtype):
                    start = len(log)
                    call()
                    for rec in log[start:]:
                        rec.elems = C * Kn
            for N in ns:
                for call in _act_calls(N, dtype):
                    start = len(log)
                    call()
                    for rec in log[start:]:
                        rec.elems = N
    return log


@dataclass(frozen=True)
class Config:
    """What Triton compiles for a launch: kernel, signature, constexprs, attributes, num_warps, maxnreg
    (hashable)."""
    kernel: str
    signature: tuple
    constexprs: tuple
    attrs: tuple
    num_warps: int
    maxnreg: int | None
    per_element: tuple = field(default=(), compare=False)   # argument names indexed per element

    @property
    def fn(self):
        return getattr(_k, self.kernel)

    def constants(self) -> dict:
        names = self.fn.arg_names
        return {names[k[0]]: v for k, v in self.constexprs}

    def describe(self) -> str:
        c = self.constants()
        flags = ",".join(k for k, v in c.items() if v is True)
        tile = "x".join(str(c[k]) for k in ("BLOCK_C", "BLOCK_K", "BLOCK", "BLOCK_R", "BLOCK_NC") if k in c)
        dt = next((t[1:] for n, t in self.signature if n in ("w_ptr", "x_ptr", "part_ptr")), "")
        ints = [f"{n}=1" for n, v in c.items() if v == 1 and not isinstance(v, bool) and n.isupper() is False]
        div = [self.fn.arg_names[k[0]] for k, a in self.attrs if a and self.signature[k[0]][1][0] != "*"]
        return (f"{self.kernel[1:-7]} {dt} {tile} w{self.num_warps} [{flags}]"
                + (f" {' '.join(ints)}" if ints else "") + (f" div16:{','.join(div)}" if div else ""))


def _freeze(d):
    return tuple(sorted((k, tuple(tuple(x) for x in v) if isinstance(v, list) else v) for k, v in d.items()))


@functools.lru_cache(maxsize=None)
def _binder(kernel: str, cap: int):
    fn = getattr(_k, kernel)
    backend = make_backend(GPUTarget("cuda", cap, 32))
    return fn, backend, create_function_from_signature(fn.signature, fn.params, backend)


def specialize(launch: Launch, cap: int = 90) -> Config:
    fn, backend, binder = _binder(launch.kernel, cap)
    bound, spec, opts = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, spec, opts)
    per_el = tuple(n for n, a in zip(fn.arg_names, launch.args)
                   if isinstance(a, torch.Tensor) and a.numel() == launch.elems and launch.elems > 1)
    return Config(launch.kernel, tuple(signature.items()), _freeze({k: v for k, v in constexprs.items()}),
                  tuple(sorted((k, tuple(tuple(x) for x in v)) for k, v in attrs.items())), options.num_warps,
                  options.maxnreg, per_el)


def _arg_key(a):
    # at least as fine as what Triton specialises on: a tensor's dtype and 16-byte alignment, an integer's
    # being 1, divisible by 16, or past int32; floats not at all
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0, a.numel())
    if isinstance(a, bool) or not isinstance(a, int):
        return type(a)
    return (a == 1, a % 16 == 0, a > 2 ** 31 - 1, a < -2 ** 31)


def configs(launch_log=None, cap: int = 90) -> list[Config]:
    """The distinct compilations of `launch_log` (default: launches()), in first-seen order."""
    seen, done = {}, {}
    for la in (launches() if launch_log is None else launch_log):
        key = (la.kernel, la.elems > 1, tuple(map(_arg_key, la.args)), tuple(sorted(la.kwargs.items())))
        key = (key[0], key[1], tuple(k[:2] + (k[2] == la.elems,) if isinstance(k, tuple) and len(k) == 3 and
                                     isinstance(k[0], torch.dtype) else k for k in key[2]), key[3])
        if key not in done:
            c = done[key] = specialize(la, cap)
            seen.setdefault(c, c)
    return list(seen)


# ---------------------------------------------------------------- compile and read back
_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")
_GLOBAL = re.compile(r"^\s*(@!?%p\d+\s+)?(ld|st)\.global((?:\.[\w:]+)*?)(?:\.v(\d))?\.(b|u|s|f|bf)(\d+)\s+(.*);",
                     re.M)


@dataclass
class Compiled:
    config: Config
    cap: int
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    ptx: str
    cubin: bytes
    accesses: list        # (op 'ld'|'st', bytes, predicated, pointer argument name or None)

    def widths(self, name: str, op: str) -> set:
        return {b for o, b, _, n in self.accesses if n == name and o == op}


def _param_of(ptx: str, params: list[str]):
    """For each global access: the kernel pointer parameter its address derives from (a def-use walk over the
    PTX's virtual registers, through moves, adds, multiplies and conversions)."""
    defs = {}
    for m in re.finditer(r"^\s*(?:@!?%p\d+\s+)?([\w.:]+)\s+(%[\w]+),\s*([^;]*);", ptx, re.M):
        defs.setdefault(m.group(2), (m.group(1), m.group(3)))
    memo = {}

    def walk(reg, depth=0):
        if reg in memo:
            return memo[reg]
        memo[reg] = set()
        op, srcs = defs.get(reg, ("", ""))
        out = set()
        if op.startswith("ld.param"):
            pm = re.search(r"\[(\w+)\]", srcs)
            if pm and pm.group(1) in params:
                out.add(pm.group(1))
        elif depth < 200:
            for r in re.findall(r"%[\w]+", srcs):
                out |= walk(r, depth + 1)
        memo[reg] = out
        return out
    return walk


def compile_config(cfg: Config, cap: int) -> Compiled:
    """triton.compile for sm_`cap`; ptxas's -v report is read from Triton's own ptxas run."""
    fn = cfg.fn
    sig = dict(cfg.signature)
    src = ASTSource(fn=fn, signature=sig, constexprs={k: v for k, v in cfg.constexprs},
                    attrs={k: [list(x) for x in v] for k, v in cfg.attrs})
    log = io.StringIO()
    knobs = (triton.knobs.nvidia, "dump_ptxas_log"), (triton.knobs.compilation, "always_compile")
    old = [getattr(o, n) for o, n in knobs]
    for o, n in knobs:      # a cached kernel would not run ptxas, so there would be no report to read
        setattr(o, n, True)
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                                    options={"num_warps": cfg.num_warps, "maxnreg": cfg.maxnreg,
                                             "enable_fp_fusion": False})
    finally:
        for (o, n), v in zip(knobs, old):
            setattr(o, n, v)
    text = log.getvalue()
    regs = _PTXAS.search(text)
    if regs is None:
        raise RuntimeError(f"no ptxas -v report for {cfg.describe()} (sm_{cap}); Triton's compile printed:\n"
                           f"{text[-2000:]}")
    spills = _SPILL.search(text)
    stack = _STACK.search(text)
    ptx = kernel.asm["ptx"]
    params = re.findall(r"\.param \.u64 (?:\.ptr[\w .]*?)?(\w+_param_\d+)", ptx)
    names = {p: fn.arg_names[int(p.rsplit("_", 1)[1])] for p in params}
    walk = _param_of(ptx, params)
    acc = []
    for m in _GLOBAL.finditer(ptx):
        vec = int(m.group(4) or 1)
        nbytes = vec * _TYPE_BYTES[f"{m.group(5)}{m.group(6)}" if m.group(5) != "bf" else "bf16"]
        addr = re.search(r"\[\s*(%\w+)", m.group(7))
        src_params = walk(addr.group(1)) if addr else set()
        name = names[next(iter(src_params))] if len(src_params) == 1 else None
        acc.append((m.group(2), nbytes, bool(m.group(1)), name))
    return Compiled(cfg, cap, int(regs.group(1)), int(spills.group(1)) if spills else 0,
                    int(spills.group(2)) if spills else 0, int(stack.group(1)) if stack else 0, ptx,
                    kernel.asm["cubin"], acc)


def threads(cfg: Config) -> int:
    return 32 * cfg.num_warps


def elems_per_program(cfg: Config) -> int:
    c = cfg.constants()
    return math.prod(c[k] for k in ("BLOCK_C", "BLOCK_K", "BLOCK") if k in c)


_TILE_KEYS = ("BLOCK_C", "BLOCK_K", "BLOCK", "BLOCK_R", "BLOCK_NC")


def features(cfg: Config) -> tuple:
    """Everything but the tile and the divisibility attributes: dtypes, flags, I64, ONE_ROW, integer arguments
    specialised to 1, i32/i64 integer types."""
    return (cfg.kernel, cfg.signature, tuple((k, v) for k, v in cfg.constants().items() if k not in _TILE_KEYS))


def tile(cfg: Config) -> tuple:
    c = cfg.constants()
    return (cfg.kernel,) + tuple(c.get(k) for k in _TILE_KEYS) + (cfg.num_warps,)


def _weight(cfg: Config) -> int:
    """Work per thread (elements per thread x per-element tensors): the register-pressure order."""
    return elems_per_program(cfg) // threads(cfg) * max(1, len(cfg.per_element)) * 64 + \
        sum(1 for _, a in cfg.attrs if a)


def cover(all_configs: list[Config]) -> list[Config]:
    """A subset of `all_configs` (the reachable set) that contains every feature combination (at its most
    loaded tile, divisibility attributes preferred) and every tile shape with num_warps (at the most loaded
    feature combination that reaches it)."""
    by_feat, by_tile = {}, {}
    for c in all_configs:
        f, t = features(c), tile(c)
        if f not in by_feat or _weight(c) > _weight(by_feat[f]):
            by_feat[f] = c
        if t not in by_tile or _weight(c) > _weight(by_tile[t]):
            by_tile[t] = c
    return list(dict.fromkeys(list(by_feat.values()) + list(by_tile.values())))


def summary(r: Compiled) -> dict:
    """The numbers the test and the bytes model read: registers, spills, forbidden instructions, and per
    argument the global load/store widths (bytes per instruction) and bytes per thread."""
    per_arg = {}
    for op, nbytes, pred, name in r.accesses:
        d = per_arg.setdefault(name or "?", {"ld": [], "st": []})
        d[op].append(nbytes)
    return dict(kernel=r.config.kernel, describe=r.config.describe(), cap=r.cap, regs=r.regs,
                spill_stores=r.spill_stores, spill_loads=r.spill_loads, stack=r.stack,
                fma=len(re.findall(r"\bfma\.", r.ptx)), approx_div=len(re.findall(r"div\.(?:full|approx)", r.ptx)),
                div_rn=len(re.findall(r"div\.rn\.f32", r.ptx)), num_warps=r.config.num_warps,
                elems=elems_per_program(r.config), per_element=list(r.config.per_element), args=per_arg)


def problems(s: dict) -> list[str]:
    """What fails the check: a spill, a stack frame, a fused multiply-add, an approximate division."""
    out = []
    if s["spill_stores"] or s["spill_loads"] or s["stack"]:
        out.append(f"spills {s['spill_stores']}/{s['spill_loads']} bytes, stack {s['stack']}")
    if s["fma"]:
        out.append(f"{s['fma']} fused multiply-adds")
    if s["approx_div"]:
        out.append(f"{s['approx_div']} approximate divisions")
    return out


def _work(item):
    cfg, cap = item
    try:
        return summary(compile_config(cfg, cap))
    except Exception as e:  # noqa: BLE001 - a compile error is a result, reported with its config
        return dict(kernel=cfg.kernel, describe=cfg.describe(), cap=cap, error=f"{type(e).__name__}: {e}"[-3000:])


def compile_all(cfgs: list[Config], archs=ARCHS, jobs: int = 2) -> list[dict]:
    """Compile every config for every arch, in `jobs` forked worker processes."""
    import multiprocessing as mp
    items = [(c, a) for a in archs for c in cfgs]
    if jobs <= 1:
        return [_work(i) for i in items]
    with mp.get_context("fork").Pool(jobs) as pool:
        return pool.map(_work, items, chunksize=4)


def main(argv=None) -> int:
    import argparse
    import json
    import os
    import time
    ap = argparse.ArgumentParser(prog="python -m oscqat.kernels.triton.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="every reachable config, not the cover (hours)")
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90,100")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--shard", default="0/1", help="i/n: compile every n-th config starting at i")
    ap.add_argument("--json", help="write every result here")
    a = ap.parse_args(argv)
    t0 = time.time()
    every = configs()
    chosen = every if a.all else cover(every)
    i, n = map(int, a.shard.split("/"))
    chosen = chosen[i::n]
    archs = [int(x) for x in a.arch.split(",")]
    print(f"aot: triton {triton.__version__}: {len(every)} reachable configs, compiling "
          f"{'all' if a.all else 'the cover of'} {len(chosen)} for sm_{', sm_'.join(map(str, archs))} "
          f"({time.time() - t0:.0f} s to enumerate)", flush=True)
    t1 = time.time()
    res = compile_all(chosen, archs, a.jobs)
    bad = [(r, r.get("error") or "; ".join(problems(r))) for r in res if r.get("error") or problems(r)]
    for cap in archs:
        ok = [r for r in res if r["cap"] == cap and "error" not in r]
        if ok:
            top = max(ok, key=lambda r: r["regs"])
            print(f"aot: sm_{cap}: {len(ok)} compiled, max {top['regs']} registers ({top['describe']}), "
                  f"spills in {sum(1 for r in ok if r['spill_stores'] or r['spill_loads'])}")
    for r, why in bad[:50]:
        print(f"aot: FAIL sm_{r['cap']} {r['describe']}: {why}")
    print(f"aot: {len(res)} compilations in {time.time() - t1:.0f} s, {len(bad)} failed", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(triton=triton.__version__, reachable=len(every), results=res), f)
    return 1 if bad else 0


__all__ = ["ARCHS", "Compiled", "Config", "Launch", "compile_all", "compile_config", "configs", "cover",
           "elems_per_program", "features", "launches", "problems", "specialize", "summary", "threads",
           "tile"]


if __name__ == "__main__":
    raise SystemExit(main())
