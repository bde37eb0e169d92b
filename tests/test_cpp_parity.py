"""The `cpp` (CPU) and `cuda` backends (oscqat._C, csrc/) against the reference, with the shared parity harness
(tests/helpers/parity.py): generated cases, determinism (run to run and across thread counts), both CPU instruction-set
builds, fake implementations, and bad input through the C++ entry points (a clear RuntimeError, never a crash).
The 'cuda' tests skip where torch has no CUDA device or the extension was built without CUDA; without a GPU,
csrc/check_cuda_compile.sh (CI) compiles every CUDA kernel for sm_80 and sm_90 with no spill and finds SASS for
both in the built oscqat._C, which is all that can be shown of them without running them."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oscqat.ops import backends as backend, cpp as cpp_backend
from helpers.parity import (act_cases, assert_bits, check_act, check_deterministic, check_weight, make_act_case,
                    make_weight_case, weight_cases)

BACKENDS = [("cpp", "cpu"), ("cuda", "cuda")]
HERE = os.path.dirname(os.path.abspath(__file__))


def _require(name: str, device: str):
    if not backend.available(name, device):
        try:
            backend.check(name, device)
        except backend.BackendUnavailable as e:
            pytest.skip(str(e))


IMPL = cpp_backend
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name,device", BACKENDS)
@settings(FAST, max_examples=300)
@given(data=st.data())
def test_weight_ops_match_reference(name, device, data):
    _require(name, device)
    case = data.draw(weight_cases(device=device))
    damp = data.draw(st.booleans())
    check_weight(IMPL, make_weight_case(**case), damp=damp, momentum=data.draw(st.sampled_from([0.01, 0.001, 0.3])))


@pytest.mark.parametrize("name,device", BACKENDS)
@settings(FAST, max_examples=200)
@given(data=st.data())
def test_act_ops_match_reference(name, device, data):
    _require(name, device)
    check_act(IMPL, make_act_case(**data.draw(act_cases(device=device))))


@pytest.mark.parametrize("name,device", BACKENDS)
@settings(FAST, max_examples=40)
@given(data=st.data())
def test_ops_are_deterministic(name, device, data):
    _require(name, device)
    check_deterministic(IMPL, make_weight_case(**data.draw(weight_cases(device=device))), damp=data.draw(st.booleans()))


@pytest.fixture
def one_thread():
    """The reference runs its ~30 ops per call with one thread: on a small machine with busy cores, waking
    OpenMP threads for every op makes it 100x slower. (The kernels' own threading: the thread-count test.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Several blocks per channel, several channels per block (CUDA), per tensor and per channel.
LARGE = [((96, 64, 3, 3), 1), ((96, 64, 3, 3), 96), ((4, 100_003), 4), ((1, 300_000), 1), ((960, 1, 3, 3), 960)]


@pytest.mark.parametrize("name,device", BACKENDS)
@pytest.mark.parametrize("shape,channels", LARGE)
def test_large_tensors_match_reference(name, device, shape, channels, one_thread):
    _require(name, device)
    for seed, dtype, special in ((1, torch.float32, "normal"), (2, torch.bfloat16, "ties")):
        c = make_weight_case(seed, shape, channels, 4, dtype, special=special, device=device)
        check_weight(IMPL, c, damp=True)
        check_deterministic(IMPL, c)
    a = make_act_case(3, (8, 16, 40, 40), 4, torch.float16, signed=False, offset=True, device=device)
    check_act(IMPL, a)


def _run_all(c):
    st_ = {k: c[k].clone() for k in ("prev_int", "flags", "freq", "ema")}
    out = list(cpp_backend.weight_fwd_track(c["w"], c["scale"], st_["prev_int"], st_["flags"], st_["freq"],
                                            st_["ema"], c["f_th"], c["n"], c["p"], 0.01, True, c["damp_div"]))
    out += list(cpp_backend.weight_fwd(c["w"], c["scale"], c["flags"], c["ema"], c["n"], c["p"], True,
                                       c["damp_div"]))
    out += list(cpp_backend.weight_bwd(c["g"], c["w"], c["scale"], st_["flags"], st_["ema"], c["grad_d"], c["n"],
                                       c["p"], c["grad_scale"], True, c["damp_div"], True))
    return out + list(st_.values())


@pytest.mark.parametrize("shape,channels", [((1, 600_000), 1), ((64, 8192), 64)])
def test_cpu_results_do_not_depend_on_thread_count(shape, channels):
    """Big enough for at::parallel_for to split the work (csrc/cpu: at least 2^15 elements per thread): the
    one-thread results match the reference, the four-thread ones match those bit for bit."""
    _require("cpp", "cpu")
    c = make_weight_case(5, shape, channels, 3, torch.float32, device="cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_all(c)
        check_weight(IMPL, c, damp=True)
        torch.set_num_threads(4)
        four = _run_all(c)
    finally:
        torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(one, four)):
        assert_bits(a, b, f"1 vs 4 threads, output {i}")


LIST_SHAPES = [((5, 7), 1), ((5, 7), 5), ((1, 70_001), 1), ((96, 64, 3, 3), 96), ((960, 1, 3, 3), 960),
               ((4, 100_003), 1), ((32, 3, 3, 3), 32)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_list_ops_equal_the_ops_one_by_one(data):
    """oscqat_C::weight_fwd_list / weight_bwd_list (all layers' tasks in one parallel region, split by elements
    across layer boundaries) give each layer the bits of weight_fwd_track / weight_fwd / weight_bwd called alone,
    at any thread count: tracked and untracked layers, with and without state, fp32/bf16/fp16, per tensor and
    per channel, mixed in one list."""
    _require("cpp", "cpu")
    ops = torch.ops.oscqat_C
    layers = []
    for i in range(data.draw(st.integers(1, 5))):
        shape, channels = data.draw(st.sampled_from(LIST_SHAPES))
        dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
        c = make_weight_case(data.draw(st.integers(0, 999)), shape, channels, data.draw(st.integers(2, 8)), dtype)
        c.update(tracked=data.draw(st.booleans()), state=data.draw(st.booleans()), damp=data.draw(st.booleans()),
                 momentum=data.draw(st.sampled_from([0.001, 0.3])))
        layers.append(c)
    keys = ("prev_int", "flags", "freq", "ema")

    def fresh():
        return [{k: c[k].clone() for k in keys} for c in layers]

    def opt(c, st_, k):
        return st_[k] if c["tracked"] or (c["state"] and k in ("flags", "ema")) else None

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_state = [], fresh()
        for c, st_ in zip(layers, one_state):
            if c["tracked"]:
                out = ops.weight_fwd_track(c["w"], c["scale"], *st_.values(), c["f_th"], c["n"], c["p"],
                                           c["momentum"], c["damp"], c["damp_div"])
            else:
                out = ops.weight_fwd(c["w"], c["scale"], opt(c, st_, "flags"), opt(c, st_, "ema"), c["n"], c["p"],
                                     c["damp"], c["damp_div"])
            one.append(list(out) + list(ops.weight_bwd(
                c["g"], c["w"], c["scale"], opt(c, st_, "flags"), opt(c, st_, "ema"), c["grad_d"], c["n"], c["p"],
                c["grad_scale"], c["damp"], c["damp_div"], c["tracked"])))
        for n_threads in (1, 2, 4):
            torch.set_num_threads(n_threads)
            st_list = fresh()
            args = [[c[k] for c in layers] for k in ("w", "scale")]
            w_hat, d, counts = ops.weight_fwd_list(
                *args, *[[opt(c, s, k) for c, s in zip(layers, st_list)] for k in keys], [c["f_th"] for c in layers],
                [c["n"] for c in layers], [c["p"] for c in layers], [c["momentum"] for c in layers],
                [int(c["damp"]) for c in layers], [c["damp_div"] for c in layers])
            gw, gs = ops.weight_bwd_list(
                [c["g"] for c in layers], *args, [opt(c, s, "flags") for c, s in zip(layers, st_list)],
                [opt(c, s, "ema") for c, s in zip(layers, st_list)], [c["grad_d"] for c in layers],
                [c["n"] for c in layers], [c["p"] for c in layers], [c["grad_scale"] for c in layers],
                [int(c["damp"]) for c in layers], [c["damp_div"] for c in layers],
                [int(c["tracked"]) for c in layers])
            for i, c in enumerate(layers):
                got = [w_hat[i], d[i]] + ([counts[i]] if c["tracked"] else []) + [gw[i], gs[i]]
                for j, (a, b) in enumerate(zip(one[i], got)):
                    assert_bits(a, b, f"layer {i} output {j} at {n_threads} threads")
                for k in keys:
                    assert_bits(one_state[i][k], st_list[i][k], f"layer {i} {k} at {n_threads} threads")
                assert c["tracked"] or counts[i].numel() == 0
    finally:
        torch.set_num_threads(threads)


def test_baseline_isa_build_gives_the_same_bits():
    """The CPU cores exist twice (baseline and AVX2, chosen at run time); OSCQAT_NO_AVX2=1 forces the baseline.
    Both must give the reference's bits, so both must give each other's."""
    _require("cpp", "cpu")
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        import test_cpp_parity as t
        from helpers.parity import check_act, check_weight, make_act_case, make_weight_case
        for seed, (shape, ch) in enumerate([((33, 65), 33), ((2, 4099), 1), ((96, 64, 3, 3), 96)]):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for special in ("normal", "ties"):
                    check_weight(t.IMPL, make_weight_case(seed, shape, ch, 2 + seed, dtype, special=special), True)
                check_act(t.IMPL, make_act_case(seed, shape, 4, dtype, signed=bool(seed % 2), offset=True))
        print("baseline ok")
    """)
    env = dict(os.environ, OSCQAT_NO_AVX2="1", OMP_NUM_THREADS="1")  # one thread: the reference is faster so
    res = subprocess.run([sys.executable, "-c", script, HERE], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "baseline ok" in res.stdout, res.stdout + res.stderr


# ------------------------------------------------------------------------------------------ registration
def test_fake_implementations_match_real_outputs():
    _require("cpp", "cpu")
    c = make_weight_case(0, (8, 3, 3, 3), 8, 4, torch.bfloat16, device="cpu")
    a = make_act_case(0, (2, 3, 5), 4, torch.float16, signed=True, offset=True, device="cpu")
    ops = torch.ops.oscqat_C
    st_ = {k: c[k].clone() for k in ("prev_int", "flags", "freq", "ema")}
    cases = [
        (ops.weight_fwd.default, (c["w"], c["scale"], c["flags"], c["ema"], c["n"], c["p"], True, 9.0)),
        (ops.weight_fwd.default, (c["w"], c["scale"], None, None, c["n"], c["p"], False, 1.0)),
        (ops.weight_fwd_track.default, (c["w"], c["scale"], st_["prev_int"], st_["flags"], st_["freq"], st_["ema"],
                                        c["f_th"], c["n"], c["p"], 0.01, True, 9.0)),
        (ops.weight_bwd.default, (c["g"], c["w"], c["scale"], c["flags"], c["ema"], c["grad_d"], c["n"], c["p"],
                                  0.1, True, 9.0, False)),
        (ops.act_fwd.default, (a["x"], a["scale"], a["offset"], a["n"], a["p"])),
        (ops.act_bwd.default, (a["g"], a["x"], a["scale"], a["offset"], a["n"], a["p"], 0.1)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_backend_check_messages():
    _require("cpp", "cpu")
    with pytest.raises(backend.BackendUnavailable, match="'cpp' runs CPU tensors only"):
        backend.check("cpp", "cuda")
    with pytest.raises(backend.BackendUnavailable, match="'cuda' runs CUDA tensors only"):
        backend.check("cuda", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(backend.BackendUnavailable, match="cuda"):
            backend.check("cuda", "cuda")


def test_custom_ops_run_the_cpp_kernels():
    """Through oscqat.ops (the torch.library ops the layers call), backend 'cpp' gives the reference's bits."""
    _require("cpp", "cpu")
    c = make_weight_case(4, (16, 1, 3, 3), 16, 4, torch.float32, device="cpu")
    outs = []
    for name in ("torch", "cpp"):
        w = c["w"].clone().requires_grad_()
        s = c["scale"].clone().requires_grad_()
        st_ = {k: c[k].clone() for k in ("prev_int", "flags", "freq", "ema")}
        from oscqat.ops.library import WeightQuantFn
        w_hat, d, counts = WeightQuantFn.apply(w, s, st_["flags"], st_["ema"], (st_["prev_int"], st_["freq"]),
                                               c["f_th"], c["n"], c["p"], 0.01, True, c["damp_div"],
                                               c["grad_scale"], name)
        (w_hat * c["g"]).sum().backward()
        outs.append((w_hat, counts, w.grad, *st_.values()))
    for i, (a, b) in enumerate(zip(*outs)):
        assert_bits(a, b, f"output {i}")


def _weight_quant_run(fn, c, mode, damp, s_min, grads, name):
    """One forward and backward through `fn` (WeightQuantFn.apply's arguments); returns every output, the state
    after the forward and the gradients of w and the scale."""
    w = c["w"].clone().requires_grad_()
    s = c["scale"].clone().requires_grad_()
    st_ = {k: c[k].clone() for k in ("prev_int", "flags", "freq", "ema")}
    flags, ema = (st_["flags"], st_["ema"]) if mode != "stateless" else (None, None)
    track = (st_["prev_int"], st_["freq"]) if mode == "tracked" else None
    w_hat, d, counts = fn(w, s, flags, ema, track, c["f_th"], c["n"], c["p"], 0.01, damp, c["damp_div"],
                          c["grad_scale"], name, s_min)
    outs = [t for t, g in zip((w_hat, d), grads) if g is not None]
    torch.autograd.backward(outs, [g for g in grads if g is not None])
    return [w_hat, d] + ([counts] if counts is not None else []) + list(st_.values()) + [w.grad, s.grad]


@pytest.mark.parametrize("name,device", BACKENDS)
@pytest.mark.parametrize("mode", ["tracked", "frozen-only", "stateless"])
@settings(FAST, max_examples=60)
@given(data=st.data())
def test_weight_quant_op_matches_the_python_function(name, device, mode, data):
    """oscqat_C::weight_quant (the C++ autograd op eager mode uses) gives WeightQuantFn's bits: outputs, state,
    gradients of w and of the scale (with dampening, without, and with only one of the two outputs used), and
    the scale floor."""
    _require(name, device)
    from oscqat.ops.library import WeightQuantFn, quantize_weight
    c = make_weight_case(**data.draw(weight_cases(device=device)))
    damp = data.draw(st.booleans())
    s_min = data.draw(st.sampled_from([None, 1e-6, 0.05]))
    used = data.draw(st.sampled_from(["both", "w_hat", "d"]))
    grads = (c["g"] if used != "d" else None, c["grad_d"] if used != "w_hat" else None)
    a = _weight_quant_run(WeightQuantFn.apply, c, mode, damp, s_min, grads, name)
    b = _weight_quant_run(quantize_weight, c, mode, damp, s_min, grads, name)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x is None) == (y is None), f"output {i}: {x} vs {y}"
        if x is not None:
            assert_bits(x, y, f"output {i}")


def test_weight_quant_op_catches_state_mutated_before_backward():
    """The tracked forward mutates the state it saved; a second tracked forward before the first one's backward
    makes that backward fail, as with WeightQuantFn (the op bumps the state's version counters)."""
    _require("cpp", "cpu")
    from oscqat.ops.library import quantize_weight
    c = make_weight_case(1, (8, 3, 3, 3), 8, 4, torch.float32, device="cpu")
    w = c["w"].clone().requires_grad_()
    st_ = (c["prev_int"].clone(), c["flags"].clone(), c["freq"].clone(), c["ema"].clone())
    args = (c["f_th"], c["n"], c["p"], 0.01, True, c["damp_div"], c["grad_scale"], "cpp")
    w_hat, _, _ = quantize_weight(w, c["scale"], st_[1], st_[3], (st_[0], st_[2]), *args)
    assert "CppNode" in w_hat.grad_fn.name()       # the C++ node, not WeightQuantFn
    quantize_weight(w, c["scale"], st_[1], st_[3], (st_[0], st_[2]), *args)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        w_hat.sum().backward()


def test_weight_quant_fn_on_the_cpp_ops_catches_state_mutated_before_backward():
    """The same through WeightQuantFn on the cpp ops (its path under torch.compile, and wherever it is called
    directly): after the C++ kernel mutated the state in place the Function bumps the state's version counters
    (ops/library.py, `_bump`), as a custom op's mutates_args does, so the earlier backward fails."""
    _require("cpp", "cpu")
    from oscqat.ops.library import WeightQuantFn
    c = make_weight_case(1, (8, 3, 3, 3), 8, 4, torch.float32, device="cpu")
    w = c["w"].clone().requires_grad_()
    st_ = (c["prev_int"].clone(), c["flags"].clone(), c["freq"].clone(), c["ema"].clone())
    args = (c["f_th"], c["n"], c["p"], 0.01, True, c["damp_div"], c["grad_scale"], "cpp")
    w_hat, _, _ = WeightQuantFn.apply(w, c["scale"], st_[1], st_[3], (st_[0], st_[2]), *args)
    assert "WeightQuantFn" in w_hat.grad_fn.name()
    WeightQuantFn.apply(w, c["scale"], st_[1], st_[3], (st_[0], st_[2]), *args)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        w_hat.sum().backward()


@settings(FAST, max_examples=80)
@given(data=st.data())
def test_check_weight_op_agrees_with_the_python_checks(data):
    """oscqat_C::check_weight (the CPU checks of a step's first forward, run in the C++ op) against
    torch.isfinite and weight_check.checksum, on big tensors too (several threads' share), with NaN, +-Inf, the
    largest finite values and subnormals planted anywhere."""
    _require("cpp", "cpu")
    from oscqat.nn import weight_check
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    numel = data.draw(st.sampled_from([1, 7, 1000, 70_001, 300_000]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31 - 1)))
    w = (torch.randn(numel, generator=gen) * 10 ** data.draw(st.integers(-3, 3))).to(dtype)
    specials = [float("nan"), float("inf"), -float("inf"), torch.finfo(dtype).max, -torch.finfo(dtype).max,
                torch.finfo(dtype).tiny / 4, 0.0, -0.0]
    for _ in range(data.draw(st.integers(0, 3))):
        w[data.draw(st.integers(0, numel - 1))] = data.draw(st.sampled_from(specials))
    scale = torch.tensor([data.draw(st.sampled_from([0.1, float("nan"), float("inf"), 1e-30]))])
    finite = bool(torch.isfinite(w).all()) and bool(torch.isfinite(scale).all())
    ref = weight_check.checksum(w)
    other = ref + 1
    check = torch.ops.oscqat_C.check_weight
    assert check(w, scale, None, True) == (0 if finite else 1)
    assert check(w, scale, ref, True) == (0 if finite else 1)
    assert check(w, scale, other, True) == (2 if finite else 1)
    assert check(w, scale, ref, False) == 0 and check(w, scale, other, False) == 2
    if w.numel() > 1:
        assert check(w[::2], scale, weight_check.checksum(w[::2]), False) == 0     # strided: its own elements
    if w.numel() % 100 == 0:                     # dense but not contiguous (a channels_last weight), scanned in place
        wt = w.view(100, -1).t()
        assert check(wt, scale, ref, True) == (0 if finite else 1) and check(wt, scale, other, False) == 2
    # the list form (one pass over all): each weight's answer is check_weight's, whatever else the list holds
    clean = torch.randn(3, 70_000, generator=gen)
    ok = torch.tensor([0.1])
    part = clean[:, ::3]                        # strided
    got = torch.ops.oscqat_C.check_weight_list(
        [w, clean, w, part, part], [scale, ok, scale, ok, ok],
        [ref, None, other, weight_check.checksum(part), weight_check.checksum(part) + 1], [1, 1, 0, 1, 0])
    assert got == [check(w, scale, ref, True), 0, check(w, scale, other, False), 0, 2]


@pytest.mark.parametrize("bad", ["nan_weight", "inf_scale", "changed"])
def test_weight_quantizer_checks_in_the_op_before_writing_state(bad):
    """Eager on the CPU, the C++ op runs the first forward's checks: on a failure nothing of the tracking state is
    written, the error names the layer, and the quantizer stays armed, so a retried forward is checked again."""
    _require("cpp", "cpu")
    import oscqat
    from oscqat.nn import weight_check
    q = oscqat.WeightQuantizer((6, 5), 4, track=True, dampen=True, freeze=True, name="blk.weight").train()
    w = torch.randn(6, 5, requires_grad=True)
    with oscqat.use_backend("cpp"):
        q(w).sum().backward()                     # a clean first step
        q.weight_ref = weight_check.checksum(w)
        q.arm()
        with torch.no_grad():
            if bad == "nan_weight":
                w[2, 3] = float("nan")
            elif bad == "inf_scale":
                q.scale.fill_(float("inf"))
            else:
                w[0, 0] += 1.0
        state = {k: getattr(q, k).clone() for k in ("prev_int", "flags", "freq", "ema")}
        err = oscqat.WeightChangedError if bad == "changed" else oscqat.NonFiniteError
        what = {"nan_weight": r"weight has 1 NaN", "inf_scale": r"scale has 1 Inf", "changed": r"the weight changed"}
        for _ in range(2):
            with pytest.raises(err, match=rf"^blk.weight: {what[bad]}"):
                q(w)
            assert q.armed
            for k, v in state.items():
                assert torch.equal(getattr(q, k), v), k


# ------------------------------------------------------------------------------------------ bad input
def _good(device="cpu"):
    c = make_weight_case(0, (4, 3), 4, 4, torch.float32, device=device)
    a = make_act_case(0, (2, 6), 4, torch.float32, signed=False, offset=True, device=device)
    return c, a


def _fwd(c, **kw):
    args = dict(w=c["w"], scale=c["scale"], flags=c["flags"], ema=c["ema"], n=c["n"], p=c["p"], damp=True,
                damp_div=3.0)
    args.update(kw)
    return torch.ops.oscqat_C.weight_fwd(*args.values())


def _track(c, **kw):
    args = dict(w=c["w"], scale=c["scale"], prev_int=c["prev_int"].clone(), flags=c["flags"].clone(),
                freq=c["freq"].clone(), ema=c["ema"].clone(), f_th=c["f_th"], n=c["n"], p=c["p"], momentum=0.01,
                damp=True, damp_div=3.0)
    args.update(kw)
    return torch.ops.oscqat_C.weight_fwd_track(*args.values())


def _bwd(c, **kw):
    args = dict(g=c["g"], w=c["w"], scale=c["scale"], flags=c["flags"], ema=c["ema"], grad_d=c["grad_d"], n=c["n"],
                p=c["p"], grad_scale=0.1, damp=True, damp_div=3.0, tracked=True)
    args.update(kw)
    return torch.ops.oscqat_C.weight_bwd(*args.values())


def _abwd(a, **kw):
    args = dict(g=a["g"], x=a["x"], scale=a["scale"], offset=a["offset"], n=a["n"], p=a["p"], grad_scale=0.1)
    args.update(kw)
    return torch.ops.oscqat_C.act_bwd(*args.values())


def _bad_cases(device):
    c, a = _good(device)
    dev = torch.device(device)
    return [
        (lambda: _fwd(c, w=c["w"].int()), r"weight_fwd: w must be float32, bfloat16 or float16, got torch.int32"),
        (lambda: _fwd(c, w=c["w"].double()), r"w must be float32, bfloat16 or float16, got torch.float64"),
        (lambda: _fwd(c, scale=c["scale"].double()), r"scale must be float32, got torch.float64"),
        (lambda: _fwd(c, scale=torch.full((5,), 0.1, device=dev)), r"scale has 5 values, which does not divide the 12"),
        (lambda: _fwd(c, scale=c["scale"][:0]), r"scale is empty"),
        (lambda: _fwd(c, flags=c["flags"].float()), r"state flags must be torch.int8, got torch.float32"),
        (lambda: _fwd(c, ema=c["ema"].reshape(3, 4)), r"state ema has shape \[3, 4\] but w has shape \[4, 3\]"),
        (lambda: _fwd(c, ema=None), r"flags and ema must be given together \(got flags only\)"),
        (lambda: _fwd(c, w=c["w"].t()), r"w must be contiguous"),
        (lambda: _fwd(c, n=-200), r"integer range \[n, p\] = \[-200, 7\] is out of range"),
        (lambda: _fwd(c, n=0, p=255), r"need -128 <= n < p <= 127"),
        (lambda: _fwd(c, n=3, p=3), r"integer range"),
        (lambda: _fwd(c, damp_div=0.0), r"damp_div must be positive and finite"),
        (lambda: _track(c, prev_int=c["prev_int"].reshape(3, 4).clone()), r"state prev_int has shape \[3, 4\]"),
        (lambda: _track(c, freq=c["freq"].t().contiguous().t()), r"state freq must be contiguous"),
        (lambda: _track(c, freq=c["freq"].half()), r"state freq must be torch.float32, got torch.float16"),
        (lambda: _track(c, f_th=torch.zeros(2, device=dev)), r"f_th must hold exactly one value"),
        (lambda: _track(c, f_th=torch.zeros((), dtype=torch.int32, device=dev)), r"f_th must be a floating-point"),
        (lambda: _track(c, momentum=1.5), r"momentum must be in \[0, 1\], got 1.5"),
        (lambda: _bwd(c, g=c["g"][:2]), r"g has shape \[2, 3\] but w has shape \[4, 3\]"),
        (lambda: _bwd(c, grad_d=torch.zeros(3, device=dev)), r"grad_d must hold exactly one value"),
        (lambda: _bwd(c, grad_scale=float("nan")), r"grad_scale must be finite"),
        (lambda: torch.ops.oscqat_C.act_fwd(a["x"], torch.ones(2, device=dev), None, 0, 15),
         r"act_fwd: the activation scale must hold one value, got 2"),
        (lambda: torch.ops.oscqat_C.act_fwd(a["x"], a["scale"], None, 0, 256), r"need -128 <= n < p <= 255"),
        (lambda: torch.ops.oscqat_C.act_fwd(a["x"].long(), a["scale"], None, 0, 15), r"x must be float32"),
        (lambda: _abwd(a, g=a["g"].reshape(3, 4)), r"g has shape \[3, 4\] but x has shape \[2, 6\]"),
        (lambda: _abwd(a, offset=torch.zeros(2, device=dev)), r"offset must hold exactly one value"),
    ]


@pytest.mark.parametrize("name,device", BACKENDS)
def test_bad_input_raises_clear_errors(name, device):
    _require(name, device)
    for fn, msg in _bad_cases(device):
        with pytest.raises(RuntimeError, match=msg):
            fn()


def test_cuda_rejects_mixed_devices():
    _require("cuda", "cuda")
    c, a = _good("cuda")
    with pytest.raises(RuntimeError, match=r"scale is on cpu but the first input is on cuda"):
        _fwd(c, scale=c["scale"].cpu())
    with pytest.raises(RuntimeError, match=r"state ema is on cpu but w is on cuda"):
        _fwd(c, ema=c["ema"].cpu())
    with pytest.raises(RuntimeError, match=r"offset is on cpu"):
        _abwd(a, offset=a["offset"].cpu())
    # 0-d control tensors may live on the CPU: same bits as on the device
    gpu = _track(c)
    cpu = _track(c, f_th=c["f_th"].cpu())
    assert_bits(gpu[0], cpu[0], "w_hat, f_th on cpu")
    assert_bits(gpu[2], cpu[2], "counts, f_th on cpu")
