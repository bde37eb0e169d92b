"""The rules of docs/semantics.md through the public modules (WeightQuantizer, QuantAct, QuantConv2d,
QATSchedule, TransitionRateSchedule), so that the constants and flags that oscqat/quantizers.py and
oscqat/ops.py hand to every backend are checked: the LSQ gradient scales 1/sqrt(N_c p) and 1/sqrt(F p), the
dampening divisor, momentum, the `tracked` flag, the scale floor, the schedules. Hand-derived numbers, as in
tests/test_rules_reference.py; each test runs on every CPU backend.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

import oscqat
from oscqat.backend import available
from oscqat.transition import target_rate

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


@pytest.mark.parametrize("signed, shape, feats", [(True, (2, 2), 2), (True, (2, 1, 2), 2), (True, (4,), 4),
                                                  (False, (1, 4), 4)])
def test_activation_gradient_scale_uses_features_per_sample(signed, shape, feats):
    # o 0.3, s 0.5: xs = [-0.4, 8, -8.6, 2] -> R [-0, 8, -9, 2]. Signed (p 7): in range [1, 0, 0, 1], q [0, 7, -8, 2];
    # unsigned (p 15): in range [1, 1, 0, 1], q [0, 8, 0, 2]. gs = 1 / sqrt(F p), F = numel / batch.
    a = oscqat.QuantAct(4, signed=signed, offset=True).train()
    a.scale.data, a.offset.data, a.initialized = _t([0.5]), _t([0.3]), True
    x = _t([0.1, 4.3, -4.0, 1.3]).reshape(shape).requires_grad_()
    g = _t([1.0, 2.0, -1.0, 0.5]).reshape(shape)
    (a(x) * g).sum().backward()
    p = 7 if signed else 15
    gs = 1 / math.sqrt(feats * p)
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
    a(_t([[1.0, -3.0], [2.0, 0.0]]))
    assert a.scale.item() == pytest.approx(2 * 1.5 / math.sqrt(7), rel=1e-6)     # 2 mean|x| / sqrt(p)
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
        sched = oscqat.QATSchedule(model, 100)
        sched.load_state_dict({"step_count": t - 1, "total_steps": 100})
        sched.step()
        want_f = f_th if "freeze" in method else 0.0
        want_lam = lam if "dampen" in method else 0.0
        assert sched.freeze_threshold == pytest.approx(want_f, rel=1e-9, abs=1e-15)
        assert sched.lam == pytest.approx(want_lam, rel=1e-9, abs=1e-15)
        for q in oscqat.weight_quantizers(model):
            assert q.freeze_threshold.item() == float(F(want_f)) and q.armed


def test_transition_target_rate_by_hand():
    assert target_rate(25, 100, 1e-2, 1e-3) == pytest.approx(1e-3 + 9e-3 * C40, rel=1e-12)
    assert target_rate(200, 100, 1e-2, 1e-3) == pytest.approx(1e-3, rel=1e-12)
    assert target_rate(25, 100, 1e-2, 1e-3, "linear") == pytest.approx(0.00775, rel=1e-12)
    assert target_rate(29, 90, 1e-2, 1e-4, "step") == pytest.approx(1e-2, rel=1e-12)
    assert target_rate(31, 90, 1e-2, 1e-4, "step") == pytest.approx(1e-3, rel=1e-12)
    assert target_rate(61, 90, 1e-2, 1e-4, "step") == pytest.approx(1e-4, rel=1e-12)


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
        assert talr.mu.item() == pytest.approx(mu, rel=1e-5)
        assert talr.lr.item() == pytest.approx(0.02 * mu, rel=1e-5) and opt.param_groups[-1]["lr"] is talr.lr
