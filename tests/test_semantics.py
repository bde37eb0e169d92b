"""Hand-computed values for every formula of docs/semantics.md, on the reference (`torch`) backend."""
import math

import numpy as np
import pytest
import torch

from oscqat.ops import reference as ref
from oscqat.ops.library import WeightQuantFn

f32 = np.float32


def state(shape):
    return (torch.zeros(shape, dtype=torch.int8), torch.full(shape, ref.UNINIT, dtype=torch.int8),
            torch.zeros(shape), torch.zeros(shape))


def test_quantize_rounds_half_to_even_and_clamps():
    s = torch.tensor([0.25])
    w = torch.tensor([0.125, 0.375, 0.625, -0.125, -0.375, 3.0, -3.0, 1.7 * 0.25])
    w_hat, _ = ref.weight_fwd(w, s, None, None, -8, 7, False, 1.0)
    assert w_hat.tolist() == [0.0, 0.5, 0.5, -0.0, -0.5, 1.75, -2.0, 0.5]
    g = torch.ones_like(w)
    gw, _ = ref.weight_bwd(g, w, s, None, None, torch.zeros(()), -8, 7, 1.0, False, 1.0, False)
    assert gw.tolist() == [1, 1, 1, 1, 1, 0, 0, 1]          # out-of-grid weights get no gradient


def test_in_range_uses_the_rounded_value():
    # x = 7.25 rounds to 7 (in range, gradient flows); x = 7.5 rounds to 8 (out of range) although < p + 1
    s = torch.tensor([1.0])
    w = torch.tensor([7.25, 7.5, -8.5, -8.25])
    gw, _ = ref.weight_bwd(torch.ones(4), w, s, None, None, torch.zeros(()), -8, 7, 1.0, False, 1.0, False)
    assert gw.tolist() == [1, 0, 1, 1]   # -8.5 rounds to -8 (even): in range


def test_scale_gradient_by_hand():
    s = torch.tensor([0.5])
    w = torch.tensor([0.2, 0.9, 5.0])          # x = 0.4, 1.8, 10 -> w_int 0, 2, 3 (clamped, p = 3 at 3 bits)
    g = torch.tensor([1.0, 2.0, -1.0])
    gs_factor = 1 / math.sqrt(3 * 3)
    _, gs = ref.weight_bwd(g, w, s, None, None, torch.zeros(()), -4, 3, gs_factor, False, 1.0, False)
    expected = gs_factor * (1.0 * (0 - 0.4) + 2.0 * (2 - 1.8) + -1.0 * 3)
    assert gs.item() == pytest.approx(expected, rel=1e-6)


def test_per_channel_scale_gradient_by_hand():
    s = torch.tensor([1.0, 0.5])
    w = torch.tensor([[0.4, 1.2], [0.4, -0.2]])    # x: [0.4, 1.2], [0.8, -0.4] -> ints [0, 1], [1, 0]
    g = torch.ones(2, 2)
    _, gs = ref.weight_bwd(g, w, s, None, None, torch.zeros(()), -4, 3, 1.0, False, 1.0, False)
    assert gs.tolist() == pytest.approx([(0 - 0.4) + (1 - 1.2), (1 - 0.8) + (0 + 0.4)], rel=1e-6)


def _track(w, s, st, f_th=0.0, m=0.25, damp=False):
    prev, flags, freq, ema = st
    return ref.weight_fwd_track(w, s, prev, flags, freq, ema, torch.tensor(f_th), -4, 3, m, damp, 1.0)


def test_tracking_follows_algorithm_1_by_hand():
    m = 0.25
    s = torch.tensor([1.0])
    st = state((1,))
    ints = [0, 1, 0, 0, 1, 2, 2, 1]
    freq, ema, last_dir = f32(0), f32(0), 0
    expected_counts = []
    for t, k in enumerate(ints):
        _, _, counts = _track(torch.tensor([float(k)]), s, st, m=m)
        if t == 0:
            ema, exp_counts = f32(k), [0, 0]
        else:
            delta = k - ints[t - 1]
            d = int(np.sign(delta))
            osc = delta != 0 and d == -last_dir
            freq = f32(f32(1 - m) * freq) + (f32(m) if osc else f32(0))
            if delta:
                last_dir = d
            ema = f32(f32(f32(1 - m) * ema) + f32(f32(m) * f32(k)))
            exp_counts = [int(delta != 0), int(osc)]
        expected_counts.append(exp_counts)
        assert counts.tolist() == exp_counts, t
        assert st[0].item() == k and st[2].item() == freq and st[3].item() == ema, t
        fz, ld = ref.decode_flags(st[1])
        assert (fz.item(), ld.item()) == (0, last_dir), t
    # 0->1 is a first change (no oscillation), 1->0 and 0->1 reverse, 1->2 continues up, 2->1 reverses
    assert [c[1] for c in expected_counts] == [0, 0, 1, 0, 1, 0, 0, 1]


def test_first_tracked_step_initialises_without_counting():
    st = state((3,))
    _, _, counts = _track(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0]), st, f_th=1e-9)
    assert counts.tolist() == [0, 0]
    assert st[0].tolist() == [1, -2, 3] and st[1].tolist() == [0, 0, 0]
    assert st[2].tolist() == [0, 0, 0] and st[3].tolist() == [1, -2, 3]


def test_freezing_by_hand():
    s = torch.tensor([1.0])
    prev, flags, freq, ema = state((2,))
    prev[:] = torch.tensor([2, 2], dtype=torch.int8)
    flags[:] = torch.tensor([1, 1], dtype=torch.int8)          # last_dir = +1, not frozen
    freq[:] = torch.tensor([0.5, 0.001])
    ema[:] = torch.tensor([2.5, 2.5])                          # round half to even -> 2
    st = (prev, flags, freq, ema)
    w = torch.tensor([1.0, 2.0])                               # weight 0: 2 -> 1, a reversal; weight 1 stays
    w_hat, _, counts = _track(w, s, st, f_th=0.2, m=0.25)
    assert counts.tolist() == [1, 1]
    assert w_hat.tolist() == [1.0, 2.0]                        # the decision applies from the next forward
    fz, _ = ref.decode_flags(flags)
    assert fz.tolist() == [2, 0]                               # weight 0: freq 0.625 > 0.2 -> frozen now
    assert ema[0].item() == 2.0                                # frozen_int = round(EMA before this step)
    assert ema[1].item() == np.float32(np.float32(0.75 * np.float32(2.5)) + np.float32(0.5))
    # the tracked forward's own backward still sees weight 0 as not frozen
    gw, _ = ref.weight_bwd(torch.ones(2), w, s, flags, ema, torch.zeros(()), -4, 3, 1.0, False, 1.0, True)
    assert gw.tolist() == [1.0, 1.0]
    # later forwards (tracked or not) use frozen_int whatever the latent weight does
    w2 = torch.tensor([-3.0, -3.0])
    assert ref.weight_fwd(w2, s, flags, ema, -4, 3, False, 1.0)[0].tolist() == [2.0, -3.0]
    gw, gs = ref.weight_bwd(torch.ones(2), w2, s, flags, ema, torch.zeros(()), -4, 3, 1.0, False, 1.0, False)
    assert gw.tolist() == [0.0, 1.0]                            # frozen: no gradient to w
    assert gs.item() == pytest.approx(2.0 + (-3 - (-3.0)))    # frozen weight's dL/ds is frozen_int
    for _ in range(3):
        w_hat, _, _ = _track(w2, s, st, f_th=0.2)
        assert w_hat[0].item() == 2.0 and ema[0].item() == 2.0
    fz, _ = ref.decode_flags(flags)
    assert fz.tolist()[0] == 1


def test_freezing_off_when_threshold_is_zero():
    st = state((1,))
    _track(torch.tensor([0.0]), torch.tensor([1.0]), st)
    st[2].fill_(0.9)
    _track(torch.tensor([1.0]), torch.tensor([1.0]), st, f_th=0.0)
    assert ref.decode_flags(st[1])[0].item() == 0


def test_dampening_term_and_gradient_by_hand():
    s = torch.tensor([0.5])
    w = torch.tensor([0.2, 0.9, 5.0, -0.3])     # ints 0, 2, 3(clamped), -1; bounds [s*n, s*p] = [-2, 1.5]
    _, d = ref.weight_fwd(w, s, None, None, -4, 3, True, 2.0)
    clip = [0.2, 0.9, 1.5, -0.3]
    sw = [0.0, 1.0, 1.5, -0.5]
    assert d.item() == pytest.approx(sum((a - b) ** 2 for a, b in zip(sw, clip)) / 2.0, rel=1e-6)
    gw, gs_damp = ref.weight_bwd(torch.zeros(4), w, s, None, None, torch.tensor(3.0), -4, 3, 1.0, True, 2.0, False)
    inside = [1, 1, 0, 1]
    exp = [2 * 3.0 / 2.0 * (c - q) * i for c, q, i in zip(clip, sw, inside)]
    assert gw.tolist() == pytest.approx(exp, rel=1e-6)
    _, gs_plain = ref.weight_bwd(torch.zeros(4), w, s, None, None, torch.zeros(()), -4, 3, 1.0, False, 2.0, False)
    assert gs_damp.item() == gs_plain.item() == 0.0             # D's gradient goes to w only


def test_activation_lsq_and_lsq_plus_by_hand():
    s = torch.tensor([0.5])
    x = torch.tensor([[0.3, 1.0, 9.0, -0.2]])
    y = ref.act_fwd(x, s, None, 0, 15)
    assert y.tolist() == [[0.5, 1.0, 7.5, -0.0]]
    g = torch.ones(1, 4)
    gx, gs, go = ref.act_bwd(g, x, s, None, 0, 15, 1.0)
    assert gx.tolist() == [[1, 1, 0, 1]]
    assert gs.item() == pytest.approx((1 - 0.6) + (2 - 2.0) + 15 + (0 + 0.4), rel=1e-6)
    assert go.item() == 0.0
    off = torch.tensor([0.25])
    y = ref.act_fwd(x, s, off, -8, 7)                          # (x - 0.25) / 0.5 = 0.1, 1.5, 17.5, -0.9
    assert y.tolist() == [[0.25, 1.25, 3.75, -0.25]]
    gx, gs, go = ref.act_bwd(g, x, s, off, -8, 7, 1.0)
    assert go.item() == 1.0                                     # only the clipped element passes to the offset


def test_lsq_gradients_match_an_independent_autograd_formulation():
    torch.manual_seed(0)
    for per_channel, dtype in ((False, torch.float32), (True, torch.float32), (True, torch.bfloat16)):
        w = (torch.randn(6, 4, 3, 3) * 0.3).to(dtype)
        s = torch.rand(6 if per_channel else 1) * 0.05 + 0.02
        n, p = -8, 7
        gsf = 1 / math.sqrt(w.numel() // s.numel() * p)
        g = torch.randn_like(w)
        # ours
        w1, s1 = w.clone().requires_grad_(), s.clone().requires_grad_()
        out, _, _ = WeightQuantFn.apply(w1, s1, None, None, None, None, n, p, 0.0, False, 1.0, gsf, "torch")
        out.backward(g)
        # independent: STE through round, LSQ gradient-scale trick, autograd for the rest
        w2, s2 = w.float().clone().requires_grad_(), s.clone().requires_grad_()
        sg = s2 * gsf + (s2 - s2 * gsf).detach()
        sb = sg.reshape(-1, *([1] * (w.dim() - 1)))
        x = w2 * (1.0 / sb)
        xr = x + (torch.round(x) - x).detach()
        # in range on the rounded value, bounds included (docs/semantics.md); spelled out, because torch.clamp's
        # own gradient at a bound changed between releases (2.14 passes none there)
        inside = (xr >= n) & (xr <= p)
        (torch.where(inside, xr, xr.detach().clamp(n, p)) * sb).backward(g.float())
        assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-6), (per_channel, dtype)
        # autograd's path multiplies g by s * (1/s), one rounding away from g: same mask, values within 1 ulp
        rtol = 1e-6 if dtype == torch.float32 else 8e-3
        torch.testing.assert_close(w1.grad.float(), w2.grad.to(dtype).float(), rtol=rtol, atol=0)
