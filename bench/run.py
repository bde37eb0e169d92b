"""oscqat benchmarks: kernels, the MobileNetV2 weight-set QAT step and the end-to-end training step, against
reference-eager (our re-implementation of the published reference code), torch.compile of the torch backend and
ATen's LSQ ops, in one run on one device. See bench/README.md.

    python bench/run.py [--device cpu|cuda] [--quick] [--json PATH] [--markdown PATH] [--plot PATH]
    python bench/run.py --device cuda --quick --suites e2e --e2e-modes compiled --plan   # what it would run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

# Compile in-process: inductor's worker pool otherwise competes for the (shared) CPU cores while we time.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import contenders as C  # noqa: E402
import harness as H  # noqa: E402
import workloads as W  # noqa: E402

SIZES = {"4K": 1 << 12, "64K": 1 << 16, "1M": 1 << 20, "16M": 1 << 24}
KERNEL_OPS = ("weight_fwd_track", "weight_bwd", "act_fwd", "act_bwd")
OP_TEXT = {"weight_fwd_track": "weight fwd, tracked + freeze + D", "weight_bwd": "weight bwd + dampening",
           "act_fwd": "activation fwd", "act_bwd": "activation bwd", "weightset_step": "MobileNetV2 weight-set step",
           "e2e_train_step": "training step", "copy_bw": "copy bandwidth"}
NOTES = {C.ATEN: "LSQ fake-quant only: no tracking, freezing or dampening (less work than the others)",
         C.REF: "our re-implementation of the published reference code's per-step work",
         C.COMPILED: "torch.compile (inductor, dynamic shapes) of oscqat.ops.reference's raw ops, no autograd",
         C.CPP_OP: "the C++ op called directly (torch.ops.oscqat_C), no autograd: the unit of work of the compile "
                   "contender",
         C.batched("oscqat-cpp"): "the quantizers through oscqat.quantize_weights (QATConfig.batch_weights): one "
                                  "C++ call and one autograd node for all layers"}


def plan(args):
    """Sizes, dtypes and budgets per mode and device."""
    if args.device == "cuda":
        sizes = ["4K", "64K", "1M", "16M"]
        return dict(sizes=sizes, weight_dtypes=["fp32", "bf16"], act_dtypes=["fp32", "bf16"],
                    big_weight_dtypes=["fp32", "bf16"], budget=0.5 if not args.quick else 0.1, min_reps=10,
                    warmup=3, group_min_reps=20, batch=args.batch or 128, res=args.res or 224, compile_skip=None,
                    compile_dtypes=["fp32", "bf16"])
    if args.quick:
        return dict(sizes=["64K", "1M"], weight_dtypes=["fp32"], act_dtypes=["fp32", "bf16"],
                    big_weight_dtypes=["fp32"], budget=0.1, min_reps=3, warmup=1, group_min_reps=3,
                    batch=args.batch or 8, res=args.res or 64,
                    compile_skip="--quick on CPU: inductor takes ~15 s per op and dtype here (run without --quick)",
                    compile_dtypes=[])
    return dict(sizes=["4K", "64K", "1M", "16M"], weight_dtypes=["fp32", "bf16"], act_dtypes=["fp32", "bf16"],
                big_weight_dtypes=["fp32", "bf16"], budget=0.6, min_reps=3, warmup=1, group_min_reps=6,
                batch=args.batch or 8, res=args.res or 160, compile_skip=None, compile_dtypes=["fp32", "bf16"])


SUITES = ("kernels", "weightset", "e2e")
E2E_MODES = ("eager", "compiled")


def e2e_backends(args) -> tuple:
    """The oscqat backends of the end-to-end steps (CPU: the cpp backend only; the torch backend's step is 2-3x
    the float one and would double the run); --e2e-backends narrows them."""
    default = ("triton", "cuda", "torch") if args.device == "cuda" else ("cpp",)
    return tuple(b for b in default if not args.e2e_backends or b in args.e2e_backends)


def kernel_rows(p):
    """(op, dtype name, size) of every kernel row this plan measures, in run order."""
    for op in KERNEL_OPS:
        for dname in (p["weight_dtypes"] if op.startswith("weight") else p["act_dtypes"]):
            for size in p["sizes"]:
                if op.startswith("weight") and size == "16M" and dname not in p["big_weight_dtypes"]:
                    continue
                yield op, dname, size


def e2e_groups(args):
    """(arch, compiled, [(variant, backend or None)]) of every end-to-end group, in run order: the float step
    first, then each backend's variants (compiled: dampen+freeze only)."""
    modes = args.e2e_modes
    for arch in args.e2e_archs:
        for compiled in [m == "compiled" for m in E2E_MODES if m in modes]:
            items = [("fp32", None)]
            for b in e2e_backends(args):
                eager = ("lsq", "dampen+freeze") + ((W.BATCHED_E2E,) if b in ("cpp", "cuda") else ())
                items += [(v, b) for v in (("dampen+freeze",) if compiled else eager)]
            yield arch, compiled, items


def kernel_contenders(args) -> list[str]:
    names = C.contender_names(args.device)
    return [n for n in names if not args.contenders or n in args.contenders]


def weightset_contenders(args) -> list[str]:
    names = C.contender_names(args.device)
    names += [C.batched(C.oscqat_name(b)) for b in ("cpp", "cuda") if C.oscqat_name(b) in names]
    return [n for n in names if not args.contenders or n in args.contenders]


def describe_plan(args) -> dict:
    """What a run with these arguments measures, without measuring (--plan): no device is touched."""
    p = plan(args)
    out = dict(device=args.device, quick=args.quick, suites=list(args.suites), plan=p,
               cuda_available=torch.cuda.is_available())
    if "kernels" in args.suites:
        out["kernel_rows"] = [dict(op=op, dtype=d, size=s, contenders=kernel_contenders(args))
                              for op, d, s in kernel_rows(p)]
    if "weightset" in args.suites:
        out["weightset_contenders"] = weightset_contenders(args)
    if "e2e" in args.suites:
        out["e2e"] = [dict(arch=a, compiled=c, batch=p["batch"], res=p["res"],
                           variants=[f"{v}" + (f" ({b})" if b else "") for v, b in items])
                      for a, c, items in e2e_groups(args)]
    out["measurements"] = (len(out.get("kernel_rows", [])) * len(kernel_contenders(args))
                           + len(out.get("weightset_contenders", []))
                           + sum(len(g["variants"]) for g in out.get("e2e", [])))
    return out


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Runner:
    def __init__(self, args):
        self.args, self.device = args, args.device
        self.p = plan(args)
        self.timer = H.Timer(self.device, warmup=self.p["warmup"], min_reps=self.p["min_reps"],
                             budget_s=self.p["budget"])
        # CPU kernel rows: every sample starts from a trimmed heap (harness.trim_heap_fn)
        self.trim = H.trim_heap_fn() if self.device == "cpu" else None
        self.records: list[dict] = []
        self.compile_spent = 0.0
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------ one measurement
    def _skip_compile(self, base: dict, contender: str) -> None:
        """Raise C.Skip for a compiled contender this mode does not compile."""
        if contender != C.COMPILED:
            return
        why = self.p["compile_skip"]
        if why is None and base.get("dtype") not in self.p["compile_dtypes"]:
            why = f"compile limited to {self.p['compile_dtypes']} in this mode (time budget)"
        if why:
            raise C.Skip(why)

    def _add_bandwidth(self, rec: dict, numel: int | None, bpe: int | None) -> None:
        if numel and bpe:
            gbps = bpe * numel / (rec["median_ms"] * 1e-3) / 1e9
            rec.update(bytes_per_elem=bpe, gbps=gbps,
                       pct_peak_bw=100 * gbps / self.peak_bw if self.peak_bw else None)
            if self.device == "cuda":
                rec["pct_copy_bw"] = 100 * gbps / self.copy_bw

    def measure(self, base: dict, contender: str, build, numel: int | None, bpe: int | None):
        rec = dict(base, contender=contender, status="ok")
        if contender in NOTES:
            rec["note"] = NOTES[contender]
        try:
            self._skip_compile(base, contender)
            fn = build()
            if contender == C.COMPILED:
                rec["first_call_s"] = round(C.first_call(fn, f"{base['workload']} {base['dtype']} {base['size']}"), 3)
            self.timer.mem = (None, "not measured")
            samples = self.timer.time(fn, mem_probe=H.peak_memory_probe(self.device))
            rec.update(H.summarize(samples))
            self._add_bandwidth(rec, numel, bpe)
            rec["peak_mem_mb"], rec["mem_method"] = self.timer.mem   # measured on the last warm-up call
            del fn
        except C.Skip as e:
            rec.update(status="skipped", reason=str(e))
        except Exception as e:  # noqa: BLE001 -- a failing contender is a result, not a crash
            rec.update(status="error", reason=f"{type(e).__name__}: {str(e)[:400]}")
            if self.args.verbose:
                traceback.print_exc()
        self.records.append(rec)
        ms = f"{rec['median_ms']:.3f} ms" if rec["status"] == "ok" else f"{rec['status']}: {rec.get('reason', '')[:90]}"
        log(f"[{time.perf_counter() - self.t0:6.1f}s] {base['workload']:<17} {base.get('dtype', ''):<5} "
            f"{base.get('size', ''):<4} {contender:<32} {ms}")
        return rec

    # ------------------------------------------------------------ suites
    def run(self):
        H.sync(self.device)
        self.meta = self.metadata()
        self.copy_bw = H.copy_bandwidth_gbps(self.device, 512 if self.device == "cuda" else 256)
        datasheet = H.peak_bw_gbps(self.meta["device_name"]) if self.device == "cuda" else None
        if datasheet:
            self.peak_bw, src = datasheet, "datasheet peak for this device name (bench/harness.py PEAK_BW_GBPS)"
        else:
            self.peak_bw, src = self.copy_bw, "STREAM-like copy (dst.copy_(src), 256 MB, read+write) measured in this run"
        self.meta.update(copy_bw_gbps=round(self.copy_bw, 2), peak_bw_gbps=round(self.peak_bw, 2), peak_bw_source=src)
        log(f"device: {self.meta['device_name']}; copy {self.copy_bw:.1f} GB/s; peak used {self.peak_bw:.1f} GB/s ({src})")
        if "kernels" in self.args.suites:
            self.kernels(kernel_contenders(self.args))
        if "weightset" in self.args.suites:
            self.weightset(weightset_contenders(self.args))
        if "e2e" in self.args.suites:
            self.e2e()
        self.meta["loadavg_end"] = H.loadavg()
        self.meta["uptime_end"] = H.uptime()
        self.meta["wall_s"] = round(time.perf_counter() - self.t0, 1)
        self.meta["compile_log"] = C.COMPILE_LOG
        self.meta["backends_available_at_end"] = {
            b: __import__("oscqat").backend.available(b, self.device) for b in C.OSCQAT_BACKENDS}
        add_ratios(self.records)
        return self.meta, self.records, targets(self.records, self.device)

    def kernels(self, names):
        p = self.p
        for op, dname, size in kernel_rows(p):
            dtype = W.DTYPES[dname]
            numel = SIZES[size]
            case = (W.WeightCase if op.startswith("weight") else W.ActCase)(numel, dtype, self.device)
            build = W.build_weight if op.startswith("weight") else W.build_act
            base = dict(workload=op, dtype=dname, size=size, numel=numel)
            # interleaved: on a shared machine the load drifts; each row's ratios come from one window
            self.measure_group([(base, name, (lambda name=name, case=case, op=op: build(name, op, case, self.device)))
                                for name in names], numel, W.bytes_per_elem(op, dtype), p["min_reps"],
                               before=self.trim)
            del case

    def measure_group(self, items, numel=None, bpe=None, min_reps=None, before=None):
        """items: [(base, contender, build)]. Built first, then timed interleaved (round-robin)."""
        fns, recs = {}, {}
        for base, contender, build in items:
            rec = dict(base, contender=contender, status="ok")
            if contender in NOTES:
                rec["note"] = NOTES[contender]
            try:
                self._skip_compile(base, contender)
                fn = build()
                if contender == C.COMPILED or base.get("compiled"):
                    rec["first_call_s"] = round(C.first_call(
                        fn, f"{base['workload']} {base.get('arch', '')} {base.get('dtype', '')} {base['size']}"), 3)
                fns[contender] = fn
            except C.Skip as e:
                rec.update(status="skipped", reason=str(e))
            except Exception as e:  # noqa: BLE001
                rec.update(status="error", reason=f"{type(e).__name__}: {str(e)[:400]}")
                if self.args.verbose:
                    traceback.print_exc()
            recs[contender] = rec
        if fns:
            try:
                samples, mem = self.timer.time_interleaved(fns, H.peak_memory_probe(self.device), min_reps, before)
                for name, smp in samples.items():
                    rec = recs[name]
                    rec.update(H.summarize(smp))
                    rec["peak_mem_mb"], rec["mem_method"] = mem.get(name, (None, "not measured"))
                    rec["timing"] = "interleaved round-robin with the other contenders of this workload" + \
                        ("; heap trimmed (malloc_trim) before every sample" if before is not None else "")
                    self._add_bandwidth(rec, numel, bpe)
            except Exception as e:  # noqa: BLE001
                for name in fns:
                    recs[name].update(status="error", reason=f"{type(e).__name__}: {str(e)[:400]}")
        fns.clear()
        for rec in recs.values():
            self.records.append(rec)
            ms = f"{rec['median_ms']:.3f} ms" if rec["status"] == "ok" else \
                f"{rec['status']}: {rec.get('reason', '')[:90]}"
            log(f"[{time.perf_counter() - self.t0:6.1f}s] {rec['workload']:<17} {rec.get('size', ''):<6} "
                f"{rec['contender']:<32} {ms}")

    def weightset(self, names):
        case = W.WeightSetCase(self.device)
        self.meta["weightset"] = dict(layers=case.n_layers, numel=case.numel)
        base = dict(workload="weightset_step", dtype="fp32", size=f"{case.numel / 1e6:.2f}M", numel=case.numel)
        if self.device == "cuda":
            self.measure_group([(base, name, (lambda name=name: W.build_weightset(name, case, self.device)))
                                for name in names], case.numel, W.bytes_per_elem("weightset_step", torch.float32),
                               self.p["group_min_reps"])
            return
        # CPU: every contender at 1 thread and at all the machine's cores, and the copy bandwidth at both, timed
        # round-robin in one group, so that each "% of copy" divides numbers from the same window of load.
        home = torch.get_num_threads()
        counts = sorted({1, os.cpu_count() or 1})
        n = (256 << 20) // 4
        src = torch.randn(n)
        dst = torch.empty_like(src)
        items = []
        for k in counts:
            items.append((dict(workload="copy_bw", dtype="fp32", size="256MB", numel=n, threads=k), f"copy {k}t",
                          (lambda k=k: _threads(k, lambda: dst.copy_(src)))))
            for name in names:
                items.append((dict(base, threads=k), f"{name} {k}t",
                              (lambda name=name, k=k: _threads(k, W.build_weightset(name, case, self.device)))))
        self.measure_group(items, case.numel, W.bytes_per_elem("weightset_step", torch.float32),
                           self.p["group_min_reps"])
        torch.set_num_threads(home)
        recs = [r for r in self.records if r["workload"] in ("copy_bw", "weightset_step")]
        for r in recs:
            r["contender"] = r["contender"].rsplit(" ", 1)[0]
        copy = {r["threads"]: 2 * n * 4 / (r["median_ms"] * 1e-3) / 1e9 for r in recs
                if r["workload"] == "copy_bw" and r["status"] == "ok"}
        for r in recs:
            if r["workload"] == "copy_bw" and r["status"] == "ok":
                r.update(gbps=copy[r["threads"]], bytes_per_elem=8, pct_copy_bw=100.0)
                r.pop("pct_peak_bw", None)
            elif r["status"] == "ok" and r.get("threads") in copy:
                r["pct_copy_bw"] = 100 * r["gbps"] / copy[r["threads"]]
        self.meta["weightset"]["copy_gbps_by_threads"] = copy

    def e2e(self):
        p = self.p
        self.meta["e2e"] = dict(batch=p["batch"], res=p["res"],
                                models=[f"torchvision.models.{a}()" for a in self.args.e2e_archs],
                                config="W4A4 per-tensor, 8-bit first/last, SGD",
                                compiled=(f"the model under torch.compile (inductor, layout_optimization="
                                          f"{torch._inductor.config.layout_optimization}, cpp_wrapper="
                                          f"{torch._inductor.config.cpp_wrapper})"
                                          if "compiled" in self.args.e2e_modes else "no"),
                                modes=list(self.args.e2e_modes), backends=list(e2e_backends(self.args)))
        for arch, compiled, variants in e2e_groups(self.args):
            base = dict(workload="e2e_train_step", dtype="fp32", size=f"b{p['batch']}x{p['res']}", arch=arch,
                        compiled=compiled)
            tag = f"{arch}{' compiled' if compiled else ''}"
            items = []
            for variant, b in variants:
                name = f"{tag} fp32" if b is None else f"{tag} oscqat-{b}/{variant}"
                items.append((dict(base, variant=variant, backend=b), name,
                              (lambda b=b, variant=variant, arch=arch, compiled=compiled:
                               W.build_e2e(variant, b, self.device, p["batch"], p["res"], arch, compiled))))
            self.measure_group(items, min_reps=p["group_min_reps"])

    def metadata(self):
        return dict(device=self.device, device_name=H.device_name(self.device), versions=H.versions(),
                    date=H.now_iso(), loadavg_start=H.loadavg(), uptime_start=H.uptime(),
                    torch_threads=torch.get_num_threads(),
                    quick=self.args.quick, command=" ".join(_env_prefix() + ["python", "bench/run.py"] + sys.argv[1:]),
                    plan={k: v for k, v in self.p.items()},
                    bytes_model={k: v[0] for k, v in W.BYTES_MODEL.items()},
                    settings=dict(weight_bits=W.W_BITS, act_bits=4, momentum=C.MOMENTUM, f_th=C.F_TH,
                                  dampening_lambda=C.LAMBDA, per_tensor=True))


# ================================================================ ratios and targets
def _key(r):
    return (r["workload"], r.get("dtype"), r.get("size"), r.get("threads"))


def _threads(k: int, fn):
    """fn, run with k torch threads (the weight-set group alternates thread counts call by call)."""
    def run():
        torch.set_num_threads(k)
        return fn()
    return run


def add_ratios(records):
    """Per workload: the fastest oscqat backend, and how many times faster it is than each contender."""
    groups: dict = {}
    for r in records:
        if r["workload"] not in ("e2e_train_step", "copy_bw"):
            groups.setdefault(_key(r), []).append(r)
    for rs in groups.values():
        ok = [r for r in rs if r["status"] == "ok"]
        ours = [r for r in ok if C.is_oscqat_backend(r["contender"])]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["median_ms"])
        op = next((r for r in ok if r["contender"] == C.CPP_OP), None)
        for r in ok:
            r["best_oscqat"] = best["contender"]
            r["best_oscqat_speedup"] = r["median_ms"] / best["median_ms"]
            if op is not None:
                r["cpp_op_speedup"] = r["median_ms"] / op["median_ms"]
    e2e = [r for r in records if r["workload"] == "e2e_train_step" and r["status"] == "ok"]
    for r in e2e:
        same = [x for x in e2e if x.get("arch") == r.get("arch") and x.get("compiled") == r.get("compiled")]
        fp32 = next((x for x in same if x["variant"] == "fp32"), None)
        if fp32:
            r["ratio_vs_fp32"] = r["median_ms"] / fp32["median_ms"]
        if r["variant"] == "dampen+freeze":
            lsq = next((x for x in same if x["variant"] == "lsq" and x["backend"] == r["backend"]), None)
            if lsq:
                r["ratio_vs_lsq"] = r["median_ms"] / lsq["median_ms"]


def _find(records, workload, contender, dtype=None, size=None):
    for r in records:
        if r["workload"] == workload and r["contender"] == contender and r["status"] == "ok" \
                and (dtype is None or r.get("dtype") == dtype) and (size is None or r.get("size") == size):
            return r
    return None


def targets(records, device):
    out = []

    def add(name, value, goal, met, detail=""):
        out.append(dict(target=name, value=value, goal=goal, met=met, detail=detail))

    ws = [r for r in records if r["workload"] == "weightset_step" and r["status"] == "ok"]
    best = min((r for r in ws if C.is_oscqat_backend(r["contender"])), key=lambda r: r["median_ms"], default=None)
    if device == "cuda":
        for op in KERNEL_OPS:
            for dname in ("fp32", "bf16"):
                rs = [r for r in records if r["workload"] == op and r.get("dtype") == dname and r.get("size") == "16M"
                      and r["status"] == "ok" and C.is_oscqat_backend(r["contender"])]
                if rs:
                    b = min(rs, key=lambda r: r["median_ms"])
                    add(f"{op} {dname} 16M: % peak HBM BW ({b['contender']})", b.get("pct_peak_bw"), ">= 85",
                        b.get("pct_peak_bw") is not None and b["pct_peak_bw"] >= 85)
        for other, goal in ((C.REF, 10.0), (C.COMPILED, 2.0), (C.ATEN, 2.0)):
            r = next((x for x in ws if x["contender"] == other), None)
            v = r["best_oscqat_speedup"] if r and "best_oscqat_speedup" in r else None
            add(f"weight-set step: best oscqat ({best['contender'] if best else '-'}) vs {other}", v, f">= {goal}x",
                v is not None and v >= goal)
        for r in records:
            if r["workload"] == "e2e_train_step" and "ratio_vs_lsq" in r:
                add(f"e2e {r['contender']} / lsq", r["ratio_vs_lsq"], "<= 1.05x", r["ratio_vs_lsq"] <= 1.05)
    else:
        for r in (x for x in ws if x["contender"] in ("oscqat-cpp", C.batched("oscqat-cpp"), C.CPP_OP)
                  and "pct_copy_bw" in x):
            add(f"CPU weight-set step, {r['contender']}, {r['threads']} thread(s): % of the copy bandwidth at "
                f"the same thread count", r["pct_copy_bw"], ">= 60", r["pct_copy_bw"] >= 60)
        cpp, tb = _find(records, "weightset_step", "oscqat-cpp"), _find(records, "weightset_step", "oscqat-torch")
        if cpp and tb:
            v = tb["median_ms"] / cpp["median_ms"]
            add("CPU weight-set step: oscqat-cpp vs oscqat-torch (1 thread)", v, ">= 3x", v >= 3)
        kern = [r for r in records if r["workload"] in KERNEL_OPS and r["contender"] == C.COMPILED
                and r["status"] == "ok"]
        for who, field in ((C.CPP_OP, "cpp_op_speedup"), ("oscqat-cpp (library path, autograd)", "best_oscqat_speedup")):
            vals = [r[field] for r in kern if field in r]
            if vals:
                add(f"kernel rows: {who} vs torch.compile(torch-backend), worst row of {len(vals)}", min(vals),
                    ">= 1x on every row", min(vals) >= 1,
                    f"{sum(v >= 1 for v in vals)} of {len(vals)} rows met")
        for r in records:
            if r["workload"] == "e2e_train_step" and r.get("variant") in ("dampen+freeze", W.BATCHED_E2E) \
                    and "ratio_vs_fp32" in r:
                goal = 1.3 if r.get("compiled") else 1.5
                add(f"e2e {r['contender']} / fp32", r["ratio_vs_fp32"], f"< {goal}x", r["ratio_vs_fp32"] < goal)
        add("GPU targets (kernels >= 85% HBM BW at 16M; weight-set >= 10x reference-eager, >= 2x compile, "
            ">= 2x ATen; e2e dampen+freeze <= 1.05x lsq)", None, "see README", None,
            "owed: not measurable on a CPU run; run `python bench/run.py --device cuda`")
    return out


# ================================================================ output
def fmt(v, nd=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.{nd}f}" if abs(v) >= 0.01 else f"{v:.2g}"
    return str(v)


def _env_prefix() -> list:
    """The environment settings that change timings (allocator, threads), as they would prefix the command."""
    keys = sorted(k for k in os.environ if k.startswith(("MALLOC_", "OMP_", "KMP_", "LD_PRELOAD", "TORCHINDUCTOR_")))
    return [f"{k}={os.environ[k]}" for k in keys]


def markdown(meta, records, tgts) -> str:
    L = []
    m = meta
    L.append(f"# oscqat benchmark results ({m['device']})\n")
    L.append(f"Command: `{m['command']}`  ")
    L.append(f"Date: {m['date']}; wall {m.get('wall_s')} s; load average at start {m['loadavg_start']}, "
             f"at end {m.get('loadavg_end')}  ")
    L.append(f"`uptime` at start: `{m.get('uptime_start')}`; at end: `{m.get('uptime_end')}`  ")
    v = m["versions"]
    L.append(f"Device: {m['device_name']}; torch {v['torch']}, triton {v['triton']}, python {v['python']}, "
             f"git {v.get('git_commit')}  ")
    L.append(f"Memory bandwidth: copy {m['copy_bw_gbps']} GB/s measured in this run; % of peak uses "
             f"{m['peak_bw_gbps']} GB/s = {m['peak_bw_source']}.  ")
    s = m["settings"]
    L.append(f"Settings: W{s['weight_bits']}A{s['act_bits']} per-tensor, momentum {s['momentum']}, f_th {s['f_th']}, "
             f"dampening upstream gradient {s['dampening_lambda']}. Times are medians (p25–p75 in the JSON).\n")
    L.append("Contenders: `reference-eager` = our re-implementation of the published reference code's per-step work "
             "(not their code); `aten-lsq` = `torch._fake_quantize_learnable_per_tensor_affine`, LSQ only, **no "
             "tracking/freezing/dampening**; `torch.compile(torch-backend)` = inductor on oscqat.ops.reference's raw ops. "
             "Speedup = contender time / time of the fastest oscqat backend (>1: oscqat faster).\n")

    # kernels pivot
    kern = [r for r in records if r["workload"] in KERNEL_OPS]
    if kern:
        names = list(dict.fromkeys(r["contender"] for r in kern))
        L.append("## Kernels: median ms (effective GB/s from the bytes model)\n")
        if any("heap trimmed" in r.get("timing", "") for r in kern):
            L.append("Every sample starts from a trimmed heap (glibc `malloc_trim(0)`, untimed), so that no contender's "
                     "big output reuses pages another one freed.\n")
        others = [n for n in names if not C.is_oscqat_backend(n) and n != C.CPP_OP]
        L.append("| op | dtype | size | " + " | ".join(names) + " | best oscqat | speedup vs " + ", ".join(others) +
                 " | compile / cpp op |")
        L.append("|" + "---|" * (len(names) + 6))
        for key in dict.fromkeys(_key(r) for r in kern):
            rs = {r["contender"]: r for r in kern if _key(r) == key}
            cells = []
            for n in names:
                r = rs.get(n)
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    cells.append(r["status"])
                else:
                    cells.append(f"{fmt(r['median_ms'], 3)} ({fmt(r.get('gbps'), 1)})")
            any_ok = next((r for r in rs.values() if "best_oscqat" in r), None)
            sp = ", ".join(fmt(rs[n].get("best_oscqat_speedup")) + "x" if n in rs and rs[n]["status"] == "ok" else "–"
                           for n in others)
            comp = rs.get(C.COMPILED, {})
            L.append(f"| {OP_TEXT[key[0]]} | {key[1]} | {key[2]} | " + " | ".join(cells) +
                     f" | {any_ok['best_oscqat'] if any_ok else '–'} | {sp} | "
                     f"{fmt(comp['cpp_op_speedup']) + 'x' if 'cpp_op_speedup' in comp else '–'} |")
        L.append("")
    L.append(weightset_table(records, meta))
    L.append(e2e_table(records, meta))
    L.append("## Targets\n")
    L.append("| target | value | goal | met |")
    L.append("|---|---|---|---|")
    for t in tgts:
        L.append(f"| {t['target']} | {fmt(t['value'])} | {t['goal']} | "
                 f"{'–' if t['met'] is None else ('yes' if t['met'] else 'NO')} {t['detail']} |")
    L.append("")
    bad = [r for r in records if r["status"] != "ok"]
    if bad:
        L.append("## Skipped / failed\n")
        for r in bad:
            L.append(f"- {r['workload']} {r.get('dtype', '')} {r.get('size', '')} `{r['contender']}`: "
                     f"{r['status']}: {r.get('reason')}")
        L.append("")
    if meta.get("compile_log"):
        L.append("## torch.compile first calls (compile time included)\n")
        L.append(", ".join(f"{c['what']}: {c['first_call_s']} s" for c in meta["compile_log"]) + "\n")
    L.append("## Bytes model (per element, e = element size)\n")
    L.append("| op | bytes | fp32 | bf16 |")
    L.append("|---|---|---|---|")
    for k, (text, f) in W.BYTES_MODEL.items():
        L.append(f"| {k} | {text} | {f(4)} | {f(2)} |")
    return "\n".join(L) + "\n"


def weightset_table(records, meta) -> str:
    ws = [r for r in records if r["workload"] in ("weightset_step", "copy_bw")]
    if not ws:
        return ""
    info = meta.get("weightset", {})
    L = [f"## MobileNetV2 weight set, one QAT step ({info.get('layers')} tensors, {info.get('numel')} weights; "
         "tracked fwd + freeze + D, bwd + dampening)\n",
         "All rows (both thread counts, and the copy) timed round-robin in one group. % copy BW: effective GB/s "
         "over the copy's GB/s at the same thread count.\n",
         "| contender | threads | median ms | p25–p75 ms | GB/s | % copy BW | peak mem MB | best oscqat speedup |",
         "|---|---|---|---|---|---|---|---|"]
    for r in ws:
        if r["status"] != "ok":
            L.append(f"| {r['contender']} | {r.get('threads', '')} | {r['status']}: {r.get('reason', '')[:80]} "
                     f"| | | | | |")
            continue
        sp = fmt(r.get("best_oscqat_speedup")) + "x" if "best_oscqat_speedup" in r else ""
        L.append(f"| {r['contender']} | {r.get('threads', '')} | {fmt(r['median_ms'])} | "
                 f"{fmt(r['p25_ms'])}–{fmt(r['p75_ms'])} | {fmt(r.get('gbps'), 1)} | "
                 f"{fmt(r.get('pct_copy_bw', r.get('pct_peak_bw')), 1)} | {fmt(r.get('peak_mem_mb'), 1)} | {sp} |")
    return "\n".join(L) + "\n"


def e2e_table(records, meta) -> str:
    e = [r for r in records if r["workload"] == "e2e_train_step"]
    if not e:
        return ""
    info = meta.get("e2e", {})
    L = [f"## End-to-end training step, torchvision models (batch {info.get('batch')} at "
         f"{info.get('res')}x{info.get('res')}, {info.get('config')}; torch.compile: {info.get('compiled')})\n",
         "Each model's (and mode's) variants timed round-robin in one group.\n",
         "| variant | median ms | p25–p75 ms | vs fp32 | dampen+freeze / lsq | peak mem MB |",
         "|---|---|---|---|---|---|"]
    for r in e:
        if r["status"] != "ok":
            L.append(f"| {r['contender']} | {r['status']}: {r.get('reason', '')[:80]} | | | | |")
            continue
        L.append(f"| {r['contender']} | {fmt(r['median_ms'])} | {fmt(r['p25_ms'])}–{fmt(r['p75_ms'])} | "
                 f"{fmt(r.get('ratio_vs_fp32'))}x | {fmt(r.get('ratio_vs_lsq')) + 'x' if 'ratio_vs_lsq' in r else ''} | "
                 f"{fmt(r.get('peak_mem_mb'), 1)} |")
    L.append(f"\nPeak memory: {next((r['mem_method'] for r in e if r.get('mem_method')), 'N/A')}.\n")
    return "\n".join(L) + "\n"


def plot(meta, records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    kern = [r for r in ok if r["workload"] in KERNEL_OPS]
    panels = []
    for op in KERNEL_OPS:
        for d in ("fp32", "bf16"):
            rs = [r for r in kern if r["workload"] == op and r["dtype"] == d]
            if rs:
                big = max(rs, key=lambda r: r["numel"])["size"]
                panels.append((f"{OP_TEXT[op]}, {d}, {big}", [r for r in rs if r["size"] == big]))
    panels.append(("MobileNetV2 weight-set QAT step", [r for r in ok if r["workload"] == "weightset_step"]))
    panels.append(("training steps (torchvision)", [r for r in ok if r["workload"] == "e2e_train_step"]))
    panels = [p for p in panels if p[1]]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, rs) in zip(axes.flat, panels):
        labels = [r["contender"] + (f" {r['threads']}t" if r.get("threads") else "") for r in rs]
        vals = [r["median_ms"] for r in rs]
        colors = ["tab:green" if C.is_oscqat_backend(x) else "tab:gray" for x in labels]
        ax.barh(range(len(rs)), vals, color=colors)
        ax.set_yticks(range(len(rs)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("median ms (log)", fontsize=8)
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {fmt(v)}", va="center", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"oscqat bench, {meta['device_name'][:70]}, {meta['date']}, load {meta['loadavg_start']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes and budgets (CPU: under a minute)")
    ap.add_argument("--json", help="write one record per (workload, contender) here")
    ap.add_argument("--markdown", help="write the markdown tables here")
    ap.add_argument("--plot", help="write a bar chart (PNG) here")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (CPU default 1: the cores are shared, see README)")
    ap.add_argument("--batch", type=int, default=None, help="end-to-end batch size")
    ap.add_argument("--res", type=int, default=None, help="end-to-end input resolution")
    ap.add_argument("--skip-kernels", action="store_true", help="only the weight-set and end-to-end steps")
    ap.add_argument("--e2e-compile", action="store_true",
                    help="also time the end-to-end steps with the model under torch.compile (minutes of compiling)")
    ap.add_argument("--no-layout-opt", action="store_true",
                    help="torch._inductor.config.layout_optimization = False for --e2e-compile (on CPU inductor's "
                         "channels-last conversion slows both the float and the QAT step)")
    ap.add_argument("--cpp-wrapper", action="store_true",
                    help="torch._inductor.config.cpp_wrapper = True for --e2e-compile (the compiled graphs' wrapper "
                         "in C++ instead of Python; compiling takes minutes longer)")
    ap.add_argument("--e2e-archs", default=",".join(W.E2E_ARCHS),
                    help="comma-separated torchvision models of the end-to-end steps (default: "
                         f"{','.join(W.E2E_ARCHS)})")
    ap.add_argument("--suites", default=",".join(SUITES),
                    help=f"comma-separated suites to run, in this order: {', '.join(SUITES)} (default: all)")
    ap.add_argument("--contenders", default="",
                    help="comma-separated contender names: only these in the kernel rows and the weight set "
                         "(default: every contender of the device)")
    ap.add_argument("--e2e-modes", default=None,
                    help="comma-separated end-to-end modes: eager, compiled (default: eager, plus compiled with "
                         "--e2e-compile)")
    ap.add_argument("--e2e-backends", default="",
                    help="comma-separated oscqat backends of the end-to-end steps (default: triton,cuda,torch on "
                         "cuda, cpp on cpu)")
    ap.add_argument("--plan", action="store_true",
                    help="print what would be measured (JSON) and exit without measuring; needs no GPU, also "
                         "with --device cuda (bench/gpu_check.py --dry-run)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    def _list(value, choices, flag):
        got = [a.strip() for a in value.split(",") if a.strip()]
        bad = [a for a in got if a not in choices]
        if bad:
            ap.error(f"{flag}: choose from {', '.join(choices)}, got {', '.join(bad)}")
        return got

    args.e2e_archs = _list(args.e2e_archs, W.E2E_ARCHS, "--e2e-archs")
    args.suites = _list(args.suites, SUITES, "--suites")
    if args.skip_kernels:
        args.suites = [s for s in args.suites if s != "kernels"]
    every = C.contender_names(args.device) + [C.batched(C.oscqat_name(b)) for b in ("cpp", "cuda")]
    args.contenders = _list(args.contenders, every, "--contenders")
    if args.e2e_modes is None:
        args.e2e_modes = ["eager"] + (["compiled"] if args.e2e_compile else [])
    else:
        args.e2e_modes = _list(args.e2e_modes, E2E_MODES, "--e2e-modes")
    args.e2e_compile = "compiled" in args.e2e_modes
    args.e2e_backends = _list(args.e2e_backends, C.OSCQAT_BACKENDS, "--e2e-backends")
    if args.plan:
        print(json.dumps(describe_plan(args), indent=1))
        if args.device == "cuda" and not torch.cuda.is_available():
            log("run.py --plan: no CUDA device here; the plan above is what a GPU run would measure")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.no_layout_opt:
        torch._inductor.config.layout_optimization = False
    if args.cpp_wrapper:
        torch._inductor.config.cpp_wrapper = True
    torch.manual_seed(0)
    meta, records, tgts = Runner(args).run()
    md = markdown(meta, records, tgts)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "records": records, "targets": tgts}, f, indent=1, default=str)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(md)
    if args.plot:
        plot(meta, records, args.plot)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
