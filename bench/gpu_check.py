"""The whole GPU path in one command, within 8 minutes on one NVIDIA GPU (H100/H200): build, parity, benchmarks.

    bash bench/gpu_check.sh [--dry-run] [--results DIR] [--stages NAME,...] [--commit SHA] [--jobs N] [--list]

(`bench/gpu_check.sh` finds a Python with torch and runs this file.) STAGES below is the one table of the stages
and their budgets. Stages of one group run at the same time (they share the GPU; none of them times anything);
groups run one after the other, each stage killed (its whole process group) at its budget, and the run as a
whole at TOTAL_BUDGET_S. The parity groups come first and the slowest benchmarks last, so a run cut short still
returns the parity results. tests/test_gpu_check.py checks that the groups' budgets add up to at most
TOTAL_BUDGET_S and runs the dry run.

Everything goes to one folder, bench/results/gpu/<UTC date>_<commit>_<gpu>/ (or --results): machine.json
(GPU, driver, CUDA, versions, commit, command, every stage's command, budget, time and status), logs/<stage>.log,
junit_<stage>.xml (pytest), bench_<stage>.json/.md (bench/run.py), summary.md (the table printed at the end).
Where $OUT is set (the device machine), summary.md, machine.json and a .tar.gz of the folder are copied there
after every group, so that a run cut off from outside still returns what it has.

Exit status: 0 when every parity stage (build, parity-cuda, parity-triton, gpu-path, gpu-path-compiled) passed
(a benchmark stage that timed out or failed is reported, not a failure); 1 when one failed, timed out or did not
run; 2 on bad arguments or no GPU without --dry-run. `--dry-run` (CI, on the CPU): every stage's plan, imports and
argument parsing (pytest --collect-only, bench/run.py --plan, setup.py's build plan, two triton warm-up cases in
the interpreter), the GPU work skipped and said so; 0 when all of that works.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "bench")
TOTAL_BUDGET_S = 480            # 8 minutes on one H100, the build included
RESERVE_S = 5                   # of TOTAL_BUDGET_S, kept for the summary and the copies to $OUT
DRY_BUDGET_FACTOR = 10          # a dry run (CPU, often a shared one) times nothing: its stages get 10x the time


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    group: str          # stages of one group run at the same time; groups in table order
    budget_s: int       # killed at this many seconds
    kind: str           # env | build | warm | pytest | bench
    parity: bool        # not passing fails the check (exit status 1)
    what: str


STAGES = (
    Stage("env", "env", 20, "env", False,
          "machine facts: nvidia-smi (GPU, driver), torch/CUDA/triton/torchvision versions, nvcc, compute capability"),
    Stage("build", "build", 125, "build", True,
          "pip install --no-build-isolation --no-deps --no-index -e . with TORCH_CUDA_ARCH_LIST=<this GPU's compute "
          "capability only> and MAX_JOBS=<cores>; then oscqat._C must hold CUDA kernels with SASS for this GPU"),
    Stage("warm-triton", "build", 125, "warm", False,
          "while the extension builds: the triton kernels of every parity case, compiled into Triton's cache by "
          "parallel processes (the tests would compile ~400 of them one by one)"),
    Stage("parity-cuda", "parity", 140, "pytest", True,
          "pytest tests/test_cpp_parity.py -k cuda: the cuda backend against the reference on the GPU"),
    Stage("parity-triton", "parity", 140, "pytest", True,
          "pytest tests/test_triton_parity.py: the compiled triton kernels against the reference on the GPU, "
          "large tensors, no host sync, torch.compile of the triton backend"),
    Stage("gpu-path", "parity", 140, "pytest", True,
          "pytest tests/test_gpu_path.py tests/test_training_parity.py -k 'not compiled': cuda and triton "
          "against the reference backend on the GPU in training steps (fp32, AMP bf16), batched weights, the "
          "deferred non-finite and weight-changed checks; 30 steps ending with identical integers and states"),
    Stage("gpu-path-compiled", "parity", 140, "pytest", True,
          "pytest tests/test_gpu_path.py -k compiled: the model under torch.compile (inductor) on cuda and "
          "triton against eager steps of the reference backend"),
    Stage("warm-compile", "parity", 140, "warm", False,
          "inductor's caches for the benchmarks: bench/run.py's compiled contenders and compiled end-to-end "
          "steps once (timings discarded)"),
    Stage("bench-kernels", "bench-kernels", 80, "bench", False,
          "bench/run.py --quick --suites kernels,weightset: every kernel row (4 ops, fp32 and bf16, 4K..16M) "
          "against inductor, ATen's LSQ and reference-eager, and % of the copy bandwidth of the same run; the "
          "MobileNetV2 weight set"),
    Stage("bench-e2e-eager", "bench-e2e-eager", 40, "bench", False,
          "bench/run.py --suites e2e: W4A4 lsq and dampen+freeze steps of mobilenet_v2 and resnet18 (batch 128 "
          "at 224) against the float step, eager, triton and cuda backends"),
    Stage("bench-e2e-compiled-mobilenet_v2", "bench-e2e-compiled-mobilenet_v2", 35, "bench", False,
          "bench/run.py --suites e2e --e2e-modes compiled: mobilenet_v2's dampen+freeze step (triton) against "
          "the float step, both under torch.compile"),
    Stage("bench-e2e-compiled-resnet18", "bench-e2e-compiled-resnet18", 35, "bench", False,
          "the same for resnet18"),
)

PYTEST_SELECTION = {
    "parity-cuda": (["tests/test_cpp_parity.py"], "cuda"),
    "parity-triton": (["tests/test_triton_parity.py"], None),
    "gpu-path": (["tests/test_gpu_path.py", "tests/test_training_parity.py"], "not compiled"),
    "gpu-path-compiled": (["tests/test_gpu_path.py"], "compiled"),
}
BENCH_ARGS = {
    "warm-compile": ["--suites", "kernels,weightset,e2e", "--contenders", "torch.compile(torch-backend)",
                     "--e2e-modes", "compiled", "--e2e-backends", "triton"],
    "bench-kernels": ["--suites", "kernels,weightset"],
    "bench-e2e-eager": ["--suites", "e2e", "--e2e-modes", "eager", "--e2e-backends", "triton,cuda"],
    "bench-e2e-compiled-mobilenet_v2": ["--suites", "e2e", "--e2e-modes", "compiled", "--e2e-backends", "triton",
                                        "--e2e-archs", "mobilenet_v2"],
    "bench-e2e-compiled-resnet18": ["--suites", "e2e", "--e2e-modes", "compiled", "--e2e-backends", "triton",
                                    "--e2e-archs", "resnet18"],
}


def groups(stages=STAGES) -> list[list[Stage]]:
    """The stages by group, groups in table order."""
    out: dict[str, list[Stage]] = {}
    for s in stages:
        out.setdefault(s.group, []).append(s)
    return list(out.values())


def critical_path_s(stages=STAGES) -> int:
    """What the stage budgets add up to: each group lasts as long as its longest budget."""
    return sum(max(s.budget_s for s in g) for g in groups(stages))


# ====================================================================== running stages
@dataclasses.dataclass
class Planned:
    """One stage as it will run: its steps (argv lists, run one after the other within the budget)."""
    stage: Stage
    steps: list
    env: dict
    log: str
    note: str = ""              # said before it runs (e.g. what a dry run skips)


@dataclasses.dataclass
class Result:
    name: str
    group: str
    budget_s: int
    parity: bool
    status: str                 # ok | failed | timeout | not run | dry-run ok | dry-run failed
    wall_s: float
    rc: int | None
    log: str
    commands: list
    detail: str = ""
    data: dict = dataclasses.field(default_factory=dict)


_LIVE: set = set()         # stage processes running now (ended by the signal handler too)


def _kill(proc: subprocess.Popen) -> None:
    """End a stage's process and everything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_group(planned: list[Planned], deadline: float, say=print, factor: float = 1.0) -> list[Result]:
    """Run the stages of one group at the same time; each ends at its budget (x `factor`) or at `deadline`
    (time.monotonic)."""
    state = []
    for p in planned:
        os.makedirs(os.path.dirname(p.log), exist_ok=True)
        end = min(time.monotonic() + p.stage.budget_s * factor, deadline)
        state.append(dict(p=p, step=0, proc=None, t0=time.monotonic(), t1=None, end=end, rc=None, status=None,
                          fh=open(p.log, "a", buffering=1)))
        if p.note:
            say(f"gpu_check: {p.stage.name}: {p.note}")
        left = end - time.monotonic()
        say(f"gpu_check: {p.stage.name}: started (budget {p.stage.budget_s} s"
            + (f", x{factor:g} in a dry run" if factor != 1 else "")
            + (f", cut to {max(0, left):.0f} s by the total budget" if left < p.stage.budget_s * factor - 0.5 else "")
            + ")")

    def start(s):
        p = s["p"]
        argv = p.steps[s["step"]]
        s["fh"].write(f"$ {' '.join(shlex.quote(a) for a in argv)}\n")
        env = {k: v for k, v in os.environ.items() if k not in p.env or p.env[k] is not None}
        env.update({k: v for k, v in p.env.items() if v is not None})
        try:
            # its own process group (killed as a whole at the budget), in our session (so whatever ends this
            # session's processes, e.g. the device machine after a command, ends it too)
            s["proc"] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=s["fh"], stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=os.setpgrp)
            _LIVE.add(s["proc"])
        except OSError as e:
            s["fh"].write(f"gpu_check: cannot start: {e}\n")
            s.update(rc=127, status="failed", t1=time.monotonic())

    for s in state:
        if s["p"].steps:
            start(s)
        else:
            s.update(rc=0, status="ok", t1=time.monotonic())
    while any(s["status"] is None for s in state):
        time.sleep(0.1)
        for s in state:
            if s["status"] is not None:
                continue
            rc = s["proc"].poll()
            if rc is not None:
                _LIVE.discard(s["proc"])
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(s["proc"].pid, signal.SIGKILL)     # what it left running in its group
            if rc is None:
                if time.monotonic() >= s["end"]:
                    _kill(s["proc"])
                    _LIVE.discard(s["proc"])
                    s["fh"].write(f"\ngpu_check: killed at its budget ({s['p'].stage.budget_s * factor:g} s)\n")
                    s.update(rc=s["proc"].returncode, status="timeout", t1=time.monotonic())
                continue
            if rc == 0 and s["step"] + 1 < len(s["p"].steps):
                s["step"] += 1
                start(s)
                continue
            s.update(rc=rc, status="ok" if rc == 0 else "failed", t1=time.monotonic())
    out = []
    for s in state:
        s["fh"].close()
        p = s["p"]
        out.append(Result(p.stage.name, p.stage.group, p.stage.budget_s, p.stage.parity, s["status"],
                          round(s["t1"] - s["t0"], 1), s["rc"], p.log,
                          [" ".join(shlex.quote(a) for a in st) for st in p.steps]))
    return out


# ====================================================================== reading results
def junit_counts(path: str) -> dict | None:
    """pytest's junit xml -> tests, passed, failed, errors, skipped and the failing tests' names."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    c = dict(tests=0, failed=0, errors=0, skipped=0, failing=[], skips=[])
    for su in suites:
        for case in su.iter("testcase"):
            c["tests"] += 1
            name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name', '')}"
            if case.find("failure") is not None:
                c["failed"] += 1
                c["failing"].append(name)
            elif case.find("error") is not None:
                c["errors"] += 1
                c["failing"].append(name)
            elif case.find("skipped") is not None:
                c["skipped"] += 1
                c["skips"].append(f"{name}: {(case.find('skipped').get('message') or '')[:160]}")
    c["passed"] = c["tests"] - c["failed"] - c["errors"] - c["skipped"]
    return c


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def evaluate(r: Result, results_dir: str, dry: bool) -> None:
    """Fill in r.status/detail/data from what the stage wrote."""
    st = next(s for s in STAGES if s.name == r.name) if any(s.name == r.name for s in STAGES) else None
    kind = st.kind if st else ""
    if dry:
        r.status = "dry-run ok" if r.status == "ok" else f"dry-run {r.status}"
    if kind == "env":
        info = _load_json(os.path.join(results_dir, "env.json"))
        r.data = info or {}
        if info:
            r.detail = (f"{info.get('gpu_name') or 'no GPU'}; torch {info.get('torch')} (CUDA {info.get('torch_cuda')})"
                        f", triton {info.get('triton')}, nvcc {info.get('nvcc')}")
            if info.get("missing"):
                r.detail += f"; MISSING: {', '.join(info['missing'])}"
                if not dry:
                    r.status = "failed"
    elif kind == "build":
        info = _load_json(os.path.join(results_dir, "build.json")) or {}
        r.data = info
        if dry:
            r.detail = f"plan only: {info.get('plan', '')}"
        elif r.status == "ok":
            r.detail = (f"built in {r.wall_s:.0f} s for TORCH_CUDA_ARCH_LIST={info.get('arch_list')}; "
                        f"oscqat._C kernels: {info.get('kernels')}, SASS {','.join(info.get('sass', [])) or '?'}")
        else:
            r.detail = f"build {r.status} after {r.wall_s:.0f} s (see {os.path.relpath(r.log, results_dir)})"
    elif kind == "warm" and r.name in BENCH_ARGS:
        data = None if dry else _load_json(os.path.join(results_dir, "warm", f"{r.name}.json"))
        if dry:
            m = re.search(r'"measurements": (\d+)', _tail(r.log, 200_000))
            r.detail = f"plan: {m.group(1) if m else '?'} measurements; not run"
        elif data:
            comp = data.get("meta", {}).get("compile_log", [])
            r.detail = f"{len(comp)} compiled first calls, {sum(c['first_call_s'] for c in comp):.0f} s in all"
        else:
            r.detail = "caches partly warm (cut before the end)" if r.status == "timeout" else "no results"
    elif kind == "warm":
        info = _load_json(os.path.join(results_dir, f"{r.name}.json")) or {}
        r.data = info
        r.detail = info.get("summary", "") or ("cache partly warm (cut before the end)" if r.status == "timeout"
                                               else "")
    elif kind == "pytest":
        if dry:
            m = re.findall(r"(\d+)(?:/\d+)? tests? collected", _tail(r.log))
            r.data = dict(collected=int(m[-1]) if m else None)
            r.detail = (f"{m[-1] if m else '?'} tests collected; not run" if r.status == "dry-run ok"
                        else "collection failed")
            return
        c = junit_counts(os.path.join(results_dir, f"junit_{r.name}.xml"))
        r.data = c or {}
        if c is None:
            seen = re.findall(r"^\S+::\S+.*? (PASSED|FAILED|ERROR|SKIPPED)", _tail(r.log, 1_000_000), re.M)
            counts = {k: seen.count(k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
            r.detail = ("no junit xml (pytest did not finish); in its log: "
                        + ", ".join(f"{v} {k.lower()}" for k, v in counts.items()))
            if r.status == "ok":
                r.status = "failed"
            return
        r.detail = f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
        if c["failing"]:
            r.detail += f"; failing: {', '.join(c['failing'][:6])}"
        if r.status == "ok" and (c["failed"] or c["errors"] or c["passed"] == 0):
            r.status = "failed"
        if r.status == "failed" and r.rc == 0:
            r.detail += " (nothing ran)" if c["passed"] == 0 else ""
    elif kind == "bench":
        data = _load_json(os.path.join(results_dir, f"bench_{r.name}.json"))
        if dry:
            m = re.search(r'"measurements": (\d+)', _tail(r.log, 200_000))
            r.detail = f"plan: {m.group(1) if m else '?'} measurements; not run"
            return
        if data is None:
            r.detail = "no results (cut before run.py wrote them; the log has the rows measured so far)" \
                if r.status == "timeout" else "no results"
            return
        recs = data.get("records", [])
        by = {}
        for x in recs:
            by[x["status"]] = by.get(x["status"], 0) + 1
        r.data = dict(records=len(recs), by_status=by)
        r.detail = f"{len(recs)} measurements: " + ", ".join(f"{v} {k}" for k, v in sorted(by.items()))


def _load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ====================================================================== the plan
@dataclasses.dataclass
class Ctx:
    py: str
    dry: bool
    results: str
    jobs: int
    arch: str | None            # "9.0"
    no_gpu: bool


def plan_stage(st: Stage, ctx: Ctx) -> Planned:
    R = ctx.results
    log = os.path.join(R, "logs", f"{st.name}.log")
    me = [ctx.py, os.path.join("bench", "gpu_check.py")]
    skipped = "skipped: no GPU" if ctx.no_gpu else "skipped: dry run"
    # real runs: compiled kernels (never the interpreter), all stages on the GPU
    env = {"PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": None if not ctx.dry else os.environ.get("TRITON_INTERPRET")}
    if st.kind == "env":
        return Planned(st, [me + ["_env", os.path.join(R, "env.json")]], env, log)
    if st.kind == "build":
        pip = [ctx.py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-v", "-e", "."]
        verify = me + ["_verify-build", os.path.join(R, "build.json")]
        if ctx.dry:
            return Planned(st, [[ctx.py, "-m", "pip", "--version"], [ctx.py, "setup.py", "--name"],
                                verify + ["--dry-run", "--would-run", " ".join(pip)]], env, log,
                           f"{skipped}: would run TORCH_CUDA_ARCH_LIST=<capability> MAX_JOBS={ctx.jobs} "
                           f"{' '.join(pip)}; checking setup.py and the extension's import instead")
        env.update(TORCH_CUDA_ARCH_LIST=ctx.arch, MAX_JOBS=str(ctx.jobs))
        return Planned(st, [pip, verify], env, log)
    if st.name == "warm-triton":
        cmd = me + ["_warm-triton", "--jobs", str(max(1, ctx.jobs - 4)), "--json", os.path.join(R, f"{st.name}.json")]
        if ctx.dry:
            return Planned(st, [cmd + ["--dry-run"]], env, log,
                           f"{skipped}: the GPU compiles; running 2 warm-up cases in the interpreter instead")
        return Planned(st, [cmd], env, log)
    if st.kind == "pytest":
        files, k = PYTEST_SELECTION[st.name]
        sel = files + (["-k", k] if k else [])
        base = [ctx.py, "-m", "pytest", "-p", "no:cacheprovider"]
        if ctx.dry:
            return Planned(st, [base + ["--collect-only", "-q"] + sel], env, log,
                           f"{skipped}: collecting the tests only")
        env.update(OSCQAT_TEST_DEVICE="cuda", OMP_NUM_THREADS="4")
        # -v: one line per test in the log, so a stage cut at its budget still shows what passed
        return Planned(st, [base + ["-v", "-rfEs", f"--junitxml={os.path.join(R, f'junit_{st.name}.xml')}"] + sel],
                       env, log)
    if st.kind in ("bench", "warm"):
        cmd = [ctx.py, os.path.join("bench", "run.py"), "--device", "cuda", "--quick"] + BENCH_ARGS[st.name]
        # the same compile settings for the warm-up and the timed runs (inductor's caches key on them); half the
        # cores, so that the parity tests running beside the warm-up keep the other half
        env.update(TORCHINDUCTOR_COMPILE_THREADS=str(max(1, ctx.jobs // 2)))
        if ctx.dry:
            return Planned(st, [cmd + ["--plan"]], env, log, f"{skipped}: bench/run.py --plan only")
        out = os.path.join(R, f"bench_{st.name}")
        if st.kind == "warm":
            out = os.path.join(R, "warm", st.name)
            os.makedirs(os.path.dirname(out), exist_ok=True)
        cmd += ["--json", out + ".json"] + (["--markdown", out + ".md"] if st.kind == "bench" else [])
        return Planned(st, [cmd], env, log)
    raise ValueError(f"no plan for stage {st.name}")


# ====================================================================== summary
def _commit(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("OSCQAT_COMMIT"):
        return os.environ["OSCQAT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "nogit"
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def _fmt(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def summary_md(meta: dict, results: list[Result]) -> str:
    env = meta.get("env", {})
    L = [f"# oscqat GPU check: {env.get('gpu_name') or 'no GPU'}, {meta['date_utc']}, commit {meta['commit']}\n",
         f"Command: `{meta['command']}`  ",
         f"Machine: {env.get('gpu_name') or 'no GPU'} (compute capability {_fmt(env.get('capability'))}, "
         f"{_fmt(env.get('gpu_memory'))}), driver {_fmt(env.get('driver'))}; torch {env.get('torch')} (CUDA "
         f"{env.get('torch_cuda')}), triton {env.get('triton')}, torchvision {env.get('torchvision')}, nvcc "
         f"{env.get('nvcc')}, Python {env.get('python')}, {env.get('cpus')} CPUs  ",
         f"Verdict: **{meta['verdict']}**; {meta['wall_s']} s in all (budget {TOTAL_BUDGET_S} s)"
         + (f"  \nDry run: the stages after env ran at once, each given {DRY_BUDGET_FACTOR}x its budget; their times "
            "are this machine's imports and plans, not GPU times." if meta["dry_run"] else "") + "\n",
         "| stage | group | budget s | took s | status | detail |", "|---|---|---|---|---|---|"]
    for r in results:
        L.append(f"| {r.name}{' (parity)' if r.parity else ''} | {r.group} | {r.budget_s} | {_fmt(r.wall_s)} | "
                 f"{r.status} | {r.detail.replace('|', '/')} |")
    L.append("")
    skips = [(r.name, s) for r in results for s in r.data.get("skips", [])] if not meta["dry_run"] else []
    if skips:
        L.append("Skipped tests:\n")
        L += [f"- {n}: {s}" for n, s in skips[:40]]
        L.append("")
    L += bench_tables(meta["results_dir"])
    return "\n".join(L) + "\n"


def bench_tables(results_dir: str) -> list[str]:
    """The benchmark stages' headline numbers (the full tables: bench_<stage>.md)."""
    L = []
    kern = _load_json(os.path.join(results_dir, "bench_bench-kernels.json"))
    if kern:
        recs = kern["records"]
        meta = kern.get("meta", {})
        rows = [r for r in recs if r["workload"] in ("weight_fwd_track", "weight_bwd", "act_fwd", "act_bwd")]
        big = {}
        for r in rows:
            k = (r["workload"], r.get("dtype"))
            big[k] = max(big.get(k, 0), r.get("numel") or 0)
        L.append(f"## Kernel rows at their largest size (copy {meta.get('copy_bw_gbps')} GB/s and peak "
                 f"{meta.get('peak_bw_gbps')} GB/s, measured/named in the same run)\n")
        L.append("| op | dtype | size | best oscqat | ms | % peak BW | % copy BW | torch.compile / best | "
                 "reference-eager / best | aten-lsq / best |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r.get("numel") != big[(r["workload"], r.get("dtype"))] or r["status"] != "ok" \
                    or r["contender"] != r.get("best_oscqat"):
                continue
            row = {x["contender"]: x for x in rows if x["status"] == "ok" and x["workload"] == r["workload"]
                   and x.get("dtype") == r.get("dtype") and x.get("size") == r.get("size")}
            sp = [row.get(n, {}).get("best_oscqat_speedup") for n in ("torch.compile(torch-backend)",
                                                                     "reference-eager", "aten-lsq")]
            L.append(f"| {r['workload']} | {r['dtype']} | {r['size']} | {r['contender']} | {_fmt(r['median_ms'], 3)} | "
                     f"{_fmt(r.get('pct_peak_bw'))} | {_fmt(r.get('pct_copy_bw'))} | "
                     + " | ".join(f"{_fmt(v, 2)}x" if v else "–" for v in sp) + " |")
        L.append("")
        ws = [r for r in recs if r["workload"] == "weightset_step" and r["status"] == "ok"]
        if ws:
            L.append("Weight set (MobileNetV2, 53 tensors), one QAT step: " + ", ".join(
                f"{r['contender']} {_fmt(r['median_ms'], 2)} ms" for r in ws) + "\n")
    e2e, info, tg = [], {}, []
    for name in ("bench-e2e-eager", "bench-e2e-compiled-mobilenet_v2", "bench-e2e-compiled-resnet18"):
        d = _load_json(os.path.join(results_dir, f"bench_{name}.json"))
        if d:
            e2e += [r for r in d["records"] if r["workload"] == "e2e_train_step"]
            info = info or d.get("meta", {}).get("e2e", {})
            tg += [t for t in d.get("targets", []) if t["target"].startswith("e2e ")]
    if e2e:
        L.append(f"## End-to-end training step (batch {info.get('batch')} at {info.get('res')}, "
                 f"{info.get('config')})\n")
        L.append("| step | median ms | / fp32 | / lsq |")
        L.append("|---|---|---|---|")
        for r in e2e:
            if r["status"] != "ok":
                L.append(f"| {r['contender']} | {r['status']}: {r.get('reason', '')[:60]} | | |")
                continue
            L.append(f"| {r['contender']} | {_fmt(r['median_ms'], 1)} | {_fmt(r.get('ratio_vs_fp32'), 2)}x | "
                     f"{_fmt(r.get('ratio_vs_lsq'), 2) + 'x' if 'ratio_vs_lsq' in r else ''} |")
        L.append("")
    tg = [t for t in (kern or {}).get("targets", []) if not t["target"].startswith("e2e ")] + tg
    if tg:
        L.append("## Targets (bench/run.py, from this run's numbers)\n")
        L.append("| target | value | goal | met |")
        L.append("|---|---|---|---|")
        for t in tg:
            met = "–" if t.get("met") is None else ("yes" if t["met"] else "NO")
            L.append(f"| {t['target']} | {_fmt(t.get('value'), 2)} | {t['goal']} | {met} |")
        L.append("")
    return L


def write_outputs(meta: dict, results: list[Result]) -> str:
    R = meta["results_dir"]
    meta = dict(meta, stages=[dataclasses.asdict(r) for r in results])
    with open(os.path.join(R, "machine.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    md = summary_md(meta, results)
    with open(os.path.join(R, "summary.md"), "w") as f:
        f.write(md)
    out = os.environ.get("OUT")
    if out and os.path.isdir(out) and not meta["dry_run"]:
        # the device machine returns at most 8 files from $OUT: the two small ones and the whole folder packed
        shutil.copy(os.path.join(R, "summary.md"), os.path.join(out, "gpu_check_summary.md"))
        shutil.copy(os.path.join(R, "machine.json"), os.path.join(out, "gpu_check_machine.json"))
        tmp = os.path.join(out, "gpu_check_results.tar.gz.part")
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(R, arcname=os.path.basename(R))
        os.replace(tmp, os.path.join(out, "gpu_check_results.tar.gz"))
    return md


def verdict(results: list[Result], dry: bool, selected: set) -> tuple[str, int]:
    if dry:
        bad = [r.name for r in results if r.status != "dry-run ok"]
        return (f"DRY RUN FAILED ({', '.join(bad)})", 1) if bad else ("DRY RUN OK (no GPU work was done)", 0)
    par = [r for r in results if r.parity]
    bad = [f"{r.name}: {r.status}" for r in par if r.status != "ok"]
    missing = [s.name for s in STAGES if s.parity and s.name in selected and s.name not in {r.name for r in par}]
    bad += [f"{n}: not run" for n in missing]
    if bad:
        return f"PARITY FAILED ({'; '.join(bad)})", 1
    if not par:
        return "NO PARITY STAGE SELECTED", 0
    return f"PARITY PASSED ({', '.join(r.name for r in par)})", 0


# ====================================================================== main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="run every stage's plan, imports and argument parsing on the CPU; no GPU work")
    ap.add_argument("--results", help="results folder (default: bench/results/gpu/<UTC date>_<commit>_<gpu>/; "
                                      "dry run: a folder under the system's temp dir)")
    ap.add_argument("--stages", default="", help="comma-separated stage names to run (default: all)")
    ap.add_argument("--commit", help="the commit to record where the tree has no .git (default: git, "
                                     "$OSCQAT_COMMIT)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 4, help="parallel build/compile jobs")
    ap.add_argument("--list", action="store_true", help="print the stage table and exit")
    args = ap.parse_args(argv)
    names = [s.name for s in STAGES]
    selected = set(a for a in args.stages.split(",") if a) or set(names)
    if selected - set(names):
        ap.error(f"--stages: unknown {', '.join(sorted(selected - set(names)))}; stages: {', '.join(names)}")
    selected.add("env")         # always: it finds the GPU and its architecture
    if args.list:
        for g in groups():
            for s in g:
                print(f"{s.group:<32} {s.name:<32} {s.budget_s:>4} s  {'parity' if s.parity else '':<6}  {s.what}")
        print(f"critical path {critical_path_s()} s of {TOTAL_BUDGET_S} s")
        return 0

    def _stop(signum, _frame):
        for proc in list(_LIVE):
            _kill(proc)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    t_start = time.monotonic()
    factor = DRY_BUDGET_FACTOR if args.dry_run else 1
    deadline = t_start + (TOTAL_BUDGET_S - RESERVE_S) * factor
    started = datetime.datetime.now(datetime.timezone.utc)
    commit = _commit(args.commit)
    py = sys.executable
    command = os.environ.get("GPU_CHECK_ENTRY", f"{py} bench/gpu_check.py") + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    tmp_results = os.path.join(os.environ.get("TMPDIR", "/tmp"), "oscqat_gpu_check_dry_run")
    pending = os.path.abspath(args.results) if args.results else os.path.join(
        tmp_results if args.dry_run else os.path.join(HERE, "results", "gpu"), f".starting-{os.getpid()}")
    os.makedirs(pending, exist_ok=True)
    ctx = Ctx(py=py, dry=args.dry_run, results=pending, jobs=max(1, args.jobs), arch=None, no_gpu=True)
    meta = dict(tool="bench/gpu_check.py", command=command, commit=commit, dry_run=args.dry_run,
                date_utc=started.strftime("%Y-%m-%d %H:%M:%S UTC"), results_dir=pending,
                total_budget_s=TOTAL_BUDGET_S, critical_path_s=critical_path_s(), jobs=ctx.jobs,
                python=py, env={}, verdict="running", wall_s=0)
    print(f"gpu_check: {'DRY RUN: ' if args.dry_run else ''}{len(STAGES)} stages in {len(groups())} groups, "
          f"budgets adding up to {critical_path_s()} s of {TOTAL_BUDGET_S} s; commit {commit}")
    results: list[Result] = []
    # a dry run runs every stage after env in one wave: nothing is timed, and on a small CPU the stages' many
    # Python start-ups are what takes the time
    waves = groups() if not args.dry_run else [groups()[0], [s for g in groups()[1:] for s in g]]
    for g in waves:
        todo = [s for s in g if s.name in selected]
        if not todo:
            continue
        if time.monotonic() >= deadline:
            for s in todo:
                results.append(Result(s.name, s.group, s.budget_s, s.parity, "not run", 0.0, None, "", [],
                                      "the total budget was spent"))
            continue
        planned = [plan_stage(s, ctx) for s in todo]
        for p in planned:
            for step in p.steps:
                print(f"gpu_check: {p.stage.name}: $ {' '.join(shlex.quote(a) for a in step)}")
        got = run_group(planned, deadline, factor=factor)
        for r in got:
            evaluate(r, ctx.results, ctx.dry)
            print(f"gpu_check: {r.name}: {r.status} in {r.wall_s:.1f} s (budget {r.budget_s} s)"
                  + (f": {r.detail}" if r.detail else ""))
        results += got
        if g[0].kind == "env":
            env = next((r.data for r in got if r.name == "env"), {}) or {}
            meta["env"] = env
            ctx.no_gpu = not env.get("cuda_available")
            ctx.arch = env.get("capability")
            if not args.results:       # the folder's final name needs the GPU's name
                gpu = re.sub(r"[^A-Za-z0-9]+", "-", env.get("gpu_name") or "no-GPU").strip("-")
                name = f"{started.strftime('%Y%m%dT%H%MZ')}_{re.sub(r'[^A-Za-z0-9._-]+', '-', commit)}_{gpu}"
                final = os.path.join(os.path.dirname(pending), name)
                if os.path.exists(final):
                    final += f"-{os.getpid()}"
                os.replace(pending, final)
                for r in results:
                    r.log = r.log.replace(pending, final)
                ctx.results = meta["results_dir"] = final
            if not args.dry_run and (ctx.no_gpu or not ctx.arch):
                meta["verdict"] = "NO GPU: nothing checked (use --dry-run on a machine without one)"
                meta["wall_s"] = round(time.monotonic() - t_start, 1)
                print(write_outputs(meta, results))
                print(f"gpu_check: no CUDA GPU visible to {py} (see {os.path.join(ctx.results, 'logs', 'env.log')});"
                      f" nothing checked. On a machine without a GPU run: bash bench/gpu_check.sh --dry-run")
                return 2
        meta["verdict"], _ = verdict(results, args.dry_run, selected)
        meta["wall_s"] = round(time.monotonic() - t_start, 1)
        write_outputs(meta, results)
    meta["verdict"], rc = verdict(results, args.dry_run, selected)
    meta["wall_s"] = round(time.monotonic() - t_start, 1)
    print()
    print(write_outputs(meta, results))
    print(f"gpu_check: {meta['verdict']}; results in {ctx.results}"
          + (" (and in $OUT: gpu_check_summary.md, gpu_check_machine.json, gpu_check_results.tar.gz)"
             if os.environ.get("OUT") and not args.dry_run else ""))
    return rc


# ====================================================================== internal commands (one per stage)
def _env_main(argv) -> int:
    """Machine facts -> JSON. Never fails for a missing GPU (the dry run runs it too)."""
    out_path = argv[0]
    info: dict = dict(python=platform.python_version(), executable=sys.executable, platform=platform.platform(),
                      cpus=os.cpu_count(), missing=[])
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,compute_cap",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            first = [x.strip() for x in q.strip().splitlines()[0].split(",")] if q.strip() else []
            if len(first) >= 3:
                info.update(smi_gpu=first[0], driver=first[1], gpu_memory=first[2],
                            smi_compute_cap=first[3] if len(first) > 3 else None)
            info["nvidia_smi"] = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout[-3000:]
        except (OSError, subprocess.SubprocessError, IndexError) as e:
            info["nvidia_smi"] = f"failed: {e}"
    from importlib import metadata
    for mod in ("torch", "triton", "torchvision", "numpy", "pytest", "hypothesis", "setuptools", "wheel", "pip",
                "ninja"):
        try:
            info[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            info[mod] = None
    info["missing"] = [m for m in ("torch", "torchvision", "pytest", "hypothesis", "setuptools", "numpy")
                       if info[m] is None]
    try:
        import torch
        from torch.utils import cpp_extension
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                    cuda_home=cpp_extension.CUDA_HOME, ninja_usable=cpp_extension.is_ninja_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu_name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                        gpu_count=torch.cuda.device_count(),
                        gpu_memory=info.get("gpu_memory") or f"{p.total_memory / 2**30:.1f} GiB")
        nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
        if cpp_extension.CUDA_HOME and os.path.exists(nvcc):
            v = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
            m = re.search(r"release (\d+\.\d+)", v)
            info["nvcc"] = m.group(1) if m else v.strip()[-80:]
    except Exception as e:  # noqa: BLE001 -- a broken torch is a fact to report
        info["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        import oscqat
        info["oscqat_at"] = os.path.dirname(oscqat.__file__)
    except Exception as e:  # noqa: BLE001
        info["oscqat_at"] = f"not importable yet ({type(e).__name__})"
    with open(out_path, "w") as f:
        json.dump(info, f, indent=1)
    for k in ("gpu_name", "capability", "driver", "gpu_memory", "torch", "torch_cuda", "triton", "torchvision",
              "nvcc", "cuda_home", "ninja_usable", "python", "cpus", "missing", "oscqat_at"):
        print(f"env: {k} = {info.get(k)}")
    if not info.get("cuda_available"):
        print("env: no CUDA GPU visible")
    return 0


def _verify_build_main(argv) -> int:
    """After the build: oscqat._C loads and holds CUDA kernels with SASS for this GPU (dry run: what it would
    build, and that the package and its CPU extension import)."""
    ap = argparse.ArgumentParser(prog="gpu_check.py _verify-build")
    ap.add_argument("out")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--would-run", default="")
    a = ap.parse_args(argv)
    import torch
    info: dict = dict(arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"), max_jobs=os.environ.get("MAX_JOBS"))
    import oscqat
    from oscqat.ops import backends as backend, cpp as cpp_backend  # noqa: F401  (loads oscqat._C where it was built)
    so = sorted(glob.glob(os.path.join(os.path.dirname(oscqat.__file__), "_C*.so")))
    info["so"] = so[0] if so else None
    try:
        cuda = torch._C._dispatch_has_kernel_for_dispatch_key("oscqat_C::weight_fwd", "CUDA")
        info["kernels"] = "CPU+CUDA" if cuda else "CPU"
    except RuntimeError:
        cuda, info["kernels"] = False, "not loaded"
    info["sass"] = []
    from torch.utils.cpp_extension import CUDA_HOME
    tool = shutil.which("cuobjdump") or os.path.join(CUDA_HOME or "/usr/local/cuda", "bin", "cuobjdump")
    if so and cuda and os.path.exists(tool):
        out = subprocess.run([tool, "--list-elf", so[0]], capture_output=True, text=True, timeout=60).stdout
        info["sass"] = sorted(set(re.findall(r"sm_\d+a?", out)))
    info["backends_on_cuda"] = {b: backend.available(b, "cuda") for b in ("cuda", "triton", "torch")}
    if a.dry_run:
        info["plan"] = f"would run: TORCH_CUDA_ARCH_LIST=<this GPU's capability> MAX_JOBS=<cores> {a.would_run}"
    for k, v in info.items():
        print(f"build: {k} = {v}")
    with open(a.out, "w") as f:
        json.dump(info, f, indent=1)
    if a.dry_run:
        return 0
    want = "sm_" + (info["arch_list"] or "").replace(".", "").replace("+PTX", "")
    ok = cuda and info["backends_on_cuda"]["cuda"] and (not info["sass"] or any(s.startswith(want)
                                                                                 for s in info["sass"]))
    if not ok:
        print(f"build: FAILED: oscqat._C has no usable CUDA kernels for {want} (kernels {info['kernels']}, SASS "
              f"{info['sass']})")
    return 0 if ok else 1


def _parity_cases():
    """Every case whose kernels tests/test_triton_parity.py can compile on a GPU: the generated cases'
    shapes x channels x dtypes x dampening (tests/helpers/parity.py's strategies), the examples, the many-program cases
    with small tiles, the GPU-only cases, and the benchmark's kernel rows. (kind, args, small_tiles)."""
    from helpers import parity as P
    shapes = list(getattr(P.SHAPES, "elements", None) or [(1,), (7,), (3, 5), (8, 1, 3, 3), (16, 1, 3, 3),
                                                          (5, 7, 1, 1), (33, 65), (4, 3, 3, 3), (1, 1000),
                                                          (129, 17), (2, 4099)])
    dts = list(P.DTYPES)
    cases = []
    for shape in shapes:
        for ch in sorted({1, shape[0]}):
            for dt in dts:
                cases += [("w", dict(shape=shape, channels=ch, dtype=dt), damp, False) for damp in (False, True)]
    for shape in [(1,), (2, 7), (4, 3, 5, 5), (3, 1000), (2, 8, 17, 3), (64, 3001), (3, 12347), (37041,)]:
        for dt in dts:
            cases += [("a", dict(shape=shape, dtype=dt, offset=off), True, False) for off in (False, True)]
    extra = [((3, 12347), 3, "bf16"), ((37041,), 1, "fp16"), ((5, 7, 1, 1), 5, "bf16"), ((4097, 3), 4097, "bf16"),
             ((257, 1031), 257, "fp16"), ((257, 1031), 1, "fp32")]
    import torch
    name = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    cases += [("w", dict(shape=s, channels=c, dtype=name[d]), True, False) for s, c, d in extra]
    multi = [((1000,), 1, "fp32"), ((24, 1, 3, 3), 24, "bf16"), ((5, 77), 5, "fp16"), ((40, 17), 40, "fp32"),
             ((3, 333), 3, "bf16"), ((2, 300), 1, "fp32")]
    cases += [("w", dict(shape=s, channels=c, dtype=name[d]), True, True) for s, c, d in multi]
    cases += [("a", dict(shape=s, dtype=name[d], offset=True), True, True) for s, d in (((4, 333), "bf16"),
                                                                                       ((3, 100), "fp32"))]
    for n in (1 << 12, 1 << 16, 1 << 20, 1 << 24):        # bench/run.py's kernel rows: (N/256, 256), per tensor
        for d in ("fp32", "bf16"):
            cases.append(("w", dict(shape=(n // 256, 256), channels=1, dtype=name[d]), True, False))
            cases.append(("a", dict(shape=(n,), dtype=name[d], offset=False), True, False))
    return cases


def _import_kernels():
    """oscqat.kernels.triton.backend, also from a tree that is not installed yet (the build runs at the same time):
    kernels/ is installed as oscqat.kernels. Puts tests/ on sys.path (tests/helpers/parity.py)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        from oscqat.kernels.triton import backend as K
        return K
    except ImportError:
        pass
    import importlib.util
    sys.path.insert(0, ROOT)
    for m in [m for m in sys.modules if m == "oscqat" or m.startswith("oscqat.")]:
        del sys.modules[m]
    import oscqat  # noqa: F401
    spec = importlib.util.spec_from_file_location("oscqat.kernels", os.path.join(ROOT, "kernels", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(ROOT, "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["oscqat.kernels"] = mod
    spec.loader.exec_module(mod)
    from oscqat.kernels.triton import backend as K
    return K


def _warm_triton_main(argv) -> int:
    """Compile the triton kernels of every parity case into Triton's cache, --jobs processes at once (each
    compile is a few tenths of a second; the tests would do ~400 of them one after the other). Each case runs
    tests/helpers/parity.py's check on the GPU, so the launches are exactly the tests'; a case that raises is counted
    (the parity stages report it). --dry-run: one worker, 2 cases on the CPU in the interpreter."""
    ap = argparse.ArgumentParser(prog="gpu_check.py _warm-triton")
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--json")
    ap.add_argument("--worker", default=None, help="i/n: run every n-th case from i (internal)")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.time()
    if a.worker is None:
        n = 1 if a.dry_run else max(1, a.jobs)
        out = a.json or os.path.join(ROOT, "warm-triton.json")
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "_warm-triton", "--worker", f"{i}/{n}",
                                   "--json", f"{out}.{i}"] + (["--dry-run"] if a.dry_run else []))
                 for i in range(n)]
        rcs = [p.wait() for p in procs]
        parts = [_load_json(f"{out}.{i}") or {} for i in range(n)]
        ran, raised = sum(x.get("ran", 0) for x in parts), sum(x.get("raised", 0) for x in parts)
        cases = max((x.get("cases", 0) for x in parts), default=0)
        s = (f"{ran} of {cases} cases{' (dry run: CPU, interpreter)' if a.dry_run else ''} in {n} processes, "
             f"{raised} raised, exit statuses {sorted(set(rcs))}, {time.time() - t0:.0f} s")
        print(f"warm-triton: {s}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(summary=s, jobs=n, rcs=rcs, ran=ran, raised=raised, cases=cases,
                               seconds=round(time.time() - t0, 1)), f)
        for i in range(n):
            with contextlib.suppress(OSError):
                os.remove(f"{out}.{i}")
        return 0 if all(rc == 0 for rc in rcs) else 1
    if a.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"        # before triton is imported
    import torch
    K = _import_kernels()
    from helpers import parity as P
    cases = _parity_cases()
    i, n = map(int, a.worker.split("/"))
    mine = cases[i::n] if not a.dry_run else [cases[0], next(c for c in cases if c[0] == "a")]
    dev = "cpu" if a.dry_run else "cuda"
    raised = 0
    for kind, kw, damp, small in mine:
        saved = (K.TILE, K.FIT_TILES, K._FINAL_TILE)
        if small:       # tests/test_triton_parity.py's small_tiles fixture
            K.TILE, K.FIT_TILES, K._FINAL_TILE = 128, True, 64
        try:
            if kind == "w":
                c = P.make_weight_case(0, kw["shape"], kw["channels"], 4, kw["dtype"], device=dev)
                P.check_weight(K, c, damp)
            else:
                c = P.make_act_case(0, kw["shape"], 4, kw["dtype"], signed=False, offset=kw["offset"], device=dev)
                P.check_act(K, c)
        except Exception as e:  # noqa: BLE001 -- the parity stages report mismatches; warming goes on
            raised += 1
            print(f"warm-triton: case {kind} {kw} damp={damp} raised {type(e).__name__}: {str(e)[:200]}")
        finally:
            K.TILE, K.FIT_TILES, K._FINAL_TILE = saved
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"warm-triton: worker {i}/{n}: {len(mine)} of {len(cases)} cases, {raised} raised, {time.time() - t0:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(cases=len(cases), ran=len(mine), raised=raised), f)
    return 0


if __name__ == "__main__":
    sub = {"_env": _env_main, "_verify-build": _verify_build_main, "_warm-triton": _warm_triton_main}
    if len(sys.argv) > 1 and sys.argv[1] in sub:
        sys.exit(sub[sys.argv[1]](sys.argv[2:]))
    sys.exit(main())
