"""bench/gpu_check.sh, the one command for a GPU machine, kept from rotting without a GPU: its stage budgets fit
in 8 minutes with the parity stages first, its dry run (every stage's plan, imports and argument parsing, no GPU
work) passes, and its runner kills a stage at its budget (with what it started), goes on, and turns results
into the exit status (a parity failure fails; a benchmark timeout does not)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_check as G  # noqa: E402


def test_stage_budgets_fit_in_8_minutes_parity_first():
    names = [s.name for s in G.STAGES]
    assert len(names) == len(set(names))
    assert G.TOTAL_BUDGET_S == 480
    assert G.critical_path_s() + G.RESERVE_S <= G.TOTAL_BUDGET_S, \
        [(g[0].group, max(s.budget_s for s in g)) for g in G.groups()]
    assert all(s.budget_s > 0 for s in G.STAGES)
    order = [g[0].group for g in G.groups()]
    assert order[:2] == ["env", "build"] and any(s.name == "build" for s in G.groups()[1])
    last_parity = max(i for i, g in enumerate(G.groups()) if any(s.parity for s in g))
    first_bench = min(i for i, g in enumerate(G.groups()) if any(s.kind == "bench" for s in g))
    assert last_parity < first_bench, "parity stages must come before the benchmarks"
    assert G.groups()[-1][0].name.startswith("bench-e2e-compiled"), "the slowest stage last"
    # one selection per test stage and one argument list per run.py stage, for files that exist
    for s in G.STAGES:
        if s.kind == "pytest":
            assert all(os.path.exists(os.path.join(ROOT, f)) for f in G.PYTEST_SELECTION[s.name][0])
        if s.kind == "bench" or s.name == "warm-compile":
            assert s.name in G.BENCH_ARGS
    assert {s.name for s in G.STAGES if s.parity} == {"build", "parity-cuda", "parity-triton", "gpu-path",
                                                      "gpu-path-compiled"}
    # bench/README.md's stage table says the same
    readme = open(os.path.join(ROOT, "bench", "README.md")).read()
    for s in G.STAGES:
        line = next((x for x in readme.splitlines() if x.startswith(f"| {s.group} | `{s.name}`")), None)
        assert line is not None and line.endswith(f"| {s.budget_s} s |"), (s.name, line)
    assert f"add up to {G.critical_path_s()} s" in readme


def test_dry_run_plans_every_stage(tmp_path):
    """What CI can do of the GPU check: every stage's plan runs (pytest --collect-only, bench/run.py --plan,
    setup.py, the extension's import, two triton warm-up cases in the interpreter), the GPU work is skipped and
    said so, and the results folder is written."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["OMP_NUM_THREADS"] = "1"
    res = tmp_path / "results"
    t0 = time.time()
    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run", "--results", str(res)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    assert "DRY RUN OK" in text
    skipped = "skipped: dry run" if torch.cuda.is_available() else "skipped: no GPU"
    for s in G.STAGES:
        assert f"gpu_check: {s.name}: dry-run ok" in text, (s.name, text[-4000:])
        if s.kind != "env":
            assert f"gpu_check: {s.name}: {skipped}" in text, s.name
    meta = json.loads((res / "machine.json").read_text())
    assert [st["name"] for st in meta["stages"]] == [s.name for s in G.STAGES]
    assert all(st["status"] == "dry-run ok" for st in meta["stages"])
    for st in meta["stages"]:
        if st["name"] in G.PYTEST_SELECTION:
            assert st["data"]["collected"] > 0, st
    assert meta["dry_run"] and meta["commit"] and meta["command"].startswith("bash bench/gpu_check.sh --dry-run")
    summary = (res / "summary.md").read_text()
    assert all(f"| {s.name}" in summary for s in G.STAGES)
    assert all((res / "logs" / f"{s.name}.log").exists() for s in G.STAGES)
    print(f"dry run: {time.time() - t0:.0f} s")


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line.split()[1] for line in f if line.startswith("State:"))
    except (OSError, StopIteration):
        return "gone"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_runner_kills_a_stage_at_its_budget_and_goes_on(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    slow = textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pidfile)!r}, "w").write(str(p.pid))
        time.sleep(120)
    """)
    stages = [G.Stage("slow", "g", 3, "bench", False, ""), G.Stage("fails", "g", 30, "pytest", True, ""),
              G.Stage("two-steps", "g", 30, "warm", False, "")]
    planned = [G.Planned(stages[0], [[sys.executable, "-c", slow]], {}, str(tmp_path / "slow.log")),
               G.Planned(stages[1], [[sys.executable, "-c", "import sys; sys.exit(3)"]], {},
                         str(tmp_path / "fails.log")),
               G.Planned(stages[2], [[sys.executable, "-c", "print('one')"], [sys.executable, "-c", "print('two')"]],
                         {"GPU_CHECK_TEST_VAR": "x"}, str(tmp_path / "two.log"))]
    t0 = time.monotonic()
    got = {r.name: r for r in G.run_group(planned, time.monotonic() + 60, say=lambda *a: None)}
    assert time.monotonic() - t0 < 30
    assert got["slow"].status == "timeout" and 3 <= got["slow"].wall_s < 15
    assert got["fails"].status == "failed" and got["fails"].rc == 3
    assert got["two-steps"].status == "ok" and got["two-steps"].wall_s < got["slow"].wall_s
    log = (tmp_path / "two.log").read_text()
    assert "one" in log and "two" in log and log.count("$ ") == 2
    assert "killed at its budget" in (tmp_path / "slow.log").read_text()
    deadline = time.monotonic() + 10
    while _state(int(pidfile.read_text())) not in ("gone", "Z") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _state(int(pidfile.read_text())) in ("gone", "Z"), "the stage's own child survived the kill"
    # the total budget cuts a stage's budget
    t0 = time.monotonic()
    r = G.run_group([G.Planned(G.Stage("cut", "g", 100, "bench", False, ""), [[sys.executable, "-c", slow]], {},
                               str(tmp_path / "cut.log"))], time.monotonic() + 2, say=lambda *a: None)[0]
    assert r.status == "timeout" and time.monotonic() - t0 < 15


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="1" tests="4"><testcase classname="tests.test_x" name="test_a"/><testcase classname="tests.test_x"
name="test_b"><failure message="boom">x</failure></testcase><testcase classname="tests.test_x" name="test_c">
<skipped message="needs a CUDA GPU"/></testcase><testcase classname="tests.test_x" name="test_d"/></testsuite>
</testsuites>"""


def test_results_make_the_verdict(tmp_path):
    (tmp_path / "junit_parity-cuda.xml").write_text(JUNIT)
    c = G.junit_counts(str(tmp_path / "junit_parity-cuda.xml"))
    assert (c["tests"], c["passed"], c["failed"], c["errors"], c["skipped"]) == (4, 2, 1, 0, 1)
    assert c["failing"] == ["test_x::test_b"] and "needs a CUDA GPU" in c["skips"][0]

    def result(name, status="ok", rc=0):
        st = next(s for s in G.STAGES if s.name == name)
        return G.Result(name, st.group, st.budget_s, st.parity, status, 1.0, rc, str(tmp_path / f"{name}.log"), [])

    r = result("parity-cuda")                   # pytest said 0 but the xml has a failure: failed
    G.evaluate(r, str(tmp_path), dry=False)
    assert r.status == "failed" and "1 failed" in r.detail and "test_b" in r.detail
    r = result("gpu-path")                      # no xml: pytest did not finish
    G.evaluate(r, str(tmp_path), dry=False)
    assert r.status == "failed"
    (tmp_path / "junit_parity-triton.xml").write_text(JUNIT.replace('<failure message="boom">x</failure>', ""))
    ok = result("parity-triton")
    G.evaluate(ok, str(tmp_path), dry=False)
    assert ok.status == "ok" and "3 passed" in ok.detail
    everything = {s.name for s in G.STAGES}
    par = [result("build"), result("parity-cuda"), ok, result("gpu-path"), result("gpu-path-compiled")]
    bench_timeout = result("bench-e2e-compiled-resnet18", "timeout", None)
    assert G.verdict(par + [bench_timeout], False, everything)[1] == 0, "a benchmark timeout is no parity failure"
    par[3].status = "timeout"
    v, rc = G.verdict(par, False, everything)
    assert rc == 1 and "gpu-path: timeout" in v
    v, rc = G.verdict(par[:3] + par[4:], False, everything)
    assert rc == 1 and "gpu-path: not run" in v
    assert G.verdict([], True, everything)[1] == 0
    bench = result("bench-kernels", "timeout", None)
    G.evaluate(bench, str(tmp_path), dry=False)
    assert "no results" in bench.detail


def test_real_run_plan(tmp_path):
    """What the GPU run would execute (argv and environment of every stage), checked here: the build for this
    GPU's architecture only, compiled triton kernels (never the interpreter), junit and JSON outputs in the
    results folder."""
    ctx = G.Ctx(py="python3", dry=False, results=str(tmp_path), jobs=16, arch="9.0", no_gpu=False)
    plans = {s.name: G.plan_stage(s, ctx) for s in G.STAGES}
    b = plans["build"]
    assert b.env["TORCH_CUDA_ARCH_LIST"] == "9.0" and b.env["MAX_JOBS"] == "16"
    pip = b.steps[0]
    assert pip[:3] == ["python3", "-m", "pip"] and {"--no-build-isolation", "--no-deps", "--no-index", "-e"} <= set(pip)
    assert "_verify-build" in b.steps[1]
    assert "--jobs" in plans["warm-triton"].steps[0] and "12" in plans["warm-triton"].steps[0]
    for name, p in plans.items():
        assert p.env.get("TRITON_INTERPRET", "unset") is None, name       # removed from the environment
        assert not p.note, name
        if name in G.PYTEST_SELECTION:
            argv = p.steps[0]
            assert f"--junitxml={tmp_path}/junit_{name}.xml" in argv and "--collect-only" not in argv
            assert p.env["OSCQAT_TEST_DEVICE"] == "cuda"
        if name in G.BENCH_ARGS:
            argv = p.steps[0]
            assert argv[1] == "bench/run.py" and argv[2:5] == ["--device", "cuda", "--quick"]
            assert "--plan" not in argv and "--json" in argv
            assert p.env["TORCHINDUCTOR_COMPILE_THREADS"] == "8"
            if next(s for s in G.STAGES if s.name == name).kind == "bench":
                assert argv[argv.index("--json") + 1] == f"{tmp_path}/bench_{name}.json"


def test_summary_tables_read_run_py_json(tmp_path):
    def rec(workload, contender, ms, **kw):
        return dict(workload=workload, contender=contender, status="ok", median_ms=ms, **kw)
    row = dict(dtype="fp32", size="16M", numel=1 << 24)
    kern = {"meta": {"copy_bw_gbps": 3000.0, "peak_bw_gbps": 3350.0},
            "records": [rec("act_fwd", "oscqat-triton", 0.05, best_oscqat="oscqat-triton", best_oscqat_speedup=1.0,
                            pct_peak_bw=80.0, pct_copy_bw=89.0, **row),
                        rec("act_fwd", "torch.compile(torch-backend)", 0.06, best_oscqat="oscqat-triton",
                            best_oscqat_speedup=1.2, **row),
                        rec("weightset_step", "oscqat-cuda batched", 1.5, dtype="fp32", size="3.47M")],
            "targets": [dict(target="act_fwd fp32 16M: % peak HBM BW (oscqat-triton)", value=80.0, goal=">= 85",
                             met=False, detail="")]}
    e2e = {"meta": {"e2e": dict(batch=128, res=224, config="W4A4")},
           "records": [rec("e2e_train_step", "mobilenet_v2 fp32", 50.0, ratio_vs_fp32=1.0),
                       rec("e2e_train_step", "mobilenet_v2 oscqat-triton/dampen+freeze", 60.0, ratio_vs_fp32=1.2,
                           ratio_vs_lsq=1.03)],
           "targets": [dict(target="e2e mobilenet_v2 oscqat-triton/dampen+freeze / lsq", value=1.03, goal="<= 1.05x",
                            met=True, detail=""),
                       dict(target="weight-set step: best oscqat (-) vs reference-eager", value=None, goal=">= 10x",
                            met=False, detail="")]}
    (tmp_path / "bench_bench-kernels.json").write_text(json.dumps(kern))
    (tmp_path / "bench_bench-e2e-eager.json").write_text(json.dumps(e2e))
    text = "\n".join(G.bench_tables(str(tmp_path)))
    assert "| act_fwd | fp32 | 16M | oscqat-triton | 0.050 | 80.0 | 89.0 | 1.20x |" in text
    assert "oscqat-cuda batched 1.50 ms" in text and "batch 128 at 224" in text
    assert "| mobilenet_v2 oscqat-triton/dampen+freeze | 60.0 | 1.20x | 1.03x |" in text
    assert "| act_fwd fp32 16M: % peak HBM BW (oscqat-triton) | 80.00 | >= 85 | NO |" in text
    assert "weight-set step: best oscqat (-)" not in text      # an e2e run's empty weight-set targets are left out
