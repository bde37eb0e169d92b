"""The rules of docs/semantics.md through the public modules (WeightQuantizer, QuantAct, QuantConv2d,
QATSchedule, TransitionRateSchedule), so that the constants and flags that oscqat/nn/quantizers.py and
oscqat/ops/library.py hand to every backend are checked: the LSQ gradient scales 1/sqrt(N_c p) and 1/sqrt(F p), the
dampening divisor, momentum, the `tracked` flag, the scale floor, the schedules. Hand-derived numbers, as in
tests/test_rules_reference.py; each test runs on every CPU backend.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

import oscqat
from oscqat.ops.backends import available
from oscqat.training.transition import target_rate

F = np.float32


@pytest.fixture(autouse=True, params=[b for b in ("torch", "cpp") if available(b, "cpu")])
def backend(request):
    with oscqat.use_backend(request.param):
        yield request.param


def _t(v, grad=False):
    return torch.tensor(v, dtype=torch.float32, requires_grad=grad)


W = [[0.3, 1.1, -0.8], [0.6, 2.6, -0.3]]
G = [[1.0, -2.0, 0.5], [1.5, 3.0, -1.0]]


@pytest.mark.parametrize("per_channel, lsq, scale, sums, gs", [
    # per channel s [0.5, 0.25]: ints [1, 2, -2], [2, 7 (out of range), -1]; N_c = 3, p = 7
    (True, True, [0.5, 0.25], [0.4 + 0.4 - 0.2, -0.6 + 21 - 0.2], 1 / math.sqrt(3 * 7)),
    # per tensor s 0.25: ints [1, 4, -3], [2, 7 (out), -1]; N_c = 6
    (False, True, [0.25], [(-0.2 + 0.8 + 0.1) + (-0.6 + 21 - 0.2)], 1 / math.sqrt(6 * 7)),
    (False, False, [0.25], [(-0.2 + 0.8 + 0.1) + (-0.6 + 21 - 0.2)], 1.0)])
def test_weight_lsq_gradient_scale_is_one_over_sqrt_nc_p(per_channel, lsq, scale, sums, gs):
    q = WeightQuantizerT((2, 3), per_channel=per_channel, lsq_grad_scale=lsq, track=False)
    q.scale.data = _t(scale)
    w = _t(W, grad=True)
    (q(w) * _t(G)).sum().backward()
    assert w.grad.tolist() == [[1.0, -2.0, 0.5], [1.5, 0.0, -1.0]]
    assert q.scale.grad.tolist() == pytest.approx([gs * v for v in sums], rel=1e-5)


def WeightQuantizerT(shape, **kw):
    q = oscqat.WeightQuantizer(shape, bits=kw.pop("bits", 4), **kw)
    q.train()
    return q


@pytest.mark.parametrize("reduction, div", [("kernel_mean", 4.0), ("sum", 1.0)])
def test_dampening_divisor_is_the_fan_in(reduction, div):
    # weight (2, 2, 1, 2): fan-in 4, numel 8 (per tensor, so numel / C would be 8). s 0.5: x = 2 w ->
    # ints [0, 2, -1, 0, 1, -2, 1, 0]; err = s w_int - w = [-.2, .1, -.2, -.1, -.2, .1, .1, 0], sum of squares 0.16
    cfg = oscqat.QATConfig(4, 4, "dampen", quantize_activations=False, damp_reduction=reduction)
    layer = oscqat.QuantConv2d(2, 2, (1, 2), bias=False, config=cfg).train()
    w = [0.2, 0.9, -0.3, 0.1, 0.7, -1.1, 0.4, 0.0]
    err = [-0.2, 0.1, -0.2, -0.1, -0.2, 0.1, 0.1, 0.0]
    layer.weight.data = _t(w).reshape(2, 2, 1, 2)
    layer.weight_quant.scale.data = _t([0.5])
    layer(torch.zeros(1, 2, 1, 2))
    d = oscqat.dampening_loss(layer)
    assert d.item() == pytest.approx(0.16 / div, rel=1e-5)
    (0.5 * d).backward()                   # lam 0.5: dL/dw = (2 * 0.5 / div) * (w - s w_int), all inside
    assert layer.weight.grad.flatten().tolist() == pytest.approx([-(1.0 / div) * e for e in err], rel=1e-5, abs=1e-7)
    assert layer.weight_quant.scale.grad.item() == 0.0


@pytest.mark.parametrize("signed, shape, feats, lsq", [(True, (2, 2), 2, True), (True, (2, 1, 2), 2, True),
                                                       (True, (4,), 4, True), (False, (1, 4), 4, True),
                                                       (True, (2, 2), 2, False)])
def test_activation_gradient_scale_uses_features_per_sample(signed, shape, feats, lsq):
    # o 0.3, s 0.5: xs = [-0.4, 8, -8.6, 2] -> R [-0, 8, -9, 2]. Signed (p 7): in range [1, 0, 0, 1], q [0, 7, -8, 2];
    # unsigned (p 15): in range [1, 1, 0, 1], q [0, 8, 0, 2]. gs = 1 / sqrt(F p), F = numel / batch.
    a = oscqat.QuantAct(4, signed=signed, offset=True, lsq_grad_scale=lsq).train()
    a.scale.data, a.offset.data, a.initialized = _t([0.5]), _t([0.3]), True
    x = _t([0.1, 4.3, -4.0, 1.3]).reshape(shape).requires_grad_()
    g = _t([1.0, 2.0, -1.0, 0.5]).reshape(shape)
    (a(x) * g).sum().backward()
    p = 7 if signed else 15
    gs = 1 / math.sqrt(feats * p) if lsq else 1.0
    if signed:
        assert x.grad.flatten().tolist() == [1.0, 0.0, 0.0, 0.5]
        assert a.offset.grad.item() == pytest.approx(gs * (2.0 - 1.0), rel=1e-6)
        assert a.scale.grad.item() == pytest.approx(gs * (0.4 + 14 + 8), rel=1e-5)
    else:
        assert x.grad.flatten().tolist() == [1.0, 2.0, 0.0, 0.5]
        assert a.offset.grad.item() == pytest.approx(gs * -1.0, rel=1e-6)
        assert a.scale.grad.item() == pytest.approx(gs * 0.4, rel=1e-5)


def test_activation_scale_lsq_init_from_the_first_training_batch():
    a = oscqat.QuantAct(4, signed=True).train()
    with pytest.raises(oscqat.NonFiniteError):
        a(_t([[1.0, float("nan")]]))
    assert a.scale.item() == 1.0 and not a.initialized     # a NaN batch initialises nothing
    a(_t([[1.0, -3.0], [2.0, 0.0]]))
    assert a.scale.item() == pytest.approx(2 * 1.5 / math.sqrt(7), rel=1e-6)     # 2 mean|x| / sqrt(p)
    a(_t([[10.0, 10.0]]))
    assert a.scale.item() == pytest.approx(2 * 1.5 / math.sqrt(7), rel=1e-6)     # once only
    b = oscqat.QuantAct(4, signed=True, offset=True).train()
    assert b.scale.tolist() == [1.0] and b.offset.tolist() == [0.0]              # before any data
    b(_t([[0.5, -0.25]]))
    assert b.scale.item() == pytest.approx(2 * 0.375 / math.sqrt(7), rel=1e-6) and b.offset.item() == 0.0
    z = oscqat.QuantAct(3, signed=False).train()
    z(torch.zeros(2, 3))
    assert z.scale.item() == pytest.approx(1 / 7)                                  # all zero: 1 / p


def test_tracked_flag_and_momentum_reach_the_kernel():
    q = WeightQuantizerT((4,), momentum=0.1)
    q.scale.data = _t([1.0])
    g = _t([1.0, 2.0, 3.0, 4.0])
    w = _t([1.0, 2.0, 0.0, 3.0], grad=True)
    q(w)                                                     # first tracked forward: initialises
    q.flags.copy_(torch.tensor([1, 1, 0, 0], dtype=torch.int8))      # last_dir +1
    q.freq.copy_(_t([0.15, 0.0, 0.0, 0.0]))
    q.freeze_threshold.fill_(0.2)
    w = _t([0.2, 2.0, 0.0, 3.0], grad=True)                  # weight 0: 1 -> 0, a reversal: freq 0.235 > 0.2
    q.arm()
    y = q(w)
    (y * g).sum().backward()
    assert y.tolist() == [0.0, 2.0, 0.0, 3.0]               # frozen from the next forward on
    assert q.flags.tolist() == [-1 + 8, 1, 0, 0] and q.last_counts.tolist() == [1, 1]
    assert q.freq[0].item() == float(F(F(F(0.9) * F(0.15)) + F(0.1)))
    assert w.grad.tolist() == [1.0, 2.0, 3.0, 4.0]          # its own backward: not frozen (tracked = True)
    assert q.scale.grad.item() == pytest.approx(1.0 * (0 - 0.2) / math.sqrt(4 * 7), rel=1e-6)
    w.grad = None
    y = q(w)                                                 # not armed: an untracked forward
    (y * g).sum().backward()
    assert y.tolist() == [1.0, 2.0, 0.0, 3.0] and w.grad.tolist() == [0.0, 2.0, 3.0, 4.0]
    assert q.flags.tolist() == [7, 1, 0, 0]
    w.grad = None
    q.arm()
    y = q(w)
    (y * g).sum().backward()
    # frozen_int 1 against prev_int 0: freezing changed the integer, counted; up against last_dir -1: oscillation
    assert y.tolist() == [1.0, 2.0, 0.0, 3.0] and w.grad.tolist() == [0.0, 2.0, 3.0, 4.0]
    assert q.flags.tolist() == [1 + 4, 1, 0, 0] and q.last_counts.tolist() == [1, 1]
    # the views of the packed state
    assert q.frozen().tolist() == [True, False, False, False] and q.frozen_int().tolist() == [1, 0, 0, 0]
    assert q.last_dir().tolist() == [1, 1, 0, 0]
    q.scale.data = _t([0.5])
    assert q.int_weight(_t([0.2, 2.0, -1.1, 3.9])).tolist() == [1, 4, -2, 7]     # x [., 4, -2.2, 7.8 -> 7]


def test_uninitialised_state_decodes_to_not_frozen_and_no_direction():
    q = WeightQuantizerT((3,))
    assert q.flags.tolist() == [-128] * 3
    assert q.frozen().tolist() == [False] * 3 and q.last_dir().tolist() == [0] * 3
    assert q.frozen_int().tolist() == [0] * 3 and q.last_counts.tolist() == [0, 0]
    pc = WeightQuantizerT((2, 3), per_channel=True, track=False)
    pc.scale.data = _t([0.5, 0.25])
    assert pc.int_weight(_t(W)).tolist() == [[1, 2, -2], [2, 7, -1]]      # per-channel scales, clamped at p


def test_momentum_one_minus_m_in_double_through_the_module():
    q = WeightQuantizerT((1,), momentum=0.058)
    q.scale.data = _t([1.0])
    q(_t([0.0], grad=True))
    q.freq.fill_(1.0)
    q.arm()
    q(_t([0.0], grad=True))
    assert q.freq.item() == float(F(1.0 - 0.058)) != float(F(F(1) - F(0.058)))


def test_scale_floor_quantizes_at_the_floor_and_passes_the_gradient_straight_through():
    q = WeightQuantizerT((3,), track=False, scale_min=0.25)
    q.scale.data = _t([-0.5])
    w = _t([0.3, -0.6, 2.5], grad=True)
    y = q(w)                                                 # s_used 0.25: x [1.2, -2.4, 10] -> [1, -2, 7 (out)]
    y.sum().backward()
    assert y.tolist() == [0.25, -0.5, 1.75]
    assert q.scale.grad.item() == pytest.approx((-0.2 + 0.4 + 7) / math.sqrt(3 * 7), rel=1e-5)   # not 0
    a = oscqat.QuantAct(4, signed=True, scale_min=0.25).train()
    a.scale.data, a.initialized = _t([0.0]), True
    x = _t([[0.3, 1.0]], grad=True)                          # xs [1.2, 4] -> [1, 4]
    out = a(x)
    out.sum().backward()
    assert out.tolist() == [[0.25, 1.0]]
    assert a.scale.grad.item() == pytest.approx((1 - 1.2 + 0.0) / math.sqrt(2 * 7), rel=1e-5)


@pytest.mark.parametrize("kind, x, y, gsum", [
    # 4 bits: weights and signed activations on [-8, 7], unsigned activations on [0, 15]; s = 1. The in-range
    # test is on the rounded value: -8.6 -> -9 and 7.6 -> 8 are out (no gradient), -0.4 -> -0 is in.
    # gsum = sum(q - x * in_range): -8 + 7 (the clamped ones); unsigned 0 + 0.4 + 0 + 15
    ("weight", [-8.0, -8.6, 7.0, 7.6], [-8.0, -8.0, 7.0, 7.0], -1.0),
    ("signed", [-8.0, -8.6, 7.0, 7.6], [-8.0, -8.0, 7.0, 7.0], -1.0),
    ("unsigned", [-0.4, -0.6, 15.0, 15.6], [0.0, 0.0, 15.0, 15.0], 15.4)])
def test_grid_bounds_of_each_quantizer(kind, x, y, gsum):
    q = WeightQuantizerT((4,), track=False) if kind == "weight" else \
        oscqat.QuantAct(4, signed=kind == "signed").train()
    q.scale.data = _t([1.0])
    q.initialized = True
    xt = _t(x, grad=True)
    out = q(xt)
    out.sum().backward()
    assert out.tolist() == y and xt.grad.tolist() == [1.0, 0.0, 1.0, 0.0]
    p = 15 if kind == "unsigned" else 7
    assert q.scale.grad.item() == pytest.approx(gsum / math.sqrt(4 * p), rel=1e-6)


def test_checkpointed_state_is_the_scale_the_threshold_and_the_four_buffers():
    sd = WeightQuantizerT((2, 3)).state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items() if isinstance(v, torch.Tensor)} == {
        "scale": (torch.float32, (1,)), "prev_int": (torch.int8, (2, 3)), "flags": (torch.int8, (2, 3)),
        "freq": (torch.float32, (2, 3)), "ema": (torch.float32, (2, 3)), "freeze_threshold": (torch.float32, ())}


def test_default_scale_floor_is_1e_6():
    q = WeightQuantizerT((1,), track=False)
    q.scale.data = _t([0.0])
    # x = 1e-5 / 1e-6 = 10 -> clamped at p = 7 (another floor gives another value)
    assert q(_t([1e-5], grad=True)).item() == float(F(F(1e-6) * F(7)))
    a = oscqat.QuantAct(8, signed=True).train()
    a.scale.data, a.initialized = _t([-1.0]), True
    assert a(_t([[-1e-3]])).item() == float(F(F(1e-6) * F(-128)))


def test_tracked_forward_that_overwrites_saved_state_fails_the_earlier_backward():
    # an untracked forward saves flags/ema for its backward; a later tracked forward rewrites them in place:
    # the earlier backward must be refused by autograd's version check, not run on the new state
    q = WeightQuantizerT((3,))
    w = _t([0.1, 0.5, 1.2], grad=True)
    q(w)
    y1 = q(w)
    q.arm()
    q(w)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y1.sum().backward()


def test_dampening_term_left_out_of_the_loss_adds_nothing():
    cfg = oscqat.QATConfig(4, 4, "dampen", quantize_activations=False)
    layer = oscqat.QuantLinear(3, 1, bias=False, config=cfg).train()
    layer.weight.data = _t([[0.3, 1.1, -0.8]])
    layer.weight_quant.scale.data = _t([0.25])
    layer(_t([[1.0, 2.0, 3.0]])).sum().backward()          # the layer's D is computed but not used
    assert layer.weight.grad.tolist() == [[1.0, 2.0, 3.0]]


def test_without_tracking_nothing_dampens_or_freezes():
    q = WeightQuantizerT((2,), track=False, dampen=True, freeze=True)
    assert (q.tracking, q.dampen, q.freeze) == (False, False, False)
    q(_t([0.3, 0.6], grad=True))
    assert q.last_damp is None and q.flags is None and q.frozen().tolist() == [False, False]


def test_bad_input_is_named_and_checked_in_the_first_training_forward_only():
    with pytest.raises(ValueError, match="WeightQuantizer: cannot quantize an empty weight"):
        oscqat.WeightQuantizer((0, 3))
    with pytest.raises(TypeError, match="^WeightQuantizer: weight must be a floating-point tensor"):
        WeightQuantizerT((2,))(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="^QuantAct: input must be a floating-point tensor"):
        oscqat.QuantAct(4)(torch.tensor([[1, 2]]))
    q = WeightQuantizerT((2,), track=False)
    with pytest.raises(oscqat.NonFiniteError, match="^WeightQuantizer: weight has 1 NaN"):
        q(_t([0.3, float("nan")], grad=True))
    q = WeightQuantizerT((2,), track=False)
    q(_t([0.3, 0.6], grad=True))                            # the step's first forward: checked, then disarmed
    assert torch.isnan(q(_t([0.3, float("nan")], grad=True))).tolist() == [False, True]   # not checked again
    a = oscqat.QuantAct(4, name="blk.input").train()
    a.initialized = True
    with pytest.raises(oscqat.NonFiniteError, match="^blk.input: input has 1 Inf"):
        a(_t([[1.0, float("inf")]]))
    a = oscqat.QuantAct(4, offset=True, name="blk.input").train()
    a.initialized, a.offset.data = True, _t([float("nan")])
    with pytest.raises(oscqat.NonFiniteError, match="^blk.input: offset has 1 NaN"):
        a(_t([[1.0, 2.0]]))


def test_quant_conv2d_forward_and_every_gradient_by_hand():
    cfg = oscqat.QATConfig(4, 4, "dampen+freeze")
    layer = oscqat.QuantConv2d(1, 2, (1, 3), bias=False, config=cfg).train()
    layer.weight.data = _t(W).reshape(2, 1, 1, 3)             # s 0.25: ints [1, 4, -3], [2, 7 (out), -1]
    layer.weight_quant.scale.data = _t([0.25])
    layer.input_quant.scale.data, layer.input_quant.initialized = _t([0.5]), True
    x = _t([0.3, -1.2, 2.0], grad=True)                      # xs [0.6, -2.4, 4] -> q [1, -2, 4]: [0.5, -1, 2]
    out = layer(x.reshape(1, 1, 1, 3)).flatten()
    assert out.tolist() == pytest.approx([0.5 * 0.25 - 1.0 - 1.5, 0.5 * 0.5 - 1.75 - 0.5], rel=1e-6)
    d = oscqat.dampening_loss(layer)                         # fan-in 3; err [-.05, -.1, .05], [-.1, 0, .05]
    assert d.item() == pytest.approx(0.0275 / 3, rel=1e-5)
    (out[0] + 2 * out[1] + 0.5 * d).backward()
    # dL/dw_hat = c_o * xq, c = [1, 2]; dampening coef 2 * 0.5 / 3; weight (1, 1) is outside [-2, 1.75]
    c = 1 / 3
    exp_w = [0.5 + c * 0.05, -1 + c * 0.1, 2 - c * 0.05, 1 + c * 0.1, 0.0, 4 - c * 0.05]
    assert layer.weight.grad.flatten().tolist() == pytest.approx(exp_w, rel=1e-5)
    # 0.5 (1 - 1.2) - (4 - 4.4) + 2 (-3 + 3.2) + 1 (2 - 2.4) - 2 * 7 + 4 (-1 + 1.2); N_c 6
    assert layer.weight_quant.scale.grad.item() == pytest.approx(-12.9 / math.sqrt(6 * 7), rel=1e-5)
    # dL/dxq = sum_o c_o w_hat = [1.25, 4.5, -1.25]; F = 3
    assert x.grad.tolist() == pytest.approx([1.25, 4.5, -1.25], rel=1e-6)
    assert layer.input_quant.scale.grad.item() == pytest.approx((1.25 * 0.4 + 4.5 * 0.4) / math.sqrt(3 * 7),
                                                                rel=1e-5)


def test_a_weight_changed_outside_the_optimizer_is_refused_by_the_next_tracked_forward():
    # docs/semantics.md, "Weights changed outside the optimizer": a torch.optim step records the checksum of the
    # layer's weight; the step's first training forward raises when the weight differs (here through .data, which
    # moves no version counter), before any state is written; eval forwards are not checked; arm_tracking accepts
    # the weight as it is. On each CPU backend (the torch backend checks in Python, cpp inside its C++ op).
    cfg = oscqat.QATConfig(4, 4, "dampen+freeze", quantize_activations=False, first_last_bits=None)
    layer = oscqat.QuantLinear(3, 2, bias=False, config=cfg, name="fc").train()
    q = layer.weight_quant
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = _t([[1.0, -2.0, 0.5]])
    for _ in range(2):
        layer(x).sum().backward()
        opt.step()
        opt.zero_grad()
    assert q.weight_ref is not None and q.armed
    state = [t.clone() for t in (q.prev_int, q.flags, q.freq, q.ema)]
    layer.weight.data.mul_(1.5)
    layer.eval()
    layer(x)                                                 # not checked
    layer.train()
    with pytest.raises(oscqat.WeightChangedError, match=r"^fc\.weight: the weight changed outside the optimizer"):
        layer(x)
    assert all(torch.equal(a, b) for a, b in zip(state, (q.prev_int, q.flags, q.freq, q.ema))) and q.armed
    oscqat.arm_tracking(layer)                               # a deliberate change, accepted
    layer(x).sum().backward()
    assert not q.armed


# ---------------------------------------------------------------- schedules
def _three_linear(method):
    torch.manual_seed(0)
    cfg = oscqat.QATConfig(4, 4, method, quantize_activations=False, first_last_bits=None, freeze_start=0.05,
                           freeze_end=0.01, damp_lambda=0.1, warmup=0.2, weight_init="minmax")
    return oscqat.prepare(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)), cfg, verbose=False)


C40 = (1 + math.cos(math.pi / 4)) / 2          # t 40 of 100, warm-up 20: u = 20 / 80


@pytest.mark.parametrize("t, f_th, lam", [(19, 0.0, 0.0), (20, 0.05, 0.0), (40, 0.01 + 0.04 * C40, 0.1 * (1 - C40)),
                                          (60, 0.03, 0.05), (100, 0.01, 0.1), (150, 0.01, 0.1)])
def test_freeze_threshold_and_lambda_schedule(t, f_th, lam):
    for method in ("dampen+freeze", "dampen", "freeze"):
        model = _three_linear(method)
        want_f = f_th if "freeze" in method else 0.0
        want_lam = lam if "dampen" in method else 0.0
        sched = oscqat.QATSchedule(model, 7)
        sched.load_state_dict({"step_count": t, "total_steps": 100})        # applies f_th at once
        assert sched.freeze_threshold == pytest.approx(want_f, rel=1e-9, abs=1e-15)
        assert sched.lam == pytest.approx(want_lam, rel=1e-9, abs=1e-15)
        qs = oscqat.weight_quantizers(model)
        assert [q.freeze_threshold.item() for q in qs] == [float(F(want_f))] * 3
        # one step from t - 1 gets there too, arms the next forward and projects scales onto their floor
        sched.load_state_dict({"step_count": t - 1, "total_steps": 100})
        model(torch.zeros(1, 4)).sum().backward()
        qs[0].scale.data.fill_(-1.0)
        assert not any(q.armed for q in qs)
        sched.step()
        assert sched.freeze_threshold == pytest.approx(want_f, rel=1e-9, abs=1e-15)
        assert [q.freeze_threshold.item() for q in qs] == [float(F(want_f))] * 3
        assert all(q.armed for q in qs) and qs[0].scale.item() == float(F(1e-6))


def test_schedule_of_a_single_step():
    sched = oscqat.QATSchedule(_three_linear("dampen+freeze"), 1)       # warm-up 0.2: w = 0.2, u = 1 at t = 1
    assert (sched.freeze_threshold, sched.lam) == (0.0, 0.0)
    sched.step()
    assert sched.freeze_threshold == pytest.approx(0.01) and sched.lam == pytest.approx(0.1)


def test_arm_tracking_arms_every_quantizer():
    cfg = oscqat.QATConfig(4, 4, "lsq", first_last_bits=None)
    model = oscqat.prepare(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), cfg, calib_data=[torch.randn(8, 4)],
                           verbose=False)
    model(torch.randn(2, 4)).sum().backward()
    qs = oscqat.quantizers(model)
    assert len(qs) == 4 and not any(q.armed for q in qs)
    oscqat.arm_tracking(model)
    assert all(q.armed for q in qs)


def test_schedule_step_records_weights_updated_without_torch_optim():
    # docs/semantics.md, "Weights changed outside the optimizer": QATSchedule.step() records every layer's weight
    # checksum, so an update made without a torch.optim optimizer is not taken for a change behind its back
    cfg = oscqat.QATConfig(4, 4, "dampen+freeze", quantize_activations=False, first_last_bits=None)
    model = oscqat.prepare(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), cfg, calib_data=[torch.randn(8, 4)],
                           verbose=False)
    sched = oscqat.QATSchedule(model, 10)
    oscqat.arm_tracking(model)                               # records the weights as they are
    for _ in range(3):
        model(torch.randn(2, 4)).square().sum().backward()  # raises WeightChangedError on a stale record
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
                p.grad = None
        sched.step()
    assert all(q.weight_ref is not None for q in oscqat.weight_quantizers(model))


def test_dampening_loss_without_dampening_is_a_zero_on_the_model_device():
    cfg = oscqat.QATConfig(4, 4, "lsq", quantize_activations=False)
    layer = oscqat.QuantLinear(2, 1, config=cfg)
    layer(torch.ones(1, 2))
    assert oscqat.dampening_loss(layer.to("meta")).device.type == "meta"


def test_dampening_loss_sums_the_layers():
    # two layers at s 0.5: D1 = (0.2^2 + 0.1^2) / 2, D2 = (0.2^2 + 0.2^2) / 2 (fan-in 2)
    cfg = oscqat.QATConfig(4, 4, "dampen", quantize_activations=False, first_last_bits=None)
    model = nn.Sequential(oscqat.QuantLinear(2, 1, bias=False, config=cfg), nn.Linear(1, 2, bias=False),
                          oscqat.QuantLinear(2, 1, bias=False, config=cfg)).train()
    for layer, w in ((model[0], [[0.2, 0.9]]), (model[2], [[0.7, -1.2]])):
        layer.weight.data = _t(w)
        layer.weight_quant.scale.data = _t([0.5])
    model(torch.ones(1, 2))
    assert oscqat.dampening_loss(model).item() == pytest.approx(0.05 / 2 + 0.08 / 2, rel=1e-5)
    plain = nn.Sequential(oscqat.QuantLinear(2, 1, config=oscqat.QATConfig(4, 4, "lsq", quantize_activations=False)))
    plain(torch.ones(1, 2))
    zero = oscqat.dampening_loss(plain)
    assert zero.dim() == 0 and zero.item() == 0.0
    with pytest.raises(ValueError, match="no oscqat weight quantizer"):      # not prepared: not a silent zero
        oscqat.dampening_loss(nn.ReLU())


def test_transition_target_rate_by_hand():
    assert target_rate(25, 100, 1e-2, 1e-3) == pytest.approx(1e-3 + 9e-3 * C40, rel=1e-12)
    assert target_rate(200, 100, 1e-2, 1e-3) == pytest.approx(1e-3, rel=1e-12)
    assert target_rate(25, 100, 1e-2, 1e-3, "linear") == pytest.approx(0.00775, rel=1e-12)
    assert target_rate(29, 90, 1e-2, 1e-4, "step") == pytest.approx(1e-2, rel=1e-12)
    assert target_rate(31, 90, 1e-2, 1e-4, "step") == pytest.approx(1e-3, rel=1e-12)
    assert target_rate(61, 90, 1e-2, 1e-4, "step") == pytest.approx(1e-4, rel=1e-12)
    assert (target_rate(0, 1, 0.4, 0.1), target_rate(1, 1, 0.4, 0.1)) == pytest.approx((0.4, 0.1), rel=1e-12)
    assert target_rate(0, 0, 0.4, 0.1) == pytest.approx(0.1, rel=1e-12)       # a schedule of no steps is at its end
    # a zero target (additive rule): the step schedule holds start until the last milestone, then end
    assert [target_rate(t, 90, 1e-2, 0.0, "step") for t in (31, 61)] == [1e-2, 0.0]
    assert [target_rate(t, 90, 0.0, 1e-2, "step") for t in (31, 61)] == [0.0, 1e-2]


def test_transition_controller_by_hand():
    torch.manual_seed(0)
    cfg = oscqat.QATConfig(4, 4, "tr", quantize_activations=False, first_last_bits=None, weight_init="minmax")
    m = oscqat.prepare(nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False)), cfg, verbose=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.02)
    talr = oscqat.TransitionRateSchedule(m, opt, 4, tr_start=0.4, tr_end=0.1, gamma=0.5)
    qs = oscqat.weight_quantizers(m)                 # 8 and 4 weights
    # k_t = 0.1 + 0.3 (1 + cos(pi t / 4)) / 2
    k = {1: 0.1 + 0.3 * C40, 2: 0.25, 3: 0.1 + 0.3 * (1 - C40), 4: 0.1, 5: 0.1, 6: 0.1}
    mu = 1.0
    for t, (sa, sb) in enumerate([(5, 1), (3, 0), (8, 4), (8, 4), (0, 0)]):
        for q, s in zip(qs, (sa, sb)):
            q.last_counts = torch.tensor([s, 0], dtype=torch.int32)     # as a tracked forward leaves them
        talr.step()
        if t == 0:                                   # the initialising forward is not a measurement
            assert talr.mu.item() == 1.0
            continue
        tr = (sa + sb) / 12
        e = min(1.0, max(-4.0, (k[t] - tr) / k[t]))  # t 1: 0.298; t 2: -3; t 3: -5.9 -> -4; t 4: 1
        mu = mu * (k[t + 2] / k[t + 1]) * math.exp(0.5 * e)
        assert talr.last_rate.item() == pytest.approx(tr, rel=1e-6)
        assert talr.last_rates.tolist() == pytest.approx([sa / 8, sb / 4], rel=1e-6)
        assert talr.mu.dim() == 0 and talr.mu.item() == pytest.approx(mu, rel=1e-5)
        assert talr.lr.item() == pytest.approx(0.02 * mu, rel=1e-5) and opt.param_groups[-1]["lr"] is talr.lr
        opt.param_groups[-1]["lr"] = 0.5                     # as an LR scheduler does: the next step() re-binds
    m(torch.zeros(1, 4)).sum().backward()                    # a training forward disarms; step() arms again
    assert not any(q.armed for q in qs)
    talr.step()
    assert all(q.armed for q in qs) and opt.param_groups[-1]["lr"] is talr.lr
