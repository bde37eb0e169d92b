"""Detection models and Hardswish/SiLU classifiers (issue 14): input/output layers from the data flow, fixed layers
left alone, asymmetric activation grids, calibration on batch statistics, oscqat.fold_bn, and the error for a
weight changed behind the quantizer's back. A tiny YOLO-style detector runs in seconds; torchvision's models
(randomly initialised, nothing downloaded) carry the `models` marker."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone

import oscqat

QUANT = (oscqat.QuantConv2d, oscqat.QuantLinear)
# fold_bn: each folded layer's output equals the unfolded layer + BatchNorm on the same input up to fp32 rounding
# (this tolerance, of the largest |output|), with identical integers. End to end the models agree until an
# activation quantizer's input sits within that rounding of a rounding edge, where it becomes one step; after
# that a 4-bit network can amplify it (EfficientNet-B0 at 32x32: 1 of 36864 activations of one layer, then one
# sample's logits by 0.32).
FOLD_TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyDetector(nn.Module):
    """Two scales, a box head (4 x REG distribution bins) and a class head per scale, and a fixed conv registered
    last that decodes the box distributions into offsets (weights 0..REG-1, requires_grad=False), used in eval
    only, as in YOLOv8's DFL."""
    REG, CLASSES = 4, 3

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.box = nn.ModuleList([nn.Conv2d(c, 4 * self.REG, 1) for c in (8, 16)])
        self.cls = nn.ModuleList([nn.Conv2d(c, self.CLASSES, 1) for c in (8, 16)])
        self.dfl = nn.Conv2d(self.REG, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.copy_(torch.arange(self.REG, dtype=torch.float32).view(1, self.REG, 1, 1))

    def forward(self, x):
        f1 = self.stem(x)
        feats = [f1, self.stage(f1)]
        raw = [torch.cat([b(f), c(f)], 1).flatten(2) for f, b, c in zip(feats, self.box, self.cls)]
        raw = torch.cat(raw, 2)                                        # (N, 4*REG + CLASSES, anchors)
        if self.training:
            return raw
        n, _, a = raw.shape
        dist = raw[:, :4 * self.REG].view(n, 4, self.REG, a).transpose(2, 1).softmax(1)
        return torch.cat([self.dfl(dist).view(n, 4, a), raw[:, 4 * self.REG:].sigmoid()], 1)

    @staticmethod
    def loss(raw, target):
        return F.mse_loss(raw, target)


def _tiny(config=None, seed=0, **prepare_kw):
    torch.manual_seed(seed)
    model = TinyDetector()
    xs = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    oscqat.prepare(model, config or oscqat.QATConfig(4, 4), calib_data=xs, verbose=False, **prepare_kw)
    return model, xs


def _train(model, xs, steps=10, target=None, lr=1e-2):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = oscqat.QATSchedule(model, steps)
    for step in range(steps):
        out = model(xs[step % len(xs)])
        loss = TinyDetector.loss(out, torch.zeros_like(out) if target is None else target) \
            + sched.lam * oscqat.dampening_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return opt


def _bits(model):
    return {n: (m.weight_quant.bits, m.input_quant.bits) for n, m in model.named_modules() if isinstance(m, QUANT)}


# ------------------------------------------------------------------------------ input and output layers
def test_every_output_head_at_8_bits_and_the_fixed_decoder_left_alone():
    model, xs = _tiny()
    summary = model.oscqat_summary
    heads = ["box.0", "cls.0", "box.1", "cls.1"]
    assert summary.first == ["stem.0"] and sorted(summary.last) == sorted(heads)
    assert {n for n, b in _bits(model).items() if b == (8, 8)} == {"stem.0", *heads}
    assert _bits(model)["stage.0"] == (4, 4)
    assert type(model.dfl) is nn.Conv2d                        # registered last, yet not quantized: it does not train
    assert ("dfl", "Conv2d", "its weight does not train (requires_grad=False): a fixed layer; "
            "QATConfig.quantize_frozen_layers=True quantizes it") in summary.skipped
    assert "from a traced forward of the first calibration batch" in summary.short()

    _train(model, xs)
    assert torch.equal(model.dfl.weight, torch.arange(4.0).view(1, 4, 1, 1))
    model.eval()
    with torch.no_grad():
        out = model(xs[0])                                      # no uncalibrated quantizer in the eval-only path
    assert out.shape == (4, 4 + 3, 64 + 16) and torch.isfinite(out).all()


def test_fixed_layers_are_quantized_when_asked_and_layers_can_be_named():
    model, _ = _tiny(oscqat.QATConfig(4, 4, quantize_frozen_layers=True))
    assert isinstance(model.dfl, oscqat.QuantConv2d)
    model, _ = _tiny(oscqat.QATConfig(4, 4, first_layers=(), last_layers=("cls.*",)))
    assert {n for n, b in _bits(model).items() if b == (8, 8)} == {"cls.0", "cls.1"}
    assert "from QATConfig" in model.oscqat_summary.short()
    with pytest.raises(ValueError, match=r"QATConfig.last_layers pattern 'head\.\*' matches no quantized layer"):
        _tiny(oscqat.QATConfig(4, 4, last_layers=("head.*",)))
    with pytest.raises(ValueError, match="QATConfig.first_layers must be None or a tuple"):
        oscqat.QATConfig(first_layers="stem.0")


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x        # data-dependent control flow: torch.fx cannot trace it


def test_without_calibration_data_torch_fx_then_module_order():
    torch.manual_seed(0)
    two_inputs = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    oscqat.prepare(two_inputs, verbose=False)
    assert two_inputs.oscqat_summary.first == ["0"] and two_inputs.oscqat_summary.last == ["4"]
    assert "from torch.fx" in two_inputs.oscqat_summary.short()
    gated = nn.Sequential(nn.Linear(6, 8), Gate(), nn.Linear(8, 8), nn.Linear(8, 2))
    oscqat.prepare(gated, verbose=False)
    assert gated.oscqat_summary.first == ["0"] and gated.oscqat_summary.last == ["3"]
    assert "module order: no calib_data to trace a forward with, and torch.fx cannot trace the model" in \
        gated.oscqat_summary.short()


# ------------------------------------------------------------------------------ activation grids
class Shift(nn.Module):
    def forward(self, x):
        return torch.relu(x) - 0.05 * x.abs().mean()      # a small negative tail from a non-module op


def test_activation_grids_follow_the_preceding_activation_and_the_calibration_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), Shift(),
                          nn.Linear(16, 16), nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    xs = [torch.randn(64, 8) for _ in range(2)]
    oscqat.prepare(model, oscqat.QATConfig(4, 4, first_last_bits=None), calib_data=xs, verbose=False)
    acts = [model[i].input_quant for i in (0, 2, 4, 6, 7)]
    assert [a.signed for a in acts] == [True, False, False, False, True]
    assert [a.offset is not None for a in acts] == [False, True, False, True, False]
    model.eval()
    with torch.no_grad():   # calibration's forward: quantized weights, float activations
        w = model[0].weight_quant(model[0].weight)
        silu_min = min(float(F.silu(F.linear(x, w, model[0].bias)).min()) for x in xs)
    assert acts[1].offset.item() == pytest.approx(silu_min, abs=1e-6) and -0.2785 < silu_min < 0
    assert acts[1].offset.requires_grad and acts[1].qmin == 0 and acts[1].qmax == 15
    assert dict(model.oscqat_summary.asymmetric)["2.input"] == "after SiLU"
    assert dict(model.oscqat_summary.asymmetric)["6.input"].startswith("min -")
    # the grid covers [offset, offset + 15 s]: the SiLU output's dip below zero is on the grid
    y = acts[1](torch.tensor([silu_min, 0.0]))
    assert y[0].item() == pytest.approx(silu_min, abs=1e-6) and abs(y[1].item()) <= acts[1].scale.item() / 2

    # a model prepared without calibration data takes the offsets from the checkpoint
    oscqat.prepare(twin, oscqat.QATConfig(4, 4, first_last_bits=None), verbose=False)
    twin.load_state_dict(model.state_dict())
    model.eval()
    twin.eval()
    assert torch.equal(twin(xs[0]), model(xs[0]))


def test_asymmetric_grids_can_be_switched_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Hardswish(), nn.Linear(16, 4))
    oscqat.prepare(model, oscqat.QATConfig(4, 4, first_last_bits=None, asym_act_tail=0.0),
                   calib_data=[torch.randn(32, 8)], verbose=False)
    assert model[2].input_quant.signed and model[2].input_quant.offset is None
    assert not model.oscqat_summary.asymmetric
    with pytest.raises(ValueError, match="asym_act_tail must be a number in"):
        oscqat.QATConfig(asym_act_tail=-0.1)


# ------------------------------------------------------------------------------ calibration and BatchNorm
def test_calibration_sees_the_training_statistics_when_running_statistics_do_not_match():
    """The issue's scenario: a model adapted to a new domain (inputs 30x smaller than its BatchNorm's running
    statistics say), BN momentum 0.03. Eval-mode calibration would give scales 30x too small and clip most
    training activations; calibration on batch statistics covers them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16, momentum=0.03), nn.ReLU(),
                          nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16 * 8 * 8, 4))
    xs = [torch.randn(8, 3, 12, 12) / 30 for _ in range(4)]
    with torch.no_grad():
        model.eval()
        eval_max = max(float(model[:3](x).max()) for x in xs)
        model.train()
        train_max = max(float(model[:3](x).max()) for x in xs)
    model[1].reset_running_stats()
    assert train_max > 10 * eval_max                       # the mismatch is real
    oscqat.prepare(model, oscqat.QATConfig(4, 4), calib_data=xs, verbose=False)
    assert torch.equal(model[1].running_var, torch.ones(16))    # running statistics left as they were
    a = model[3].input_quant
    seen = []
    a.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    model.train()
    model(xs[0])
    clipped = float((seen[0] > a.scale.item() * (a.qmax + 0.5)).float().mean())
    assert clipped < 0.01, clipped
    assert "BatchNorm normalising by batch statistics" in model.oscqat_summary.short()


# ------------------------------------------------------------------------------ fold_bn
def _freeze_some(q, every=5):
    """Freeze every `every`-th weight at its current integer (fz = 1, last_dir = 0: flags = 4)."""
    mask = torch.zeros(q.shape, dtype=torch.bool).flatten()
    mask[::every] = True
    mask = mask.view(q.shape)
    q.flags[mask] = 4
    q.ema[mask] = q.ema[mask].round()
    return mask


def _check_fold(ref, model, pairs, run):
    """`run(m)` runs the eval forward. Every folded layer against the unfolded layer + BatchNorm on the inputs it
    saw, and the activations of both models: identical, or diverging at one quantizer by one step in at most
    1e-4 of its elements, from an input within FOLD_TOL (fp32 rounding)."""
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].detach()))
             for n, _ in pairs]
    acts = {}
    for tag, m in (("ref", ref), ("fold", model)):
        hooks += [q.register_forward_hook(lambda q, a, out, tag=tag: acts.setdefault(tag, []).append(
            (q.layer_name, a[0].detach(), out.detach(), q.scale.item()))) for q in oscqat.quantizers(m)
            if isinstance(q, oscqat.QuantAct)]
    with torch.no_grad():
        run(ref)
        run(model)
        for h in hooks:
            h.remove()
        for name, bn_name in pairs:
            x = seen[name]
            want = ref.get_submodule(bn_name)(ref.get_submodule(name)(x))
            got = model.get_submodule(name)(x)
            assert (got - want).abs().max() <= FOLD_TOL * want.abs().max(), name
    assert len(acts["ref"]) == len(acts["fold"]) > 0
    for (name, x0, y0, s), (_, x1, y1, _) in zip(acts["ref"], acts["fold"]):
        if not torch.equal(y0, y1):
            steps = (y0 - y1).abs() / s
            assert (x0 - x1).abs().max() <= FOLD_TOL * x0.abs().max(), name
            assert int((steps > 0).sum()) <= max(1, 1e-4 * y0.numel()) and steps.max() < 1.01, name
            break


def test_fold_bn_rescales_the_quantizers_and_keeps_the_integers():
    model, xs = _tiny()
    _train(model, xs, target=torch.ones(4, 19, 80))
    conv, bn = model.stage[0], model.stage[1]
    with torch.no_grad():
        bn.weight[3] = -0.7                                    # a negative gamma: integers change sign
        conv.weight[3].clamp_(min=-7 * conv.weight_quant.scale.item())   # none at -8 there (no positive twin)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    frozen = _freeze_some(conv.weight_quant)
    conv.weight_quant.ema[3].clamp_(min=-7)
    ints = conv.weight_quant.int_weight(conv.weight).to(torch.int32)
    ema = conv.weight_quant.ema.clone()
    model.eval()
    ref = copy.deepcopy(model)
    pairs = oscqat.fold_bn(model)
    assert pairs == [("stem.0", "stem.1"), ("stage.0", "stage.1")]
    assert isinstance(model.stage[1], nn.Identity) and isinstance(model.stem[1], nn.Identity)
    q = conv.weight_quant
    assert q.per_channel and q.scale.shape == (16,)
    sign = torch.ones(16, 1, 1, 1, dtype=torch.int32)
    sign[3] = -1
    assert torch.equal(q.int_weight(conv.weight).to(torch.int32), ints * sign)
    assert torch.equal(q.frozen(), frozen)
    assert torch.equal(q.ema, ema * sign)                     # frozen integers (and the EMA) follow the sign
    x = torch.randn(4, 3, 16, 16)
    _check_fold(ref, model, pairs, lambda m: m(x))
    with torch.no_grad():
        assert torch.equal(ref(x), model(x))                   # measured: identical here


def test_fold_bn_refuses_what_it_cannot_fold_exactly():
    model, _ = _tiny()
    conv = model.stage[0]
    with torch.no_grad():
        model.stage[1].weight[2] = -1.0
        conv.weight[2, 0, 0, 0] = -100.0                      # clamped to the grid's lowest integer, -8
    with pytest.raises(ValueError, match=r"stage.1 has a negative gamma in channel 2 .* stage.0 has weights at the "
                                         r"grid's lowest integer -8"):
        oscqat.fold_bn(model)


# ------------------------------------------------------------------------------ weight changed behind the back
def _framework_fuse(model):
    """What a detection framework's own fuse() does: BatchNorm into the conv weights, quantizers untouched."""
    conv, bn = model.stage[0], model.stage[1]
    with torch.no_grad():
        k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.data.mul_(k.view(-1, 1, 1, 1))
    model.stage[1] = nn.Identity()


def test_a_weight_changed_behind_the_quantizers_back_is_an_error():
    model, xs = _tiny()
    _train(model, xs, steps=2)
    _framework_fuse(model)
    model.train()
    with pytest.raises(oscqat.WeightChangedError, match=r"^stage.0.weight: the weight changed outside the optimizer"
                                                        r" since its last step .* fuse\(\) folding BatchNorm"):
        model(xs[0])

    model, xs = _tiny()
    _train(model, xs, steps=2)
    oscqat.fold_bn(model)                                      # oscqat's own fold: no error
    _train(model, xs, steps=2)

    model, xs = _tiny()
    _train(model, xs, steps=2)
    model.box[0].weight.data.mul_(1.5)                         # a deliberate change, accepted
    oscqat.arm_tracking(model)
    _train(model, xs, steps=2)
    model.load_state_dict(_tiny(seed=1)[0].state_dict())      # a load replaces the weights legitimately
    _train(model, xs, steps=2)


# ------------------------------------------------------------------------------ torchvision models
def _det_data(n=2, size=128):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [50.0, 40.0, 120.0, 100.0]]),
                "labels": torch.tensor([1, 2])} for _ in range(n)]
    return images, targets


def _fcos():
    """FCOS on a MobileNetV3-Small FPN backbone whose first stages are fixed (trainable_layers=3)."""
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_small", fpn=True, weights=None, trainable_layers=3,
                                  returned_layers=[3, 4], norm_layer=nn.BatchNorm2d)
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,)), aspect_ratios=((1.0,),) * 3)
    return FCOS(backbone, num_classes=3, min_size=128, max_size=128, anchor_generator=anchors)


DETECTORS = {
    "ssdlite320_mobilenet_v3_large": (
        lambda: ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3),
        [f"head.{h}_head.module_list.{i}.1" for h in ("regression", "classification") for i in range(6)]),
    "fcos_mobilenet_v3_small_fpn": (_fcos, ["head.classification_head.cls_logits", "head.regression_head.bbox_reg",
                                            "head.regression_head.bbox_ctrness"]),
}


@pytest.mark.models
@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_trains_with_its_own_loss_and_folds(name):
    build, heads = DETECTORS[name]
    torch.manual_seed(0)
    model = build()
    fixed = {n: m.weight.clone() for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and not m.weight.requires_grad}
    images, targets = _det_data()
    oscqat.prepare(model, oscqat.QATConfig(4, 4), calib_data=[(images, targets)], verbose=False)
    bits = _bits(model)
    assert sorted(model.oscqat_summary.last) == sorted(heads)
    assert all(bits[h] == (8, 8) for h in heads)
    assert sum(b == (8, 8) for b in bits.values()) == len(heads) + len(model.oscqat_summary.first)

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    sched = oscqat.QATSchedule(model, 10)
    for _ in range(10):
        loss = sum(model(images, targets).values()) + sched.lam * oscqat.dampening_loss(model)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert all(torch.isfinite(d["boxes"]).all() and torch.isfinite(d["scores"]).all() for d in detections)
    for n, w in fixed.items():                                 # fixed layers: float, untouched
        m = model.get_submodule(n)
        assert type(m) is nn.Conv2d and torch.equal(m.weight, w), n
    assert bool(fixed) == (name.startswith("fcos"))

    ref = copy.deepcopy(model)
    pairs = oscqat.fold_bn(model)
    assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules()) - \
        sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 10
    _check_fold(ref, model, pairs, lambda m: m(images))


CLASSIFIERS = {"mobilenet_v3_small": "Hardswish", "efficientnet_b0": "SiLU"}


@pytest.mark.models
@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_classifier_with_hardswish_or_silu(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    xs = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    ys = [torch.randint(0, 10, (4,)) for _ in range(2)]
    oscqat.prepare(model, oscqat.QATConfig(4, 4), calib_data=xs, verbose=False)
    asym = dict(model.oscqat_summary.asymmetric)
    after = [n for n, why in asym.items() if why == f"after {CLASSIFIERS[name]}"]
    assert len(after) >= 10
    for n in after:
        a = model.get_submodule(n.removesuffix(".input")).input_quant
        assert not a.signed and a.offset is not None and -0.375 <= a.offset.item() < 0
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(10):
        F.cross_entropy(model(xs[step % 2]), ys[step % 2]).backward()
        opt.step()
        opt.zero_grad()
    oscqat.reestimate_bn(model, xs)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(xs[0])).all()
    ref = copy.deepcopy(model)
    pairs = oscqat.fold_bn(model)
    assert len(pairs) > 10
    _check_fold(ref, model, pairs, lambda m: m(xs[0]))
