"""CPU microbenchmarks at a smoke size (pytest-benchmark). Not part of the default test run (`pytest tests/`):

    python -m pytest bench/microbench.py --benchmark-only -q
    OSCQAT_BENCH_COMPILE=1 python -m pytest bench/microbench.py ...   # also torch.compile (slow to compile)

Benchmarks report; they assert nothing about speed (targets are in bench/README.md, never in timed tests).
"""
from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("pytest_benchmark")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

import contenders as C  # noqa: E402
import workloads as W  # noqa: E402

NUMEL = 1 << 14          # smoke size
DEVICE = "cpu"
CONTENDERS = [C.REF, C.oscqat_name("torch"), C.COMPILED, C.ATEN, C.oscqat_name("cpp")]


def _build(contender, op, dtype):
    if contender == C.COMPILED and not os.environ.get("OSCQAT_BENCH_COMPILE"):
        pytest.skip("torch.compile contender: set OSCQAT_BENCH_COMPILE=1")
    try:
        if op.startswith("weight"):
            return W.build_weight(contender, op, W.WeightCase(NUMEL, dtype, DEVICE), DEVICE)
        return W.build_act(contender, op, W.ActCase(NUMEL, dtype, DEVICE), DEVICE)
    except C.Skip as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("op", ["weight_fwd_track", "weight_bwd", "act_fwd", "act_bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel(benchmark, contender, op, dtype):
    fn = _build(contender, op, dtype)
    fn()
    benchmark.group = f"{op}-{str(dtype).split('.')[-1]}-{NUMEL}"
    benchmark.extra_info.update(contender=contender, numel=NUMEL,
                                bytes_per_elem=W.bytes_per_elem(op, dtype), loadavg=os.getloadavg())
    benchmark(fn)


@pytest.fixture(scope="module")
def weightset_case():
    return W.WeightSetCase(DEVICE)


@pytest.mark.parametrize("contender", [C.REF, C.oscqat_name("torch"), C.ATEN, C.oscqat_name("cpp")])
def test_weightset_step(benchmark, weightset_case, contender):
    try:
        fn = W.build_weightset(contender, weightset_case, DEVICE)
    except C.Skip as e:
        pytest.skip(str(e))
    fn()
    benchmark.group = "mobilenetv2-weightset-step"
    benchmark.extra_info.update(contender=contender, numel=weightset_case.numel, loadavg=os.getloadavg())
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
