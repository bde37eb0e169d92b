"""The CPU speed paths: the three instruction-set builds of the C++ cores (AVX-512, AVX2, baseline; chosen at run
time) give the same bits, and the library path that calls the C++ ops directly (oscqat/ops/library.py) behaves as the
torch.library custom ops did: same results, and a state mutation between a forward and its backward is caught."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import oscqat
from oscqat.ops import backends as backend
from oscqat.nn.quantizers import WeightQuantizer
from helpers.parity import assert_bits

HERE = os.path.dirname(os.path.abspath(__file__))

# Odd sizes (not multiples of the 16-lane vector or of the 1024-element block), per tensor and per channel,
# fp32/bf16/fp16, and one tensor big enough for several blocks per channel.
_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from helpers.parity import make_act_case, make_weight_case
    from oscqat.ops import cpp as cb
    from oscqat.nn.weight_check import checksum
    check = torch.ops.oscqat_C.check_weight
    torch.set_num_threads(int(sys.argv[3]))
    out = []
    cases = [((33, 65), 33, torch.float32), ((2, 4099), 1, torch.bfloat16), ((96, 64, 3, 3), 96, torch.float16),
             ((7, 3000), 7, torch.float32), ((1, 17), 1, torch.bfloat16), ((300, 701), 1, torch.float32),
             ((64, 2101), 64, torch.bfloat16)]
    for seed, (shape, ch, dtype) in enumerate(cases):
        for special in ("normal", "ties"):
            c = make_weight_case(seed, shape, ch, 2 + seed % 4, dtype, special=special, device="cpu")
            st = {k: c[k].clone() for k in ("prev_int", "flags", "freq", "ema")}
            out += list(cb.weight_fwd_track(c["w"], c["scale"], st["prev_int"], st["flags"], st["freq"], st["ema"],
                                            c["f_th"], c["n"], c["p"], 0.01, True, c["damp_div"]))
            out += list(st.values())
            out += list(cb.weight_fwd(c["w"], c["scale"], c["flags"], c["ema"], c["n"], c["p"], True, c["damp_div"]))
            for tracked in (False, True):
                out += list(cb.weight_bwd(c["g"], c["w"], c["scale"], c["flags"], c["ema"], c["grad_d"], c["n"],
                                          c["p"], c["grad_scale"], True, c["damp_div"], tracked))
            bad = c["w"].clone()
            bad.view(-1)[-1] = float("nan")
            ref = checksum(c["w"])
            out.append(torch.tensor([check(c["w"], c["scale"], ref, True), check(c["w"], c["scale"], ref + 1, True),
                                     check(bad, c["scale"], ref, True), check(bad, c["scale"], ref, False)]))
        a = make_act_case(seed, shape, 4, dtype, signed=bool(seed % 2), offset=bool(seed % 3), device="cpu")
        out.append(cb.act_fwd(a["x"], a["scale"], a["offset"], a["n"], a["p"]))
        out += list(cb.act_bwd(a["g"], a["x"], a["scale"], a["offset"], a["n"], a["p"], a["grad_scale"]))
    torch.save(out, sys.argv[2])
""")


def _require_cpp():
    if not backend.available("cpp", "cpu"):
        pytest.skip("the cpp backend is not built")


def test_isa_builds_give_the_same_bits(tmp_path):
    """Every output and state, reductions included, is bit-identical whichever ISA build runs (the builds differ
    only in vector width; the reductions' order is fixed by the block split, not by the lanes)."""
    _require_cpp()
    results = _run_script(tmp_path, {"best": {}, "avx2": {"OSCQAT_NO_AVX512": "1"}, "base": {"OSCQAT_NO_AVX2": "1"}})
    assert len(results["best"]) > 100
    assert [r.tolist() for r in results["base"] if r.dtype == torch.int64][:2] == [[0, 2, 1, 2]] * 2  # check_weight
    for other in ("avx2", "base"):
        for i, (a, b) in enumerate(zip(results["best"], results[other])):
            assert_bits(a, b, f"best vs {other}, output {i}")


def test_thread_count_does_not_change_a_bit(tmp_path):
    """The C++ ops run their blocks on torch's OpenMP threads (the extension is built with -fopenmp, else
    at::parallel_for runs on one); the reductions add per-block partials in block order, so 1 and 3 threads give the
    same bits. The two largest cases have several 32K-element chunks per thread."""
    _require_cpp()
    results = _run_script(tmp_path, {"1": {}, "3": {}})
    for i, (a, b) in enumerate(zip(results["1"], results["3"])):
        assert_bits(a, b, f"1 vs 3 threads, output {i}")


def _run_script(tmp_path, runs: dict) -> dict:
    results = {}
    for name, env in runs.items():
        path = tmp_path / f"{name}.pt"
        threads = name if name.isdigit() else "1"
        res = subprocess.run([sys.executable, "-c", _SCRIPT, HERE, str(path), threads], capture_output=True,
                             text=True, env=dict(os.environ, OMP_NUM_THREADS=threads, **env), timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        results[name] = torch.load(path)
    return results


@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_state_mutated_before_backward_is_caught(name):
    """Two tracked forwards before one backward: the first's backward would read the second's state, so autograd
    must refuse, on the direct C++ path as through the custom ops."""
    if name == "cpp":
        _require_cpp()
    q = WeightQuantizer((8, 16), 4, track=True, dampen=True, freeze=True).train()
    w = torch.randn(8, 16, requires_grad=True)
    with oscqat.use_backend(name):
        y = q(w)
        q.arm()
        q(w)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_direct_path_matches_the_reference_through_autograd():
    """Layers on the cpp backend (direct C++ ops) and on the torch backend (custom ops): same outputs, states and
    gradients (activation quantization included), over two steps so that the second forward is tracked from an
    initialised state."""
    _require_cpp()
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 5, 1, groups=1))
    x = torch.randn(2, 3, 9, 11)
    runs = {}
    for name in ("torch", "cpp"):
        m = oscqat.prepare(copy.deepcopy(base), oscqat.QATConfig(4, 4, "dampen+freeze", first_last_bits=4),
                           calib_data=[x], verbose=False)
        m.train()
        grads = []
        with oscqat.use_backend(name):
            for _ in range(2):
                for mod in m.modules():
                    if hasattr(mod, "arm"):
                        mod.arm()
                loss = m(x).square().sum() + oscqat.dampening_loss(m)
                loss.backward()
                grads += [p.grad.clone() for p in m.parameters() if p.requires_grad]
                m.zero_grad()
        runs[name] = grads + [b.clone() for b in m.buffers()]
    for i, (a, b) in enumerate(zip(runs["torch"], runs["cpp"])):
        if a.dtype.is_floating_point and a.dim() == 1 and a.numel() <= 8:   # per-tensor scales: reductions
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert_bits(a, b, f"tensor {i}")
