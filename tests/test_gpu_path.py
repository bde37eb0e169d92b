"""The GPU path end to end: the `cuda` and `triton` backends against the reference backend (`torch`) on the same
GPU, in training steps of a small quantized model (tracking, freezing, dampening, LSQ+ offsets): fp32, AMP bf16,
torch.compile (inductor), batched weights (QATConfig.batch_weights), and the deferred checks (NaN/Inf and a
weight changed behind the quantizer's back), which on a GPU are read one optimizer step late without a sync.

Run by bench/gpu_check.py's gpu-path and gpu-path-compiled stages (-k compiled) on the GPU machine. Without a GPU the same tests run for the CPU
targets (the `cpp` backend, and `triton` in the interpreter where cheap; compiled with aot_eager instead of
inductor), so that this code runs in CI and cannot rot; the CUDA targets skip.

Tolerances (tests/helpers/parity.py): outputs, integer states, masks and weight gradients are identical bits; losses
and the gradients of scales and offsets are reductions (summation order): rtol 1e-5 / 1e-4. Against a compiled
step (inductor fuses BatchNorm and ReLU in its own order), the float outputs and gradients within the existing
compile test's tolerances (tests/test_triton_parity.py: rtol 1e-5 outputs, 1e-4 gradients), the per-weight
states identical.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

import oscqat
from oscqat.ops import backends as backend

from helpers.training import train_and_record

# the training runs step the weights, not the scales, on purpose (see _train)
pytestmark = pytest.mark.filterwarnings("ignore:oscqat. an optimizer updates the weights:UserWarning")
CUDA = torch.cuda.is_available()
TARGETS = [("cpu", "cpp"), ("cpu", "triton"), ("cuda", "cuda"), ("cuda", "triton")]
STATE = ("prev_int", "flags", "freq", "ema")


def _need(device: str, name: str) -> None:
    if device == "cuda" and not CUDA:
        pytest.skip("needs a CUDA GPU")
    try:
        backend.check(name, device)
    except backend.BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(autouse=True)
def _deterministic_cudnn():
    """Both runs of a comparison must see the same convolution bits: fixed cuDNN algorithms."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _model(device: str, batch_weights: bool = False, seed: int = 0):
    """Conv + BN + ReLU, a depthwise conv, a pointwise conv and a linear head, W3A4 with LSQ+ offsets, thresholds
    that freeze weights within a few steps; prepared on the CPU (calibration), then moved to `device`."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    x = torch.randn(8, 3, 12, 12)
    cfg = oscqat.QATConfig(weight_bits=3, act_bits=4, per_channel=True, method="dampen+freeze", first_last_bits=None,
                           freeze_start=0.05, freeze_end=0.02, momentum=0.2, warmup=0.0, act_offset=True,
                           weight_init="minmax", act_init="minmax", batch_weights=batch_weights)
    oscqat.prepare(model, cfg, calib_data=[x], verbose=False)
    return model.to(device), x.to(device)


def _autocast(device: str, amp: bool):
    return torch.autocast(device, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _train(device, name, amp=False, compiled=False, batch_weights=False, steps=3):
    """A few SGD steps on backend `name` (helpers.training.train_and_record: scales and offsets get gradients but
    are not stepped, so every forward output, weight gradient and state must be the reference's bits). Returns
    the per-step outputs and the final state."""
    with oscqat.use_backend(name):
        model, x = _model(device, batch_weights)
        fwd = torch.compile(model, backend="inductor" if device == "cuda" else "aot_eager") if compiled else model
        # large enough steps to make weights oscillate and freeze
        return train_and_record(model, x, steps, lr=2.0, fwd=fwd, autocast=lambda: _autocast(device, amp))


def _frozen(state) -> int:
    return sum(int(((v.int() + 1) >> 2 >= 1).sum()) for k, v in state.items() if k.endswith("flags"))


def _assert_like_reference(got, want, exact: bool):
    (outs, state), (outs_r, state_r) = got, want
    assert len(outs) == len(outs_r)
    for i, ((y, loss, grads, lsq), (y_r, loss_r, grads_r, lsq_r)) in enumerate(zip(outs, outs_r)):
        if exact:
            assert torch.equal(y, y_r), f"step {i}: outputs differ"
        else:
            assert torch.allclose(y, y_r, rtol=1e-5, atol=1e-6), f"step {i}: outputs beyond tolerance"
        if loss is not None:
            assert torch.allclose(loss, loss_r, rtol=1e-5, atol=1e-7), f"step {i}: loss"
        for j, (a, b) in enumerate(zip(grads, grads_r)):
            if exact:
                assert torch.equal(a, b), f"step {i}: weight/bias gradient {j} differs"
            else:
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), f"step {i}: gradient {j} beyond tolerance"
        for j, (a, b) in enumerate(zip(lsq, lsq_r)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), f"step {i}: scale/offset gradient {j}"
    assert state.keys() == state_r.keys()
    for k in state:
        if exact or k.endswith(STATE):
            assert torch.equal(state[k], state_r[k]), k
        else:
            assert torch.allclose(state[k].float(), state_r[k].float(), rtol=1e-4, atol=1e-6), k
    assert _frozen(state) > 0, "the run must freeze some weights"


# ---------------------------------------------------------------- training steps against the reference
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp-bf16"])
@pytest.mark.parametrize("device,name", TARGETS, ids=[f"{d}-{n}" for d, n in TARGETS])
def test_training_steps_match_the_reference_backend(device, name, amp):
    """Eager steps on `name` and on the reference backend, same device: outputs, weight gradients and every
    state bit-identical, in fp32 and under AMP (bf16 activations into the activation quantizers, bf16
    gradients back)."""
    _need(device, name)
    if device == "cpu" and name == "triton" and amp:
        pytest.skip("the interpreter is slow; the bf16 triton kernels are covered on CPU by test_triton_parity.py")
    _assert_like_reference(_train(device, name, amp), _train(device, "torch", amp), exact=True)


@pytest.mark.parametrize("device,name", [t for t in TARGETS if t != ("cpu", "triton")],
                         ids=[f"{d}-{n}" for d, n in TARGETS if (d, n) != ("cpu", "triton")])
def test_compiled_training_steps_match_the_eager_reference(device, name):
    """The model under torch.compile (inductor on the GPU; aot_eager on the CPU, to keep CI short) on `name`
    against eager steps on the reference backend: outputs and gradients within the compile tolerances, the
    per-weight states identical."""
    _need(device, name)
    _assert_like_reference(_train(device, name, compiled=True), _train(device, "torch"), exact=False)


# ---------------------------------------------------------------- batched weights
BATCHED = [("cpu", "cpp"), ("cuda", "cuda")]


@pytest.mark.parametrize("device,name", BATCHED, ids=[f"{d}-{n}" for d, n in BATCHED])
def test_batched_weights_train_like_the_reference(device, name):
    """QATConfig(batch_weights=True): every layer's weight quantizer in one op (oscqat_C::weight_quant_list) on
    the device, the reference backend's bits; and the same bits as the same backend layer by layer."""
    _need(device, name)
    from torch.profiler import profile
    got = _train(device, name, batch_weights=True)
    _assert_like_reference(got, _train(device, "torch"), exact=True)
    _assert_like_reference(got, _train(device, name), exact=True)
    with oscqat.use_backend(name):
        model, x = _model(device, batch_weights=True)
        model(x).sum().backward()                   # the first forward records which layers run
        with profile() as prof:
            model(x).sum().backward()
    ran = {e.key for e in prof.key_averages()}
    assert "oscqat_C::weight_quant_list" in ran, sorted(k for k in ran if "oscqat" in k)


def _layers(device: str, seed: int = 0):
    """Weight quantizers of assorted kinds (bits, per-channel, tracked or not, frozen, fp32/bf16 weights)."""
    gen = torch.Generator().manual_seed(seed)
    qs, ws = [], []
    for i, shape in enumerate([(8, 3, 3, 3), (16, 1, 3, 3), (24, 16, 1, 1), (10, 24), (5, 7), (40, 300)]):
        bits = 2 + i if i % 3 == 2 else 4
        track = bits <= 4 and i != 4
        q = oscqat.WeightQuantizer(shape, bits, per_channel=bool(i % 2), track=track, dampen=track,
                                   freeze=track and i != 1, momentum=0.3, name=f"l{i}.weight").train()
        w = torch.randn(shape, generator=gen) * 0.2
        with torch.no_grad():
            q.scale.copy_(torch.full_like(q.scale, 2 * float(w.abs().mean()) / math.sqrt(q.qmax)))
            q.freeze_threshold.fill_(0.2)
        qs.append(q.to(device))
        ws.append(nn.Parameter((w.to(torch.bfloat16) if i == 3 else w).to(device)))
    return qs, ws


def _quantize_steps(device, name, batched, steps=6):
    """quantize_weights (batched) or the per-layer loop, `steps` tracked steps with a weight update between
    them (scales fixed): outputs, D, counts, gradients and states per step."""
    qs, ws = _layers(device)
    gen = torch.Generator().manual_seed(1)
    seen = []
    with oscqat.use_backend(name):
        for _ in range(steps):
            for q in qs:
                q.arm()
            outs = oscqat.quantize_weights(qs, ws) if batched else [q(w) for q, w in zip(qs, ws)]
            r = [torch.randn(o.shape, generator=gen).to(o.dtype).to(device) for o in outs]
            damp = torch.stack([q.last_damp for q in qs if q.last_damp is not None])
            (sum((o * ri).float().sum() for o, ri in zip(outs, r)) + 0.3 * damp.sum()).backward()
            seen.append(dict(outs=[o.detach().clone() for o in outs], damp=damp.detach().clone(),
                             counts=[q.last_counts.clone() for q in qs if q.tracking],
                             wgrad=[w.grad.clone() for w in ws], sgrad=[q.scale.grad.clone() for q in qs],
                             state=[{k: getattr(q, k).clone() for k in STATE if getattr(q, k, None) is not None}
                                    for q in qs]))
            with torch.no_grad():
                for w in ws:
                    w -= 0.5 * w.grad.to(w.dtype)
                    w.grad = None
            for q in qs:
                q.scale.grad = None
    assert sum(int(q.frozen().sum()) for q in qs) > 0, "the freeze path must run"
    return seen


@pytest.mark.parametrize("device,name", BATCHED, ids=[f"{d}-{n}" for d, n in BATCHED])
def test_quantize_weights_on_the_device_is_the_reference(device, name):
    """oscqat.quantize_weights on the device: the reference backend's per-layer bits (outputs, counts, dL/dw,
    states; D and dL/ds to summation order) over tracked steps that freeze weights."""
    _need(device, name)
    got = _quantize_steps(device, name, batched=True)
    want = _quantize_steps(device, "torch", batched=False)
    loop = _quantize_steps(device, name, batched=False)
    for step, (a, b, c) in enumerate(zip(got, want, loop)):
        for key in ("outs", "counts", "wgrad"):
            for x, y, z in zip(a[key], b[key], c[key]):
                assert torch.equal(x, y), f"step {step}: {key} differs from the reference"
                assert torch.equal(x, z), f"step {step}: {key} differs from the per-layer loop"
        assert torch.allclose(a["damp"], b["damp"], rtol=1e-5, atol=1e-7), f"step {step}: D"
        for x, y in zip(a["sgrad"], b["sgrad"]):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-7), f"step {step}: dL/ds"
        for sa, sb in zip(a["state"], b["state"]):
            for k in sa:
                assert torch.equal(sa[k], sb[k]), f"step {step}: state {k}"


# ---------------------------------------------------------------- the deferred checks
def _step(model, opt, x, phase: list, bad_grad=None):
    phase[0] = "forward"
    loss = model(x).float().square().mean() + 0.1 * oscqat.dampening_loss(model)
    loss.backward()
    if bad_grad is not None:                     # a non-finite gradient, as an overflowing loss would give
        bad_grad.grad.view(-1)[0] = float("nan")
    phase[0] = "step"
    opt.step()
    opt.zero_grad()


WHAT = ["input-nan", "weight-nan-from-grad", "weight-changed", "weight-nan-from-grad-batched"]


@pytest.mark.parametrize("what", WHAT)
@pytest.mark.parametrize("device,name", [t for t in TARGETS if t != ("cpu", "triton")],
                         ids=[f"{d}-{n}" for d, n in TARGETS if (d, n) != ("cpu", "triton")])
def test_deferred_checks_name_the_layer(device, name, what):
    """A NaN in the input, a NaN weight left by a non-finite gradient, a weight changed in place: eager on the
    CPU the forward that sees it raises at once; on a GPU no forward raises (that would sync) and the optimizer
    step after that forward's step raises, naming the first quantizer hit in module order."""
    _need(device, name)
    batched = what.endswith("batched")
    if batched and name == "triton":
        pytest.skip("batch_weights runs on the cpp/cuda backends")
    with oscqat.use_backend(name):
        model, x = _model(device, batch_weights=batched)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        phase = ["forward"]
        for _ in range(2):                             # clean steps: nothing raised, checksums recorded
            _step(model, opt, x, phase)
        bad_x, bad_grad = x, None
        if what == "input-nan":
            bad_x = x.clone()
            bad_x[0, 0, 0, 0] = float("nan")
            err, where, cpu_msg = oscqat.NonFiniteError, "0.input", "input has 1 NaN"
        elif what.startswith("weight-nan"):
            bad_grad = model[3].weight                 # its step's forward is clean; the next one sees the NaN
            err, where, cpu_msg = oscqat.NonFiniteError, "3.weight", "weight has 1 NaN"
        else:
            with torch.no_grad():
                model[6].weight.view(-1)[0] += 1.0
            err, where, cpu_msg = oscqat.WeightChangedError, "6.weight", "the weight changed"
        bad_forward = 1 if bad_grad is not None else 0   # steps after this one whose forward sees it
        raised = None
        for k in range(6):
            try:
                _step(model, opt, bad_x if k == 0 else x, phase, bad_grad if k == 0 else None)
            except (oscqat.NonFiniteError, oscqat.WeightChangedError) as e:
                raised = (k, phase[0], e)
                break
    assert raised is not None, "nothing was raised"
    k, ph, e = raised
    assert isinstance(e, err), f"{type(e).__name__}: {e}"
    if device == "cpu":
        assert (k, ph) == (bad_forward, "forward"), (k, ph, str(e))
        assert str(e).startswith(f"{where}: {cpu_msg}"), str(e)
    else:
        # on the GPU: at the optimizer step after the one that took the bad forward's flags (later only if the
        # flags' copy to the host had not arrived by then); never in a forward
        assert ph == "step" and bad_forward + 1 <= k <= bad_forward + 3, (k, ph, str(e))
        assert str(e).startswith(f"{where}: "), str(e)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_deferred_check_reads_the_flags_without_a_sync(name):
    """The optimizer step's hooks (scale bound, checksums, the flags' copy to pinned memory and the read of the
    previous step's) never wait for the GPU."""
    _need("cuda", name)
    with oscqat.use_backend(name):
        model, x = _model("cuda")
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        phase = ["forward"]
        for _ in range(3):
            _step(model, opt, x, phase)
        loss = model(x).float().square().mean() + 0.1 * oscqat.dampening_loss(model)
        loss.backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            opt.step()                  # the second one reads the first one's flags
        finally:
            torch.cuda.set_sync_debug_mode("default")
