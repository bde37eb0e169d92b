"""Layers, prepare, schedules, state handling and error messages (reference backend, CPU)."""
import copy
import math

import pytest
import torch
from torch import nn

import oscqat
from oscqat.app.models import mobilenet_v2
from oscqat.training.schedule import cosine_ramp
from helpers.training import STATE, assert_same, make_opt, qat_model, snapshot, train_steps

def test_prepare_swaps_every_layer_with_first_and_last_at_8_bits():
    model = mobilenet_v2()
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    n_lin = sum(isinstance(m, nn.Linear) for m in model.modules())
    oscqat.prepare(model, oscqat.QATConfig(weight_bits=4, act_bits=4))
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == n_conv + n_lin == 53
    assert all(isinstance(m, (oscqat.QuantConv2d, oscqat.QuantLinear)) for _, m in layers)
    bits = {n: m.weight_quant.bits for n, m in layers}
    assert bits["features.0.0"] == 8 and bits["classifier.1"] == 8
    assert {b for n, b in bits.items() if n not in ("features.0.0", "classifier.1")} == {4}
    first = model.features[0][0]
    assert first.input_quant.bits == 8 and not first.weight_quant.tracking
    dw = model.features[2].conv[1][0]
    assert dw.groups == dw.in_channels == 96 and dw.weight_quant.tracking and dw.weight_quant.freeze
    assert dw.weight_quant.prev_int.dtype == torch.int8 and dw.weight_quant.flags.dtype == torch.int8


def test_state_is_10_bytes_per_weight():
    q = oscqat.WeightQuantizer((64, 1, 3, 3), 4)
    state_bytes = sum(getattr(q, k).numel() * getattr(q, k).element_size() for k in STATE)
    assert state_bytes == 10 * 64 * 9


def test_prepare_skip_and_quantized_forward_is_close_at_8_bits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 5), nn.Linear(5, 5))
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 8)
    oscqat.prepare(model, oscqat.QATConfig(weight_bits=8, act_bits=8, skip=("4",)), calib_data=[x])
    assert isinstance(model[0], oscqat.QuantConv1d) and type(model[4]) is nn.Linear
    assert model[3].input_quant.signed is False                # after ReLU: unsigned
    model.eval()
    assert torch.allclose(model(x), ref(x), atol=0.05)


def test_schedule_warmup_and_cosine():
    assert cosine_ramp(10, 100, 0.25) == 0.0
    assert cosine_ramp(25, 100, 0.25) == 0.0
    assert cosine_ramp(100, 100, 0.25) == pytest.approx(1.0)
    assert cosine_ramp(int(25 + 75 / 2), 100, 0.25) == pytest.approx(0.5 * (1 - math.cos(math.pi * 37 / 75)))
    model, _ = qat_model(freeze_start=0.04, freeze_end=0.01, damp_lambda=0.5, warmup=0.25)
    sched = oscqat.QATSchedule(model, 100)
    assert sched.freeze_threshold == 0.0 and sched.lam == 0.0
    sched.step_count = 25
    assert sched.freeze_threshold == pytest.approx(0.04) and sched.lam == pytest.approx(0.0)
    sched.step_count = 100
    assert sched.freeze_threshold == pytest.approx(0.01) and sched.lam == pytest.approx(0.5)
    sched.step()
    q = model.features[1].conv[0][0].weight_quant
    assert q.freeze_threshold.item() == pytest.approx(0.01) and q.armed


def test_eval_forwards_and_accumulation_leave_the_state_alone():
    model, x = qat_model()
    opts = make_opt(model)
    sched = oscqat.QATSchedule(model, 50)
    train_steps(model, opts, sched, x, 3)
    before = snapshot(model)
    model.eval()
    model(x)
    assert_same(before, snapshot(model))
    # gradient accumulation: only the first forward after an optimizer step is tracked
    model.train()
    model(x).sum().backward()
    after_first = {k: v.clone() for k, v in snapshot(model).items() if k.endswith(STATE)}
    changed = [k for k in after_first if not torch.equal(after_first[k], before[k])]
    assert changed, "the first training forward after a step must track"
    model(x).sum().backward()
    model(x[:4]).sum().backward()
    for k, v in after_first.items():
        assert torch.equal(snapshot(model)[k], v), k


def test_reestimate_bn_changes_only_bn_statistics_and_restores_modes():
    model, x = qat_model()
    train_steps(model, make_opt(model), oscqat.QATSchedule(model, 50), x, 2)
    model.train()
    model.features[1].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    before = snapshot(model)
    used = oscqat.reestimate_bn(model, [x, x * 0.5], num_batches=50)
    assert used == 2
    after = snapshot(model)
    bn_stat = ("running_mean", "running_var", "num_batches_tracked")
    assert_same({k: v for k, v in before.items() if not k.endswith(bn_stat)},
                {k: v for k, v in after.items() if not k.endswith(bn_stat)})
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("running_mean"))
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_save_load_continue_is_identical_to_not_stopping(tmp_path):
    model, x = qat_model()
    opts = make_opt(model)
    sched = oscqat.QATSchedule(model, 40)
    train_steps(model, opts, sched, x, 6)
    torch.save({"model": model.state_dict(), "opts": [o.state_dict() for o in opts],
                "sched": sched.state_dict()}, tmp_path / "ckpt.pt")
    train_steps(model, opts, sched, x, 6)
    straight = snapshot(model)
    assert sum(int(q.frozen().sum()) for q in oscqat.weight_quantizers(model)) > 0, "test needs frozen weights"

    resumed, _ = qat_model(seed=123)
    opts2 = make_opt(resumed)
    sched2 = oscqat.QATSchedule(resumed, 40)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    for o, s in zip(opts2, ckpt["opts"]):
        o.load_state_dict(s)
    sched2.load_state_dict(ckpt["sched"])
    train_steps(resumed, opts2, sched2, x, 6)
    assert_same(straight, snapshot(resumed))


def test_dampening_loss_is_autograd_connected_and_scaled_by_lambda():
    model, x = qat_model(method="dampen")
    model.train()
    model(x)
    d = oscqat.dampening_loss(model)
    assert d.requires_grad and d.item() > 0
    w = model.features[1].conv[0][0].weight
    (g1,) = torch.autograd.grad(d, w, retain_graph=True)
    (g3,) = torch.autograd.grad(3.0 * d, w)
    assert torch.allclose(g3, 3 * g1) and g1.abs().sum() > 0


def test_oscillation_report_counts_frozen_and_oscillating():
    model, x = qat_model()
    q = model.features[1].conv[0][0].weight_quant
    model.train()
    model(x)
    q.freq.view(-1)[:10] = 0.01
    q.flags.view(-1)[:4] = 4                      # frozen (last_dir 0): oscillating, but no longer moving
    rep = oscqat.oscillation_report(model)
    row = next(r for r in rep["layers"] if r["layer"] == "features.1.conv.0.0")
    assert row["osc_pct"] == pytest.approx(100 * 10 / q.freq.numel()) and row["depthwise"]
    assert row["osc_unfrozen_pct"] == pytest.approx(100 * 6 / q.freq.numel())
    assert row["frozen_pct"] == pytest.approx(100 * 4 / q.freq.numel())
    assert rep["total"]["osc_pct"] == pytest.approx(100 * 10 / rep["total"]["numel"])
    assert "TOTAL" in oscqat.format_report(rep)


def test_compiled_model_has_no_graph_break_and_matches_eager():
    model, x = qat_model(method="dampen+freeze")
    twin = copy.deepcopy(model)
    for m in (model, twin):
        m.train()
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    out_e = model(x)
    out_c = compiled(x)
    assert torch.equal(out_e, out_c)
    (out_e.sum() + oscqat.dampening_loss(model)).backward()
    (out_c.sum() + oscqat.dampening_loss(twin)).backward()
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert (a.grad is None) == (b.grad is None) == (not a.requires_grad), n
        if a.requires_grad:
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), n
    assert_same(snapshot(model), snapshot(twin))


def test_inductor_fuses_activation_quantization_bit_for_bit():
    """Under torch.compile on CPU the activation quantizers are aten ops that inductor fuses with their
    neighbours, forward and backward (no act kernel runs); the training forward must still equal eager bit for
    bit, LSQ+ offsets too, and the gradients eager's within the summation-order tolerance.
    Gradients are compared in eval mode: through training-mode BatchNorm the true gradients are differences of
    nearly equal terms (a BN's input gradient has zero mean per channel), where any change of summation order
    gives percent-level relative differences, with the act kernels too."""
    from torch.profiler import profile
    model, x = qat_model(method="dampen+freeze")
    acts = [a for a in oscqat.quantizers(model) if isinstance(a, oscqat.QuantAct)]
    for a in acts[::2]:     # LSQ+ offsets on every other one, away from zero so that q * s + o is a real add
        a.offset = nn.Parameter(-0.37 * a.scale.detach().clone())
    twin = copy.deepcopy(model)
    r = torch.randn(x.shape[0], 10, generator=torch.Generator().manual_seed(3))
    with oscqat.use_backend("cpp"):
        compiled = torch.compile(twin)
        assert torch.equal(model(x), compiled(x))
        state = [{k: v for k, v in snapshot(m).items() if k.rsplit(".", 1)[-1] in STATE} for m in (model, twin)]
        assert_same(*state)
        twin.load_state_dict(model.state_dict())    # BN running statistics: inductor's batch mean differs in ulps
        model.eval(), twin.eval()
        out_e, out_c = model(x), compiled(x)
        assert torch.equal(out_e, out_c)
        (out_e * r).sum().backward()
        (out_c * r).sum().backward()
        for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
            # a scale's LSQ gradient is a sum of terms of both signs (the rounding errors): another order moves
            # it by more, relative to the result, than a weight's
            rtol = 2e-3 if n.endswith(("scale", "offset")) else 1e-4
            assert (a.grad is None) == (b.grad is None) == (not a.requires_grad), n
            if a.requires_grad:
                assert torch.allclose(a.grad, b.grad, rtol=rtol, atol=1e-6 * float(a.grad.abs().max())), n
        twin.train()
        with profile() as prof:
            compiled(x).sum().backward()
    ran = {e.key for e in prof.key_averages()}
    assert {"oscqat_C::weight_fwd", "oscqat_C::weight_bwd"} <= ran, sorted(k for k in ran if "oscqat" in k)
    assert not {"oscqat_C::act_fwd", "oscqat_C::act_bwd"} & ran


def test_cpp_wrapper_compiled_step_matches_eager():
    """inductor's C++ wrapper (`options={"cpp_wrapper": True}`, what docs/performance.md recommends on CPU: the compiled
    graphs' Python wrapper was the largest QAT-specific cost of a compiled step) calls the C++ ops from generated
    C++: the tracked forward must still update the oscillation state in place and give eager's outputs, and two
    steps must leave the same integers and states. A small conv / depthwise / linear net keeps the wrapper's
    compile short."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(4, 1, 12, 12)
    cfg = oscqat.QATConfig(4, 4, "dampen+freeze", first_last_bits=4, freeze_start=0.002, freeze_end=0.001,
                           momentum=0.05, warmup=0.0)
    model = oscqat.prepare(net, cfg, calib_data=[x], verbose=False).train()
    twin = copy.deepcopy(model)
    r = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    with oscqat.use_backend("cpp"):
        compiled = torch.compile(twin, options={"cpp_wrapper": True})
        opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, twin)]
        before = {k: v for k, v in snapshot(twin).items() if k.rsplit(".", 1)[-1] in STATE}
        for _ in range(2):
            outs = []
            for m, f, opt in zip((model, twin), (model, compiled), opts):
                out = f(x)
                ((out * r).sum() + 0.1 * oscqat.dampening_loss(m)).backward()
                outs.append(out)
                opt.step()
                opt.zero_grad()
            assert torch.equal(*outs)
            state = [{k: v for k, v in snapshot(m).items() if k.rsplit(".", 1)[-1] in STATE} for m in (model, twin)]
            assert_same(*state)
            assert any(not torch.equal(v, before[k]) for k, v in state[1].items())     # the compiled step tracked
            twin.load_state_dict(model.state_dict())    # BN statistics and weights: summation order differs in ulps


# ------------------------------------------------------------------ bad input
def test_bits_outside_range_are_rejected_with_the_layer_name():
    with pytest.raises(ValueError, match=r"QATConfig.weight_bits.*9"):
        oscqat.QATConfig(weight_bits=9)
    with pytest.raises(ValueError, match=r"conv7.*bits.*1"):
        oscqat.WeightQuantizer((4, 4), bits=1, name="conv7")
    with pytest.raises(ValueError, match="method"):
        oscqat.QATConfig(method="sgd")


def test_non_float_and_empty_weights_are_rejected():
    q = oscqat.WeightQuantizer((2, 3), 4, name="fc1.weight")
    with pytest.raises(TypeError, match=r"fc1.weight.*floating-point.*torch.int64"):
        q(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"fc1.weight.*shape"):
        q(torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"empty.*\(0, 3\)"):
        oscqat.WeightQuantizer((0, 3), 4, name="fc0")
    a = oscqat.QuantAct(4, name="act3")
    with pytest.raises(ValueError, match=r"act3.*empty"):
        a.train()(torch.ones(0, 4))


def test_mismatched_state_on_load_is_rejected():
    a = oscqat.QuantConv2d(4, 4, 3, groups=4, name="dw")
    b = oscqat.QuantConv2d(4, 8, 3, name="dw")
    with pytest.raises(ValueError, match=r"dw.weight: state 'prev_int'.*\(8, 4, 3, 3\).*\(4, 1, 3, 3\)"):
        a.load_state_dict(b.state_dict())
    sd = a.state_dict()
    sd["weight_quant.flags"] = sd["weight_quant.flags"].float()
    with pytest.raises(ValueError, match=r"flags.*torch.float32.*torch.int8"):
        a.load_state_dict(sd)


def test_backend_selection_errors_are_clear():
    with pytest.raises(ValueError, match="unknown oscqat backend 'nope'"):
        oscqat.set_backend("nope")
    with oscqat.use_backend("torch"):
        assert oscqat.get_backend() == "torch"
    assert oscqat.get_backend() == "auto"
    if not torch.cuda.is_available():
        with pytest.raises(oscqat.BackendUnavailable, match="cuda"):
            oscqat.set_backend("cuda")
        assert oscqat.get_backend() == "auto"
