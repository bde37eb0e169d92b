"""The `triton` backend (kernels/, `oscqat.kernels`) against the reference, bit for bit (docs/semantics.md).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest.py
before triton is imported; set here too in case this file runs alone). With a GPU they run compiled, on
CUDA tensors (OSCQAT_TEST_DEVICE overrides the device), and the tests marked `gpu` run as well.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import oscqat
from oscqat.ops import backends as backend
from oscqat.ops import reference as ref

from helpers import parity as P
from helpers.training import train_and_record

K = pytest.importorskip("oscqat.kernels.triton.backend")
DEV = os.environ.get("OSCQAT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.skipif(not backend.available("triton", DEV),
                                reason=f"the triton backend cannot run {DEV} tensors here")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FAST = settings(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
INTERP = bool(getattr(K, "_INTERPRETED", False))
N_WEIGHT = 250 if INTERP else 400
N_ACT = 300 if INTERP else 400


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The reference runs tiny tensors; on a shared, loaded CPU torch's thread pool makes it 10-100x slower."""
    n = torch.get_num_threads()
    if DEV == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)




def _wcase(**kw):
    d = dict(seed=0, shape=(1,), channels=1, bits=4, dtype=torch.float32, special="normal", frozen_frac=0.3,
             f_th=0.02, device=DEV)
    d.update(kw)
    return d


def _acase(**kw):
    d = dict(seed=0, shape=(1,), bits=4, dtype=torch.float32, signed=True, offset=False, special="normal",
             device=DEV)
    d.update(kw)
    return d


# ---------------------------------------------------------------- generated parity
@settings(FAST, max_examples=N_WEIGHT)
@given(case=P.weight_cases(device=DEV), damp=st.booleans(), momentum=st.sampled_from([0.01, 0.001, 0.3]))
@example(case=_wcase(), damp=True, momentum=0.01)                                          # 1 element
@example(case=_wcase(bits=2, special="ties", frozen_frac=0.0), damp=True, momentum=0.01)
@example(case=_wcase(shape=(3, 12347), channels=3, bits=3, dtype=torch.bfloat16, frozen_frac=1.0), damp=True,
         momentum=0.001)                                                                   # large-ish odd, all frozen
@example(case=_wcase(shape=(37041,), channels=1, bits=8, dtype=torch.float16, special="ties", frozen_frac=0.0,
                     f_th=0.001), damp=True, momentum=0.3)                                 # large-ish odd, per tensor
@example(case=_wcase(shape=(5, 7, 1, 1), channels=5, bits=2, dtype=torch.bfloat16, special="far"), damp=True,
         momentum=0.01)
def test_weight_parity(case, damp, momentum):
    c = P.make_weight_case(**case)
    P.check_weight(K, c, damp, momentum)


@settings(FAST, max_examples=N_ACT)
@given(case=P.act_cases(device=DEV))
@example(case=_acase())                                                                   # 1 element
@example(case=_acase(offset=True, special="ties", bits=2))
@example(case=_acase(shape=(3, 12347), bits=3, dtype=torch.bfloat16, signed=False, offset=True))
@example(case=_acase(shape=(37041,), bits=8, dtype=torch.float16, special="ties", signed=False))
def test_act_parity(case):
    P.check_act(K, P.make_act_case(**case))


@settings(FAST, max_examples=60 if INTERP else 150)
@given(case=P.weight_cases(device=DEV), damp=st.booleans())
@example(case=_wcase(shape=(3, 12347), channels=3, dtype=torch.bfloat16), damp=True)
def test_deterministic(case, damp):
    P.check_deterministic(K, P.make_weight_case(**case), damp)


# ---------------------------------------------------------------- many programs, finalize pass, int64 offsets
@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 128 elements and the GPU's tile fitting: grids of many programs and the second (finalize)
    pass, which the interpreter's default single large tile does not reach."""
    monkeypatch.setattr(K, "TILE", 128)
    monkeypatch.setattr(K, "FIT_TILES", True)
    monkeypatch.setattr(K, "_FINAL_TILE", 64)


MULTI = [
    _wcase(shape=(1000,), channels=1, bits=4, dtype=torch.float32, special="ties"),
    _wcase(shape=(24, 1, 3, 3), channels=24, bits=3, dtype=torch.bfloat16, frozen_frac=0.3),
    _wcase(shape=(5, 77), channels=5, bits=2, dtype=torch.float16, frozen_frac=1.0, f_th=0.001),
    _wcase(shape=(40, 17), channels=40, bits=5, dtype=torch.float32, frozen_frac=0.0),
    _wcase(shape=(3, 333), channels=3, bits=8, dtype=torch.bfloat16, special="far"),
    _wcase(shape=(2, 300), channels=1, bits=4, dtype=torch.float32, f_th=0.001),    # per tensor, 5 programs
]


@pytest.mark.parametrize("case", MULTI, ids=lambda c: f"{c['shape']}x{c['channels']}-{c['dtype']}")
def test_weight_parity_many_programs(case, small_tiles):
    c = P.make_weight_case(**case)
    bc, bk, nkb, grid = K._weight_tiles(case["channels"], math.prod(case["shape"]) // case["channels"])
    assert grid > 1
    P.check_weight(K, c, damp=True)
    P.check_deterministic(K, c, damp=True)


@pytest.mark.parametrize("case", [_acase(shape=(4, 333), offset=True, dtype=torch.bfloat16),
                                  _acase(shape=(3, 100), bits=2, signed=False, special="ties")])
def test_act_parity_many_programs(case, small_tiles):
    P.check_act(K, P.make_act_case(**case))


def test_int64_offsets(monkeypatch):
    """The int64-offset variants (taken for >= 2^31 elements) compute the same bits."""
    monkeypatch.setattr(K, "_I32_LIMIT", 0)
    P.check_weight(K, P.make_weight_case(**_wcase(shape=(6, 55), channels=6, bits=3, dtype=torch.bfloat16)),
                   damp=True)
    P.check_act(K, P.make_act_case(**_acase(shape=(3, 50), offset=True)))


def test_tile_choice():
    for C, K_ in [(1, 1), (1, 7), (1, 100_000_003), (3, 12347), (64, 576), (960, 9), (50_000_000, 2), (7, 1025)]:
        bc, bk, nkb, grid = K._weight_tiles(C, K_)
        assert bk & (bk - 1) == 0 and bc & (bc - 1) == 0 and bc * bk <= max(K.TILE, bk)
        assert nkb * bk >= K_ and (nkb - 1) * bk < K_ and grid * bc * bk >= C * K_
        assert grid < 2 ** 31


# ---------------------------------------------------------------- exact bits: signed zeros, specials
def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("dtype", P.DTYPES)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_special_values_and_signed_zeros(dtype):
    """inf, nan, huge, subnormal, signed zeros, exact ties and values just off them: outputs and gradients
    identical to the reference, down to the sign of zero (and NaN wherever the reference has NaN)."""
    s = torch.tensor([0.125], device=DEV)
    k = torch.arange(-20, 21, dtype=torch.float32)
    vals = torch.cat([k * 0.0625, (k + 0.5) * 0.125, (k + 0.5) * 0.125 + 1e-3, -torch.rand(16) * 0.06,
                      torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3e38, -3e38, 1e-40,
                                    -1e-40, 0.0624, -0.0624, -0.0625, 0.0625])]).to(dtype).to(DEV)
    g = torch.randn(vals.shape, generator=torch.Generator().manual_seed(0)).to(dtype).to(DEV)
    for bits in (2, 4):
        n, p = P.bounds(bits)
        args = (vals, s, None, None, n, p, False, 1.0)
        a, r = K.weight_fwd(*args)[0], ref.weight_fwd(*args)[0]
        P.assert_bits(a, r, "w_hat")
        assert torch.equal(_bits(a)[~a.isnan()], _bits(r)[~r.isnan()]), "w_hat bits (signed zeros)"
        bargs = (g, vals, s, None, None, torch.tensor(0.3, device=DEV), n, p, 0.1, True, 3.0, False)
        a, r = K.weight_bwd(*bargs)[0], ref.weight_bwd(*bargs)[0]
        P.assert_bits(a, r, "dL/dw")
        assert torch.equal(_bits(a)[~a.isnan()], _bits(r)[~r.isnan()]), "dL/dw bits (signed zeros)"
        for signed in (True, False):
            n, p = P.bounds(bits, signed)
            for off in (None, torch.tensor([0.0625], device=DEV)):
                a, r = K.act_fwd(vals, s, off, n, p), ref.act_fwd(vals, s, off, n, p)
                P.assert_bits(a, r, "activation output")
                assert torch.equal(_bits(a)[~a.isnan()], _bits(r)[~r.isnan()]), "activation bits (signed zeros)"
                a, r = K.act_bwd(g, vals, s, off, n, p, 0.1)[0], ref.act_bwd(g, vals, s, off, n, p, 0.1)[0]
                P.assert_bits(a, r, "dL/dx")
                assert torch.equal(_bits(a)[~a.isnan()], _bits(r)[~r.isnan()]), "dL/dx bits (signed zeros)"


def test_freezing_rounds_ema_half_to_even_with_signed_zero():
    """Newly frozen weights store round_half_to_even(ema): -0.5 -> -0.0, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2."""
    ema = torch.tensor([-0.5, 0.5, 1.5, 2.5, -1.5, -2.5, -0.3, 0.49999997], device=DEV)
    shape = ema.shape
    w = torch.zeros(shape, device=DEV)
    st_k = dict(prev_int=torch.ones(shape, dtype=torch.int8, device=DEV),
                flags=torch.full(shape, -1, dtype=torch.int8, device=DEV),     # last_dir -1, not frozen
                freq=torch.full(shape, 0.5, device=DEV), ema=ema.clone())
    st_r = {k: v.clone() for k, v in st_k.items()}
    f_th = torch.tensor(0.01, device=DEV)
    args = (w, torch.tensor([0.1], device=DEV))
    a = K.weight_fwd_track(*args, *st_k.values(), f_th, -8, 7, 0.01, False, 1.0)
    r = ref.weight_fwd_track(*args, *st_r.values(), f_th, -8, 7, 0.01, False, 1.0)
    for x, y in zip(a, r):
        P.assert_bits(x, y, "outputs")
    for k in st_k:
        P.assert_bits(st_k[k], st_r[k], k)
    assert torch.equal(_bits(st_k["ema"]), _bits(st_r["ema"]))
    assert (st_k["flags"] == 4 * 2 - 1).all()      # newly frozen (fz = 2), last_dir -1 (w went 1 -> 0)


# ---------------------------------------------------------------- through oscqat: use_backend and the ops
def _tiny_model(per_channel):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(6 * 4 * 4, 5))
    x = torch.randn(4, 2, 6, 6)
    cfg = oscqat.QATConfig(weight_bits=3, act_bits=4, per_channel=per_channel, method="dampen+freeze",
                           first_last_bits=None, freeze_start=0.05, freeze_end=0.02, momentum=0.2, warmup=0.0,
                           act_offset=True, weight_init="minmax", act_init="minmax")
    oscqat.prepare(model, cfg, calib_data=[x])
    return model.to(DEV), x.to(DEV)


def _train(name, per_channel, steps=3):
    """A few steps (helpers.training.train_and_record); scales and offsets stay put (their gradients are
    reductions, equal only up to summation order), so every forward output, weight gradient and state must be
    bit-identical across backends."""
    with oscqat.use_backend(name):
        model, x = _tiny_model(per_channel)
        return train_and_record(model, x, steps, lr=0.5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_use_backend_triton_trains_like_the_reference(per_channel):
    """oscqat.use_backend('triton') runs a quantized model with tracking, freezing, dampening and LSQ+ offsets
    (CPU tensors in the interpreter): outputs, weight gradients and states match the reference bit for bit;
    losses and scale/offset gradients (reductions) to within summation order."""
    got, got_state = _train("triton", per_channel)
    want, want_state = _train("torch", per_channel)
    for (y, loss, grads, lsq), (y_r, loss_r, grads_r, lsq_r) in zip(got, want):
        assert torch.equal(y, y_r)
        if loss is not None:
            assert torch.allclose(loss, loss_r, rtol=1e-5, atol=1e-7)
        for a, b in zip(grads, grads_r):
            assert torch.equal(a, b)
        for a, b in zip(lsq, lsq_r):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert got_state.keys() == want_state.keys()
    for k in got_state:
        assert torch.equal(got_state[k], want_state[k]), k
    frozen = sum(int(((v.int() + 1) >> 2 >= 1).sum()) for k, v in got_state.items() if k.endswith("flags"))
    assert frozen > 0, "the run must freeze some weights"


def test_use_backend_selects_and_restores():
    before = oscqat.get_backend()
    with oscqat.use_backend("triton"):
        assert oscqat.get_backend() == "triton"
        assert backend.resolve(DEV) == "triton"
        w = torch.randn(4, 3, device=DEV)
        q = oscqat.WeightQuantizer(w.shape, 4).to(DEV)
        q.scale.data.fill_(0.1)
        q.train()
        w_hat = q(w)
        assert torch.equal(w_hat, ref.weight_fwd(w, q.scale, None, None, -8, 7, False, 1.0)[0])
    assert oscqat.get_backend() == before


def test_check_reasons():
    K.check("triton", DEV)
    with pytest.raises(backend.BackendUnavailable, match="not 'mps'"):
        K.check("triton", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(backend.BackendUnavailable, match="CUDA GPU"):
            K.check("triton", "cuda")


def test_check_explains_why_triton_cannot_run():
    """In a fresh process: CPU tensors without TRITON_INTERPRET, and triton not importable at all."""
    code = textwrap.dedent("""
        import sys, torch
        from oscqat.ops import backends as backend
        from oscqat.kernels.triton import backend as K
        if not K._INTERPRETED:
            try:
                K.check("triton", "cpu")
                raise SystemExit("check passed without the interpreter")
            except backend.BackendUnavailable as e:
                assert "TRITON_INTERPRET=1" in str(e), e
            assert not backend.available("triton", "cpu")
            print("cpu:", K._IMPORT_ERROR is None)
        for m in [m for m in sys.modules if m == "triton" or m.startswith(("triton.", "oscqat.kernels"))]:
            del sys.modules[m]
        sys.modules["triton"] = None                  # import triton -> ImportError
        from oscqat.kernels.triton import backend as K2
        for dev in ("cpu", "cuda"):
            try:
                K2.check("triton", dev)
                raise SystemExit("check passed without triton")
            except backend.BackendUnavailable as e:
                assert "'triton' package" in str(e) and "pip install triton" in str(e), e
        try:
            backend.set_backend("triton")
            raise SystemExit("set_backend passed without triton")
        except backend.BackendUnavailable as e:
            assert "triton" in str(e)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""                  # the compiled-kernel case can't use a GPU for cpu tensors
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


# ---------------------------------------------------------------- GPU only
# Kept for GPU machines; without one, their claims are covered by: parity of the same kernels in the
# interpreter with the GPU's tile choice and multi-program grids (test_weight_parity_many_programs,
# test_act_parity_many_programs, test_int64_offsets for the >2^31-element paths) and their compilation for
# sm_80/90/100 with no spill (tests/test_triton_aot.py, CI's AOT stage); no host-device sync: the launch code
# runs on meta tensors, where any read of a device value raises (test_triton_aot.py). Only the compiled
# kernels' own bits on a GPU, and torch.compile on CUDA, need a GPU.
@gpu
def test_gpu_parity_on_cuda_tensors():
    gpu_cases = [_wcase(shape=(4097, 3), channels=4097, bits=4, dtype=torch.bfloat16),      # 9 programs
                 _wcase(shape=(257, 1031), channels=257, bits=3, dtype=torch.float16),      # 257 x 1031 / 64
                 _wcase(shape=(257, 1031), channels=1, bits=2, dtype=torch.float32, special="ties")]
    for case in MULTI + gpu_cases:
        c = P.make_weight_case(**{**case, "device": "cuda"})
        P.check_weight(K, c, damp=True)
        P.check_deterministic(K, c, damp=True)
    for case in (_acase(shape=(64, 3001), offset=True, dtype=torch.bfloat16), _acase(shape=(1,), signed=False)):
        P.check_act(K, P.make_act_case(**{**case, "device": "cuda"}))


@gpu
@pytest.mark.parametrize("shape,channels", [((100_000_007,), 1), ((1009, 99_109), 1009)])
def test_gpu_large_tensors(shape, channels):
    c = P.make_weight_case(0, shape, channels, 4, torch.bfloat16, device="cuda")
    P.check_weight(K, c, damp=True)
    del c
    torch.cuda.empty_cache()
    P.check_act(K, P.make_act_case(0, shape, 4, torch.float16, True, True, device="cuda"))


@gpu
def test_gpu_no_host_device_sync():
    c = P.make_weight_case(0, (64, 3, 3, 3), 64, 4, torch.float16, device="cuda")
    a = P.make_act_case(0, (8, 1000), 4, torch.bfloat16, False, True, device="cuda")
    K.weight_fwd(c["w"], c["scale"], c["flags"], c["ema"], c["n"], c["p"], True, c["damp_div"])   # compile first
    K.weight_fwd_track(c["w"], c["scale"], c["prev_int"], c["flags"], c["freq"], c["ema"], c["f_th"], c["n"],
                       c["p"], 0.01, True, c["damp_div"])
    K.weight_bwd(c["g"], c["w"], c["scale"], c["flags"], c["ema"], c["grad_d"], c["n"], c["p"], 0.1, True,
                 c["damp_div"], True)
    K.act_fwd(a["x"], a["scale"], a["offset"], a["n"], a["p"])
    K.act_bwd(a["g"], a["x"], a["scale"], a["offset"], a["n"], a["p"], 0.1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        K.weight_fwd(c["w"], c["scale"], c["flags"], c["ema"], c["n"], c["p"], True, c["damp_div"])
        K.weight_fwd_track(c["w"], c["scale"], c["prev_int"], c["flags"], c["freq"], c["ema"], c["f_th"], c["n"],
                           c["p"], 0.01, True, c["damp_div"])
        K.weight_bwd(c["g"], c["w"], c["scale"], c["flags"], c["ema"], c["grad_d"], c["n"], c["p"], 0.1, True,
                     c["damp_div"], True)
        K.act_fwd(a["x"], a["scale"], a["offset"], a["n"], a["p"])
        K.act_bwd(a["g"], a["x"], a["scale"], a["offset"], a["n"], a["p"], 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
def test_gpu_torch_compile_matches_eager():
    """A quantized model on the triton backend under torch.compile gives the eager results: outputs, losses,
    gradients, and the integer states after a few tracked steps."""
    def run(compile_):
        with oscqat.use_backend("triton"):
            model, x = _tiny_model(per_channel=True)
            model, x = model.cuda(), x.cuda()
            step_fn = torch.compile(model) if compile_ else model
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            sched = oscqat.QATSchedule(model, 4)
            outs = []
            for _ in range(4):
                y = step_fn(x)
                loss = y.square().mean() + 0.1 * oscqat.dampening_loss(model)
                loss.backward()
                outs.append((y.detach().clone(), [p.grad.clone() for p in model.parameters()]))
                opt.step()
                opt.zero_grad()
                sched.step()
            state = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("prev_int", "flags"))}
            return outs, state

    eager, eager_state = run(False)
    compiled, compiled_state = run(True)
    for (y, grads), (y_c, grads_c) in zip(eager, compiled):
        assert torch.allclose(y, y_c, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, grads_c):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    for k in eager_state:
        assert torch.equal(eager_state[k], compiled_state[k]), k
