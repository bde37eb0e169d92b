"""Every rule of docs/semantics.md on the reference (`torch`) kernels, with hand-derived numbers chosen so that
the nearest wrong variant of each rule gives a different answer (the wrong value is named beside each case).

Expected values are written out, or derived here step by step in numpy fp32 (one rounding per operation, as the
contract says); nothing is produced by calling the code under test. m = 0.1 unless said: inexact in fp32, so the
order of roundings shows.
"""
import numpy as np
import pytest
import torch

from oscqat.ops import reference as ref

F = np.float32
M, OM = F(0.1), F(1.0 - 0.1)          # om = fp32(1 - m) computed in double (here equal to fp32 1 - fp32 m)
N4, P4 = -8, 7


def _i8(v):
    return torch.tensor(v, dtype=torch.int8)


def _f(v):
    return torch.tensor(v, dtype=torch.float32)


def _track(w, s, prev, flags, freq, ema, f_th, m=0.1, n=N4, p=P4):
    st = (_i8(prev), _i8(flags), _f(freq), _f(ema))
    w_hat, d, counts = ref.weight_fwd_track(_f(w), _f(s), *st, _f(f_th), n, p, m, False, 1.0)
    return w_hat, counts, st


def _bwd(g, w, s, flags, ema, tracked, grad_scale=1.0, n=N4, p=P4, gd=0.0, damp=False, div=1.0):
    flags = None if flags is None else _i8(flags)
    ema = None if ema is None else _f(ema)
    return ref.weight_bwd(_f(g), _f(w), _f(s), flags, ema, _f(gd), n, p, grad_scale, damp, div, tracked)


# ---------------------------------------------------------------- quantizer
def test_multiply_by_the_reciprocal_never_divide():
    # s = 0.3: r = fp32(1/s) = 3.3333333. w = fp32(1.65): w * r = 5.5 exactly in fp32 -> 6 (half to even),
    # w / s = 5.4999995 -> 5 (wrong). Same mirrored at -1.65.
    w_hat, _ = ref.weight_fwd(_f([1.65, -1.65]), _f([0.3]), None, None, N4, P4, False, 1.0)
    assert w_hat.tolist() == [float(F(0.3) * F(6)), float(F(0.3) * F(-6))]


def test_round_half_to_even_then_clamp_and_range_on_the_rounded_value():
    # x = 2.5 -> 2 (floor(x + .5) -> 3, wrong), 3.5 -> 4, -2.5 -> -2 (trunc/away -> -3), 7.5 -> 8 clamped to 7
    # and out of range (x < p + 1 but R = 8 > p), -8.5 -> -8 in range (away from zero -> -9 out)
    w = [2.5, 3.5, -2.5, 7.5, -8.5, 0.4999999]
    w_hat, _ = ref.weight_fwd(_f(w), _f([1.0]), None, None, N4, P4, False, 1.0)
    assert w_hat.tolist() == [2.0, 4.0, -2.0, 7.0, -8.0, 0.0]
    gw, _ = _bwd([1.0] * 6, w, [1.0], None, None, False)
    assert gw.tolist() == [1, 1, 1, 0, 1, 1]


# ---------------------------------------------------------------- tracked forward: one step, every branch
def test_tracked_step_every_branch_by_hand():
    # s = 1, f_th = 0.2, m = 0.1. Columns: w (so w_int = w), prev_int, flags = last_dir + 4 fz, freq, ema.
    w = [2, 1, 2, 1, -3, 0, 3, -4, 1, 3, -2]
    prev = [2, 2, 2, 2, 5, 1, 2, -3, 0, 2, 5]
    flags = [0, 1, 1, 1, 5, 7, -1, 1, 0, 1, -128]
    freq = [0.15, 0.15, 0.21, 0.11111111, 0.9, 0.3, 0.2, 0.2, 0.0, 0.0, 0.9]
    ema = [2.0, 2.55, 2.0, 1.0, 5.0, 3.0, 2.5, -3.5, 0.0, 0.22, -7.0]
    w_hat, counts, (prev_t, flags_t, freq_t, ema_t) = _track(w, [1.0], prev, flags, freq, ema, 0.2)

    def fr(f, osc):                                  # om * freq, rounded, then + m, rounded
        return F(F(OM * F(f)) + (M if osc else F(0)))

    def em(e, k):                                    # two products, each rounded, then the sum, rounded
        return F(F(OM * F(e)) + F(M * F(k)))

    # 0: never moved, last_dir 0: sign(0) == -0, but no switch means no oscillation (counting it: freq 0.235
    #    > f_th, frozen). 1: reversal; freq 0.15 -> 0.235 crosses f_th only after the update -> frozen now, with
    #    frozen_int = round(EMA before) = round(2.55) = 3 (after the update: 2.395 -> 2). 2: freq 0.21 > f_th
    #    before, 0.189 after, no oscillation -> not frozen. 3: reversal to exactly f_th (0.2): strict '>' -> not
    #    frozen. 4: frozen (fz 1): w_eff = frozen_int 5 whatever w; stays fz 1 (not 2), EMA slot keeps 5, freq
    #    still decays. 5: fz 2 (frozen by the last tracked forward): uses frozen_int 3 now, a switch 1 -> 3 up
    #    against last_dir -1 is an oscillation; becomes fz 1. 6: reversal, freq 0.28 -> frozen, round(2.5) = 2
    #    (half to even; the updated EMA 2.55 -> 3). 7: same downwards: round(-3.5) = -4 (trunc -> -3). 8: first
    #    change from last_dir 0, not an oscillation. 9: continues up, not an oscillation. 10: uninitialised:
    #    initialise from w_eff, count nothing whatever prev_int/freq/ema held.
    assert w_hat.tolist() == [2, 1, 2, 1, 5, 3, 3, -4, 1, 3, -2]
    assert counts.dtype == torch.int32 and counts.tolist() == [7, 5]
    assert prev_t.tolist() == [2, 1, 2, 1, 5, 3, 3, -4, 1, 3, -2]
    exp_freq = [fr(0.15, 0), fr(0.15, 1), fr(0.21, 0), fr(0.11111111, 1), fr(0.9, 0), fr(0.3, 1), fr(0.2, 1),
                fr(0.2, 1), fr(0, 0), fr(0, 0), 0.0]
    assert freq_t.tolist() == [float(v) for v in exp_freq]
    assert exp_freq[1] > F(0.2) > exp_freq[2] and exp_freq[3] == F(0.2) and exp_freq[0] < F(0.2)
    # raw flags: last_dir + 4 * fz
    assert flags_t.tolist() == [0, -1 + 8, 1, -1, 1 + 4, 1 + 4, 1 + 8, -1 + 8, 1, 1, 0]
    exp_ema = [em(2.0, 2), 3.0, em(2.0, 2), em(1.0, 1), 5.0, 3.0, 2.0, -4.0, em(0.0, 1), em(0.22, 3), -2.0]
    assert ema_t.tolist() == [float(v) for v in exp_ema]
    assert exp_ema[9] == F(0.49800003) and float(exp_ema[9]) != 0.498   # fused or re-associated: 0.498


def test_freq_and_ema_round_each_operation():
    # freq 0.61 with an oscillation: fp32(fp32(0.9 * 0.61) + 0.1) = 0.64900005; a fused multiply-add or
    # freq + m * (1 - freq) gives 0.649. EMA 0.22 -> w_eff 3: 0.49800003; fused or ema + m * (w - ema): 0.498.
    # f_th = 0: freezing is off however high freq gets.
    _, counts, (_, flags, freq, ema) = _track([1.0, 3.0], [1.0], [2, 2], [1, 1], [0.61, 0.0], [1.0, 0.22], 0.0)
    assert counts.tolist() == [2, 1]
    assert freq.tolist() == [float(F(0.64900005)), 0.0]
    assert ema[1].item() == float(F(0.49800003))
    assert flags.tolist() == [-1, 1]


def test_one_minus_momentum_is_computed_in_double():
    # m = 0.058: fp32(1 - 0.058) = 0.942 (0.94199997...), but fp32(1 - fp32(0.058)) = 0.94200003. With freq 1
    # and no switch, freq becomes om * 1 = om; an EMA of 1 with w_eff 0 becomes om * 1 + m * 0 = om.
    om = F(1.0 - 0.058)
    assert om != F(F(1) - F(0.058))
    _, _, (_, _, freq, ema) = _track([0.0], [1.0], [0], [0], [1.0], [1.0], 0.0, m=0.058)
    assert freq.item() == float(om) and ema.item() == float(om)


def test_freezing_needs_a_positive_threshold():
    _, _, (_, flags, freq, _) = _track([1.0], [1.0], [2], [1], [0.99], [2.0], 0.0)
    assert flags.tolist() == [-1] and freq.item() == float(F(F(OM * F(0.99)) + M))


def test_first_tracked_forward_initialises_with_a_frozen_looking_ema():
    # flags -128 decodes to fz 0: w_eff is w_int, never the EMA slot, even with garbage there
    w_hat, counts, (prev, flags, freq, ema) = _track([1.4, -0.6], [1.0], [7, -7], [-128, -128], [0.5, 0.7],
                                                    [5.0, 6.0], 0.2)
    assert w_hat.tolist() == [1.0, -1.0] and counts.tolist() == [0, 0]
    assert prev.tolist() == [1, -1] and flags.tolist() == [0, 0] and freq.tolist() == [0, 0]
    assert ema.tolist() == [1.0, -1.0]


# ---------------------------------------------------------------- untracked forward
def test_untracked_forward_reads_fz_ge_1_and_writes_nothing():
    w_hat, _ = ref.weight_fwd(_f([0.3, 0.3, 0.3, 0.3]), _f([0.5]), _i8([0, 4, 9, -128]), _f([0, 3.0, -2.0, 5.0]),
                              N4, P4, False, 1.0)
    assert w_hat.tolist() == [0.5, 1.5, -1.0, 0.5]     # x = 0.6 -> 1; fz 1 and fz 2 take frozen_int


# ---------------------------------------------------------------- backward
def test_weight_backward_masks_frozen_weights_by_the_forward_kind():
    # per channel s = [0.5, 0.25], gs = 0.5 (an ignored gradient scale doubles dL/ds).
    # row 0: x = [0.6, 2.2, -1.6] -> [1, 2, -2]; fz = [2, 1, 0]; frozen_int = [3, -2, .]
    # row 1: x = [2.4, 10.4, -1.2] -> [2, 7 (out of range), -1]; fz = [0, 0, 1]; frozen_int [., ., 5]
    w = [[0.3, 1.1, -0.8], [0.6, 2.6, -0.3]]
    g = [[1.0, -2.0, 0.5], [1.5, 3.0, -1.0]]
    flags, ema = [[8, 4, 0], [0, 0, 4]], [[3.0, -2.0, 0.0], [0.0, 0.0, 5.0]]
    # tracked: fz 2 is not frozen for this backward (its forward quantized it as not frozen)
    gw, gs = _bwd(g, w, [0.5, 0.25], flags, ema, True, grad_scale=0.5)
    assert gw.tolist() == [[1.0, 0.0, 0.5], [1.5, 0.0, 0.0]]
    # row 0: 1 * (1 - 0.6) + -2 * (-2) + 0.5 * (-2 + 1.6) = 4.2; row 1: 1.5 * (2 - 2.4) + 3 * 7 + -1 * 5 = 15.4
    assert gs.tolist() == pytest.approx([0.5 * 4.2, 0.5 * 15.4], rel=1e-6)
    # untracked: fz >= 1 is frozen: weight (0, 0) takes frozen_int 3 and no gradient
    gw, gs = _bwd(g, w, [0.5, 0.25], flags, ema, False, grad_scale=0.5)
    assert gw.tolist() == [[0.0, 0.0, 0.5], [1.5, 0.0, 0.0]]
    assert gs.tolist() == pytest.approx([0.5 * 6.8, 0.5 * 15.4], rel=1e-6)


def test_dampening_term_and_gradient_by_hand():
    # 3 bits (n -4, p 3), s = 0.5: clip range [-2, 1.5]; div 3; gD 0.7 -> coef = fp32(2 * 0.7) / 3.
    # 0: w 0.2 -> 0. 1: w = s*p exactly, frozen_int 0 (inside is inclusive). 2: w = s*n exactly, frozen_int 1.
    # 3: w 1.6 above the range, frozen_int -1: outside, no dampening gradient although R = 3 is in range.
    # 4: w -2.3: R = -5 out of range, clamped, err 0. 5: w 0.9 -> 2, err 0.1.
    w = [0.2, 1.5, -2.0, 1.6, -2.3, 0.9]
    flags = [0, 4, 4, 4, 0, 0]
    ema = [0.0, 0.0, 1.0, -1.0, 0.0, 0.0]
    s_weff = [0.0, 0.0, 0.5, -0.5, -2.0, 1.0]          # s * w_eff, frozen ones from frozen_int
    clip = [0.2, 1.5, -2.0, 1.5, -2.0, 0.9]
    inside = [1, 1, 1, 0, 0, 1]
    mask = [1, 0, 0, 0, 0, 1]
    _, d = ref.weight_fwd(_f(w), _f([0.5]), _i8(flags), _f(ema), -4, 3, True, 3.0)
    # (0.2^2 + 1.5^2 + 2.5^2 + 2^2 + 0 + 0.1^2) / 3 = 12.55 / 3 (with 'sum' or ignoring frozen_int: other values)
    assert d.item() == pytest.approx(12.55 / 3, rel=1e-6)
    g = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    gw, gs = _bwd(g, w, [0.5], flags, ema, False, n=-4, p=3, gd=0.7, damp=True, div=3.0)
    coef = F(F(2) * F(0.7)) / F(3)
    exp = [F(F(F(gi) * F(mi)) + F(F(coef * F(F(c) - F(sw))) * F(ins)))
           for gi, mi, c, sw, ins in zip(g, mask, clip, s_weff, inside)]
    assert gw.tolist() == [float(v) for v in exp]
    assert exp[1] != 0 and exp[2] != 0 and exp[3] == 0
    _, gs0 = _bwd(g, w, [0.5], flags, ema, False, n=-4, p=3)
    assert gs.item() == gs0.item()                      # D's gradient goes to w only


# ---------------------------------------------------------------- activations
def test_activation_lsq_by_hand():
    # s 0.5, signed 4 bits, gs 0.25. xs = [0.6, -8.4, 7.48, 7.52, -0.5, 2.2] -> R = [1, -8, 7, 8, -0, 2];
    # 7.52 -> 8 is out of range (on the rounded value), -8.4 -> -8 is in.
    x = _f([[0.3, -4.2, 3.74], [3.76, -0.25, 1.1]])
    y = ref.act_fwd(x, _f([0.5]), None, N4, P4)
    assert y.tolist() == [[0.5, -4.0, 3.5], [3.5, 0.0, 1.0]]
    g = _f([[1.0, 2.0, -1.0], [0.5, 1.0, -2.0]])
    gx, gs, go = ref.act_bwd(g, x, _f([0.5]), None, N4, P4, 0.25)
    assert gx.tolist() == [[1.0, 2.0, -1.0], [0.0, 1.0, -2.0]]
    # 0.4 + 0.8 + 0.48 + 0.5 * 7 + 0.5 + 0.4 = 6.08
    assert gs.item() == pytest.approx(0.25 * 6.08, rel=1e-5) and go.item() == 0.0


def test_activation_lsq_plus_offset_by_hand():
    # o 0.3, s 0.5: xs = (x - o) * 2 = [-0.4, 8, -8.6, 2] -> R [-0, 8, -9, 2]: in range [1, 0, 0, 1]
    x = _f([0.1, 4.3, -4.0, 1.3])
    y = ref.act_fwd(x, _f([0.5]), _f([0.3]), N4, P4)
    assert y.tolist() == [float(F(F(q) * F(0.5)) + F(0.3)) for q in (0, 7, -8, 2)]
    g = _f([1.0, 2.0, -1.0, 0.5])
    gx, gs, go = ref.act_bwd(g, x, _f([0.5]), _f([0.3]), N4, P4, 0.25)
    assert gx.tolist() == [1.0, 0.0, -0.0, 0.5]
    assert go.item() == pytest.approx(0.25 * (2.0 - 1.0))    # g-weighted (a count gives 0.5), times gs
    assert gs.item() == pytest.approx(0.25 * (0.4 + 2 * 7 + 8 + 0.5 * 0), rel=1e-5)


# ---------------------------------------------------------------- half precision: fp32 inside, one final rounding
def test_bf16_weight_is_rounded_once_at_the_end():
    # s 0.3, w 0.828125 (bf16) -> x 2.76 -> 3; fp32(0.3 * 3) = 0.90000004 -> bf16 0.8984375.
    # Rounding s to bf16 first (0.30078125) gives 0.90234375.
    w_hat, _ = ref.weight_fwd(torch.tensor([0.828125], dtype=torch.bfloat16), _f([0.3]), None, None, N4, P4,
                              False, 1.0)
    assert w_hat.dtype == torch.bfloat16 and w_hat.tolist() == [0.8984375]
    # dL/dw = g + coef * (clip - s * w_eff) in fp32, then bf16: 1 + 0.0039089 -> 1.0078125. Rounding the
    # dampening term to bf16 first (0.00390625) gives the tie 1.00390625 -> 1.0.
    gw, _ = ref.weight_bwd(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([0.37109375], dtype=torch.bfloat16),
                           _f([0.25]), None, None, _f(0.01614), N4, P4, 1.0, True, 1.0, False)
    assert gw.dtype == torch.bfloat16 and gw.tolist() == [1.0078125]


@pytest.mark.parametrize("dtype, x, expected, wrong", [
    # s 0.3, o 0.11: x -0.5 -> q -2: fp32(-0.6) + 0.11 = -0.49 -> bf16 -0.490234375 (bf16(q s) + o: -0.4921875)
    (torch.bfloat16, -0.5, -0.490234375, -0.4921875),
    # x 2.2 (fp16 2.19921875) -> q 7: 2.1 + 0.11 -> fp16 2.2109375 (fp16(q s) + o: 2.208984375)
    (torch.float16, 2.2, 2.2109375, 2.208984375)])
def test_half_activation_is_rounded_once_at_the_end(dtype, x, expected, wrong):
    y = ref.act_fwd(torch.tensor([x], dtype=dtype), _f([0.3]), _f([0.11]), N4, P4)
    assert y.dtype == dtype and y.tolist() == [expected] != [wrong]
