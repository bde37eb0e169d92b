"""A small QAT model and loop shared by the layer tests and the multi-step backend parity test."""
import copy

import torch
from torch import nn

import oscqat
from oscqat.app.models import small_mobilenet

STATE = ("prev_int", "flags", "freq", "ema")


def qat_model(seed=0, **cfg):
    torch.manual_seed(seed)
    model = small_mobilenet()
    model.classifier[0].p = 0.0                     # no dropout: runs compared bit for bit share no RNG
    x = torch.randn(8, 1, 28, 28)
    model.train()
    model(x)                                        # BN statistics of a non-degenerate network
    config = oscqat.QATConfig(**{"method": "dampen+freeze", "freeze_start": 0.002, "freeze_end": 0.001,
                                 "momentum": 0.05, "warmup": 0.0, **cfg})
    oscqat.prepare(model, config, calib_data=[x])
    return model, x


def make_opt(model):
    lsq = [p for n, p in model.named_parameters() if n.endswith(("scale", "offset"))]
    rest = [p for n, p in model.named_parameters() if not n.endswith(("scale", "offset"))]
    return [torch.optim.SGD(rest, lr=0.2, momentum=0.9), torch.optim.Adam(lsq, lr=1e-7)]


def train_steps(model, opts, sched, x, steps, seed=1):
    gen = torch.Generator().manual_seed(seed + sched.step_count)
    y = torch.randint(0, 10, (x.shape[0],), generator=gen)
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y) + sched.lam * oscqat.dampening_loss(model)
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()
        sched.step()


def snapshot(model):
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k
