"""Real-model matrix: torchvision and timm architectures, randomly initialised (nothing is downloaded), through
README's loop: prepare (W4A4, dampen+freeze, calibrated) -> 10 steps with one optimizer over all parameters,
QATSchedule and dampening_loss -> eval, state_dict round trip, deepcopy, QATModelEMA.

Selected by `-m models`, skipped by `-m "not models"`; runs by default (README's test command installs
torchvision and timm, so they are imported plainly: a missing one is an error, not a skip)."""
import copy
import dataclasses
import functools

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import oscqat

pytestmark = pytest.mark.models

STEPS = 10
BATCH = 4
SIZE = 64            # every model below takes 64x64 (the ViT is built for it)
CLASSES = 10
FLOAT = (nn.Conv1d, nn.Conv2d, nn.Linear)
QUANT = (oscqat.QuantConv1d, oscqat.QuantConv2d, oscqat.QuantLinear)


def _tv(name):
    return lambda: getattr(torchvision.models, name)(weights=None, num_classes=CLASSES)


def _timm(name, **kw):
    return lambda: timm.create_model(name, pretrained=False, num_classes=CLASSES, **kw)


MODELS = {
    "tv_mobilenet_v2": _tv("mobilenet_v2"),
    "tv_mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "tv_efficientnet_b0": _tv("efficientnet_b0"),
    "tv_resnet18": _tv("resnet18"),
    "tv_shufflenet_v2_x0_5": _tv("shufflenet_v2_x0_5"),
    "tv_regnet_x_400mf": _tv("regnet_x_400mf"),
    "timm_efficientnet_lite0": _timm("efficientnet_lite0"),
    "timm_mobilenetv3_large_100": _timm("mobilenetv3_large_100"),     # classifier: timm.layers.Linear
    "timm_convnext_atto": _timm("convnext_atto"),
    "timm_vit_tiny_patch16": _timm("vit_tiny_patch16_224", img_size=SIZE),  # 16 patches
}

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3),
}


def _data():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, 3, SIZE, SIZE, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen))
            for _ in range(2)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on these tiny batches more threads save little, cost a lot on a loaded machine, and
    change the float rounding (so whether a case diverges would depend on the core count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _float_layers(model):
    return [name for name, m in model.named_modules() if isinstance(m, FLOAT)]


def _eval(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@functools.lru_cache(maxsize=1)   # CASES is model-major: a model's cases run one after the other
def _prepared(model_name):
    """(float layer names, the prepared model, an uncalibrated twin prepared from the same float model): each
    model is built and prepared once for all its optimizers; the cases take deep copies before any step. The twin receives the state_dict round trip; its weight scales
    start from min-max rather than MSE (cheaper, and a state_dict that left a scale out would then show)."""
    torch.manual_seed(0)
    model = MODELS[model_name]()
    twin = copy.deepcopy(model)
    names = _float_layers(model)
    config = oscqat.QATConfig(4, 4, "dampen+freeze")
    oscqat.prepare(model, config, calib_data=[x for x, _ in _data()])
    oscqat.prepare(twin, dataclasses.replace(config, weight_init="minmax"))
    return names, model, twin


CASES = [pytest.param(m, o, id=f"{m}-{o}") for m in MODELS for o in OPTIMIZERS]


@pytest.mark.parametrize("model_name,opt_name", CASES)
def test_real_model(model_name, opt_name):
    float_names, base, twin = _prepared(model_name)
    model = copy.deepcopy(base)
    batches = _data()

    # every Conv1d/Conv2d/Linear (subclasses too) is now an oscqat layer; the first and last at 8 bits
    quant = {name: m for name, m in model.named_modules() if isinstance(m, QUANT)}
    left = [name for name, m in model.named_modules() if isinstance(m, FLOAT) and not isinstance(m, QUANT)]
    assert not left, f"{len(left)} of {len(float_names)} layers not quantized: {left[:5]}"
    assert sorted(quant) == sorted(float_names), "quantized layers differ from the model's Conv/Linear layers"
    edge = {float_names[0], float_names[-1]}
    bits = {name: (m.weight_quant.bits, m.input_quant.bits) for name, m in quant.items()}
    want = {name: (8, 8) if name in edge else (4, 4) for name in quant}
    assert bits == want, {n: b for n, b in bits.items() if b != want[n]}

    # README's loop, one optimizer over every parameter (weights, biases, BN, quantizer scales)
    model.train()
    opt = OPTIMIZERS[opt_name](model.parameters())
    sched = oscqat.QATSchedule(model, STEPS)
    ema = None
    for step in range(STEPS):
        x, y = batches[step % len(batches)]
        loss = F.cross_entropy(model(x), y) + sched.lam * oscqat.dampening_loss(model)
        assert torch.isfinite(loss), f"step {step}: loss {loss.item()}"
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if step in (0, STEPS - 1):             # after the first step and after a dampening one (lam > 0)
            copy.deepcopy(model)
        if ema is None:
            ema = oscqat.QATModelEMA(model)
        else:
            ema.update(model)
    assert ema.updates == STEPS - 1

    x = batches[0][0]
    out = _eval(model, x)
    assert out.shape == (BATCH, CLASSES)
    assert torch.isfinite(out).all(), "eval output not finite"
    assert torch.isfinite(_eval(ema.model, x)).all(), "EMA model's eval output not finite"
    assert torch.equal(_eval(copy.deepcopy(model), x), out), "deepcopy gives different eval outputs"

    # state_dict round trip into a freshly prepared copy: bit-identical eval outputs
    fresh = copy.deepcopy(twin)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(_eval(fresh, x), out), "state_dict round trip gives different eval outputs"
