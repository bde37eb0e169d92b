"""A normal loop on a normal model never crashes; bad input fails loudly, naming the layer (issue 9)."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oscqat
from oscqat.ops import reference as ref
from oscqat.nn.quantizers import SCALE_MIN


def cnn(classes=10):
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))


def data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 12, 12, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def readme_loop(model, opt, batches, steps):
    """README's training-loop snippet, as written."""
    sched = oscqat.QATSchedule(model, steps)
    losses = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        loss = F.cross_entropy(model(x), y) + sched.lam * oscqat.dampening_loss(model)
        loss.backward(); opt.step(); opt.zero_grad(); sched.step()
        losses.append(loss.item())
    return losses, sched


# ------------------------------------------------------------------ scale floor
@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
                                      lambda p: torch.optim.Adam(p, lr=1e-3),
                                      lambda p: torch.optim.SGD(p, lr=1.0)], ids=["sgd", "adam", "sgd-lr1"])
def test_readme_loop_on_a_fresh_model_never_crashes(make_opt):
    torch.manual_seed(0)
    batches = data()
    model = oscqat.prepare(cnn(), oscqat.QATConfig(4, 4, "dampen+freeze"), calib_data=[x for x, _ in batches],
                           verbose=False)
    opt = make_opt(model.parameters())
    losses, sched = readme_loop(model, opt, batches, 30)
    assert all(math.isfinite(v) for v in losses)
    for q in oscqat.quantizers(model):
        assert bool((q.scale >= q.scale_min).all()), q.layer_name   # projected after every step
    assert sched.scales_at_floor.dtype == torch.int64


def test_a_scale_below_the_floor_quantizes_as_the_floor_and_gets_its_gradient():
    w = torch.randn(6, 4) * 0.1
    lin = oscqat.QuantLinear(4, 6, name="fc", config=oscqat.QATConfig(quantize_activations=False))
    lin.weight.data.copy_(w)
    x = torch.randn(3, 4)
    outs, grads = [], []
    for s in (-0.25, 0.0, SCALE_MIN):
        lin.weight_quant.scale.data.fill_(s)
        lin.weight_quant.scale.grad = None
        lin.eval()
        out = lin(x)
        out.sum().backward()
        outs.append(out.detach())
        grads.append(lin.weight_quant.scale.grad.clone())
    for o, g in zip(outs[:2], grads[:2]):
        assert torch.equal(o, outs[2]) and torch.equal(g, grads[2])
    # the gradient at the floor is the LSQ gradient there (straight through the floor), not zero
    assert grads[2].abs().item() > 0
    lin.weight_quant.scale.data.fill_(-1.0)
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)
    lin.train()
    lin(x).sum().backward()
    opt.step()
    assert lin.weight_quant.scale.item() == torch.tensor(SCALE_MIN).item()   # projected by the step hook (fp32)
    assert int(oscqat.scales_at_floor(lin)) == 1
    report = oscqat.oscillation_report(lin)
    assert report["total"]["scales_at_floor"] == 1 and report["scales_at_floor"][0]["quantizer"] == "fc.weight"
    assert "scales at their floor: 1" in oscqat.format_report(report)


def test_an_optimizer_step_at_most_halves_a_scale():
    """A step larger than the scale (a fresh EfficientNet-B0's depthwise scale 0.0044 got dL/ds = 1.6 at SGD lr
    1e-2) would otherwise land on the floor, saturate every weight and overflow the gradients a step later."""
    from oscqat.nn.step_hook import SCALE_KEEP
    lin = oscqat.QuantLinear(4, 6, name="fc", config=oscqat.QATConfig(quantize_activations=False))
    lin.weight_quant.scale.data.fill_(0.004)
    scale = lin.weight_quant.scale
    cases = [(1.6, 0.004 * SCALE_KEEP),          # would go to -0.012: held at half
             (0.1, 0.004 - 1e-2 * 0.1),           # shrinks by a quarter: the optimizer's own step
             (-0.5, 0.004 + 1e-2 * 0.5)]          # grows: untouched
    opt = torch.optim.SGD([{"params": [lin.weight]}, {"params": [scale]}], lr=1e-2)
    for grad, want in cases:
        scale.data.fill_(0.004)
        scale.grad = torch.full_like(scale, grad)
        opt.step()
        assert scale.item() == pytest.approx(want, rel=1e-6), grad
    assert int(oscqat.scales_at_floor(lin)) == 0


def test_the_model_input_quantizer_keeps_its_range_unless_asked():
    """QATConfig.learn_input_scale=False (the default): the input layer's input quantizer keeps its calibrated
    range, so the first convolution computes no input gradient (on resnet18 on CPU: 55 of a 430 ms step); every
    other scale learns. With True it learns too. The range is a fixed parameter (requires_grad False), which DDP and
    the optimizers accept, not an unused one."""
    batches = data(2)
    for learn in (False, True):
        torch.manual_seed(0)
        model = oscqat.prepare(cnn(), oscqat.QATConfig(learn_input_scale=learn), calib_data=[batches[0][0]],
                               verbose=False)
        first, second = model[0].input_quant, model[3].input_quant
        assert first.scale.requires_grad == learn and second.scale.requires_grad
        seen = []
        model[0].register_forward_pre_hook(lambda m, args: seen.append(m.input_quant(args[0]).requires_grad))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        before = first.scale.detach().clone()
        x, y = batches[1]
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
        opt.step()
        assert seen == [learn]                       # what the first convolution gets: no gradient to compute
        assert (first.scale.grad is not None) == learn and second.scale.grad is not None
        assert torch.equal(first.scale.detach(), before) != learn
        assert ("model input quantizers with a fixed range" in model.oscqat_summary.short()) != learn


def test_calibration_uses_batch_statistics_and_leaves_bn_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Linear(10, 4))
    bn = model[1]
    bn.running_var.fill_(1e6)          # stale statistics: the eval-mode forward would shrink activations 1000x
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    xs = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    oscqat.prepare(model, oscqat.QATConfig(first_last_bits=None), calib_data=xs, verbose=False)
    s = model[3].input_quant.scale.item()
    assert 0.05 < s < 1.0, s                 # normalised activations after ReLU, 4 bits unsigned
    assert not model[3].input_quant.signed
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_degenerate_ranges_get_a_usable_scale_not_a_tiny_one():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 2))
    nn.init.zeros_(model[2].weight)
    with torch.no_grad():
        model[0].weight.fill_(-1.0)
        model[0].bias.fill_(-1.0)             # ReLU output all zero for positive inputs
    xs = [torch.rand(4, 16) for _ in range(2)]
    model = oscqat.prepare(model, oscqat.QATConfig(first_last_bits=None), calib_data=xs, verbose=False)
    wq, aq = model[2].weight_quant, model[2].input_quant
    assert wq.scale.item() == pytest.approx(1 / math.sqrt(8) / wq.qmax)
    assert aq.scale.item() == pytest.approx(1 / aq.qmax)
    notes = dict(model.oscqat_summary.fallbacks)
    assert "all-zero" in notes["2.weight"] and "were 0" in notes["2.input"]


# ------------------------------------------------------------------ prepare: subclasses, summary
class PlainSub(nn.Linear):
    pass


class OwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


def test_subclasses_are_swapped_unless_they_change_forward(capsys):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), OwnForward(4, 4, 3), nn.Flatten(), PlainSub(4 * 10 * 10, 8),
                          nn.Linear(8, 2))
    x = torch.randn(2, 3, 12, 12)
    with pytest.warns(UserWarning, match=r"1 \(OwnForward\) stays in float: OwnForward overrides Conv2d.forward"):
        oscqat.prepare(model, calib_data=[x])
    assert isinstance(model[3], oscqat.QuantLinear) and isinstance(model[1], OwnForward)
    summary = model.oscqat_summary
    assert [r["layer"] for r in summary.rows()] == ["0", "3", "4"]
    assert [r["bits"] for r in summary.rows()] == ["W8A8", "W4A4", "W8A8"]
    assert summary.skipped == [("1", "OwnForward", "OwnForward overrides Conv2d.forward, which oscqat cannot "
                                                   "reproduce")]
    out = capsys.readouterr().out
    assert "3 layers quantized (W4A4: 1, W8A8: 2), 1 left in float" in out and "first/last): 0, 4" in out
    assert "PlainSub" in str(summary)
    with pytest.raises(ValueError, match=r"already prepared \(3 quantized layers, e.g. '0'\)"):
        oscqat.prepare(model)


def test_timm_linear_is_quantized():
    timm = pytest.importorskip("timm")   # in the test extra; skipped only outside the project's environment
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), timm.layers.Linear(8, 3))
    oscqat.prepare(model, verbose=False)
    assert isinstance(model[2], oscqat.QuantLinear) and model[2].weight_quant.bits == 8


def test_forward_hooks_survive_the_swap():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    oscqat.prepare(model, verbose=False)
    model.eval()
    model(torch.randn(3, 4)) if model[0].input_quant.initialized else None
    model.train()
    model(torch.randn(3, 4))
    assert seen == [torch.Size([3, 2])]


def test_config_positional_order_and_type_checks():
    c = oscqat.QATConfig(3, 4, "freeze")
    assert (c.weight_bits, c.act_bits, c.method, c.per_channel) == (3, 4, "freeze", False)
    with pytest.raises(ValueError, match="per_channel must be True or False, got 'yes'"):
        oscqat.QATConfig(per_channel="yes")


# ------------------------------------------------------------------ copies
def test_deepcopy_ema_and_averaged_model_after_a_dampening_step():
    torch.manual_seed(0)
    batches = data(2)
    model = oscqat.prepare(cnn(), oscqat.QATConfig(4, 4, "dampen+freeze", warmup=0.0),
                           calib_data=[x for x, _ in batches], verbose=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    readme_loop(model, opt, batches, 3)
    assert any(q.last_damp is not None for q in oscqat.weight_quantizers(model))
    twin = copy.deepcopy(model)
    assert all(q.last_damp is None for q in oscqat.weight_quantizers(twin))
    ema = oscqat.QATModelEMA(model)
    ema.update(model)
    avg = torch.optim.swa_utils.AveragedModel(model)
    avg.update_parameters(model)
    model.eval(), twin.eval()
    x = batches[0][0]
    assert torch.equal(model(x), twin(x))
    assert torch.isfinite(ema.model(x)).all() and torch.isfinite(avg(x)).all()


# ------------------------------------------------------------------ non-finite values
def test_nan_input_or_weight_names_the_layer_where_it_entered():
    torch.manual_seed(0)
    batches = data(1)
    model = oscqat.prepare(cnn(), calib_data=[batches[0][0]], verbose=False)
    model.train()
    x = batches[0][0].clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(oscqat.NonFiniteError, match=r"^0.input: input has 1 NaN value\(s\) of 6912"):
        model(x)
    oscqat.arm_tracking(model)
    model[3].weight.data[0, 0, 0, 0] = float("inf")
    with pytest.raises(oscqat.NonFiniteError, match=r"^3.weight: weight has 1 Inf value\(s\) of 144"):
        model(batches[0][0])


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_scale_names_the_layer(bad):
    lin = oscqat.QuantLinear(4, 3, name="head")
    lin.weight_quant.scale.data.fill_(bad)
    with pytest.raises(oscqat.NonFiniteError, match=r"head.weight: scale has 1 (NaN|Inf) value\(s\) of 1 \(a "
                                                    r"non-finite gradient reached it"):
        lin(torch.randn(2, 4))


def test_nan_in_calibration_data_is_an_error_at_prepare():
    x = torch.randn(4, 3, 8, 8)
    x[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"calibration batch 1 holds 1 NaN/Inf"):
        oscqat.prepare(cnn(), calib_data=[torch.randn(4, 3, 8, 8), x], verbose=False)


def test_compiled_forward_flags_non_finite_and_the_step_hook_raises():
    """Where the forward cannot raise (torch.compile here; accelerators, where raising would sync), the flag
    of the step's first forward is read after optimizer.step(), naming the first flagged layer."""
    torch.manual_seed(0)
    batches = data(1)
    model = oscqat.prepare(cnn(), calib_data=[batches[0][0]], verbose=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = batches[0][0].clone()
    compiled(x).sum().backward()
    opt.step()                                     # clean step: nothing raised
    x[:, :, 2, 2] = float("nan")
    compiled(x).sum().backward()
    with pytest.raises(oscqat.NonFiniteError, match=r"^0.input: a NaN or infinite value entered"):
        opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_inductor_step_checks_activations_in_the_backward(bad):
    """Compiled with inductor on CPU, an activation quantizer's input is checked by its fused backward (no pass
    of its own over every activation): nothing is flagged after the forward, the quantizer whose input held the
    NaN/Inf is after the backward (an Inf is one the quantizer would have clipped to its range), one before it is
    not, and the optimizer step names it."""
    torch.manual_seed(0)
    x, y = data(1)[0]
    model = oscqat.prepare(cnn(), calib_data=[x], verbose=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    compiled = torch.compile(model)
    F.cross_entropy(compiled(x), y).backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        model[4].bias[3] = bad          # BatchNorm -> ReLU -> the next conv's input quantizer, "6.input"
    acts = {q.layer_name: q for q in oscqat.quantizers(model) if isinstance(q, oscqat.QuantAct)}
    loss = F.cross_entropy(compiled(x), y)
    assert all(int(q.fault) == 0 for q in acts.values())
    loss.backward()
    assert int(acts["6.input"].fault) == 1 and int(acts["3.input"].fault) == 0
    with pytest.raises(oscqat.NonFiniteError, match=r"^6.input: a NaN or infinite value entered"):
        opt.step()


def test_weight_checksum_does_not_depend_on_summation_order():
    """The weight-change check compares an eager checksum (after the step) with one the next forward computes,
    which under torch.compile is a generated reduction: an fp32 sum differed there in its last bits. The sum
    wraps (bit patterns of unit-scale floats are ~1e9, so 1728 of them overflow 32 bits many times)."""
    from oscqat.nn.weight_check import checksum
    compiled = torch.compile(checksum)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(64, 3, 3, 3).to(dtype)
        assert torch.equal(checksum(w), checksum(w.flatten().flip(0)))
        assert torch.equal(compiled(w), checksum(w)), dtype
        w2 = w.clone()
        w2.view(torch.int32 if dtype == torch.float32 else torch.int16).view(-1)[7] += 1    # one ulp
        assert not torch.equal(checksum(w), checksum(w2)), dtype


def test_inductor_training_steps_do_not_raise_weight_changed():
    torch.manual_seed(0)
    batches = data(2)
    model = oscqat.prepare(cnn(), calib_data=[batches[0][0]], verbose=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    compiled = torch.compile(model)
    for i in range(3):
        x, y = batches[i % 2]
        F.cross_entropy(compiled(x), y).backward()
        opt.step()
        opt.zero_grad()
    for q in oscqat.weight_quantizers(model):
        assert int(q.fault) == 0, q.layer_name


def test_a_layer_built_by_hand_compiles_with_the_weight_check():
    """A layer built by hand (no prepare, never moved with .to()) compiles and trains: the checksum tensors its
    compiled forward reads exist from construction on; a change behind the optimizer's back is flagged by that
    forward and raised by the next step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(oscqat.QuantLinear(4, 3, weight_bits=4, act_bits=8, name="fc"))
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        compiled(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    compiled(torch.randn(2, 4)).sum().backward()
    with pytest.raises(oscqat.WeightChangedError, match=r"^fc\.weight: the weight changed"):
        opt.step()


# ------------------------------------------------------------------ API traps
def test_use_backend_works_as_a_call_and_as_a_context_manager():
    try:
        oscqat.use_backend("torch")
        assert oscqat.get_backend() == "torch"
        with oscqat.use_backend("auto"):
            assert oscqat.get_backend() == "auto"
        assert oscqat.get_backend() == "torch"
    finally:
        oscqat.set_backend("auto")


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("prev_int", "flags", "freq"))}


def test_tracking_goes_on_without_a_schedule_and_no_grad_forwards_do_not_take_it():
    torch.manual_seed(0)
    batches = data(2)
    model = oscqat.prepare(cnn(), calib_data=[x for x, _ in batches], verbose=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracked = []
    for i in range(4):
        x, y = batches[i % 2]
        with torch.no_grad():
            model(x)                                  # a logging forward in train mode
        before = state_of(model)
        F.cross_entropy(model(x), y).backward()
        opt.step(); opt.zero_grad()
        tracked.append(any(not torch.equal(before[k], v) for k, v in state_of(model).items()))
    assert all(tracked), tracked


def test_an_optimizer_built_before_prepare_is_reported():
    torch.manual_seed(0)
    batches = data(1)
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    oscqat.prepare(model, calib_data=[batches[0][0]], verbose=False)
    with pytest.warns(UserWarning, match=r"no optimizer updates 7 of their scales \(0.weight, 3.weight, 3.input"):
        for _ in range(2):
            F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
            opt.step()
    # two optimizers, one for weights and one for scales, is a normal setup: no warning
    model = oscqat.prepare(cnn(), calib_data=[batches[0][0]], verbose=False)
    scales = [q.scale for q in oscqat.quantizers(model)]
    others = [p for p in model.parameters() if all(p is not s for s in scales)]
    opts = [torch.optim.SGD(others, lr=1e-2), torch.optim.Adam(scales, lr=1e-3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
            for o in opts:
                o.step()
                o.zero_grad()


def test_every_backend_sees_the_same_floored_scale():
    """The floor is applied before the op, so backends cannot disagree on it."""
    w = torch.randn(8, 3, 3, 3) * 0.1
    state = [torch.zeros(w.shape, dtype=torch.int8), torch.full(w.shape, -128, dtype=torch.int8),
             torch.zeros(w.shape), torch.zeros(w.shape)]
    s = torch.tensor([-0.3]).clamp_min(SCALE_MIN)
    out = ref.weight_fwd_track(w, s, *[t.clone() for t in state], torch.tensor(0.0), -8, 7, 0.01, False, 27.0)
    q = oscqat.WeightQuantizer(w.shape, 4, name="w")
    q.scale.data.fill_(-0.3)
    q.train()
    with oscqat.use_backend("torch"):
        assert torch.equal(q(w), out[0])
