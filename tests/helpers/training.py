"""A small QAT model and loops shared by the layer tests, the batched-weight and companion tests, the multi-step
backend parity test (`qat_model`, `make_opt`, `train_steps`), and the backend-against-reference training runs of
tests/test_gpu_path.py and tests/test_triton_parity.py (`train_and_record`)."""
import contextlib
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


def train_and_record(model, x, steps, lr, fwd=None, autocast=contextlib.nullcontext):
    """`steps` SGD steps of the latent weights (and biases) of a prepared `model` on the loss
    `mean(y^2) + 0.1 * dampening_loss`, under the backend in use, then one eval forward. Scales and offsets get
    gradients but are not stepped (their gradients are reductions, equal only up to summation order), so every
    forward output, weight gradient and state of a backend must be the reference's bits.

    `fwd`: what the training forwards call (e.g. `torch.compile(model)`; default `model`); `autocast`: a
    callable returning the context of each forward (e.g. bf16 autocast). Returns
    ([(y, loss, weight/bias grads, scale/offset grads) per step] + [(eval output, None, [], [])],
    {name: tensor of model.state_dict()}), all cloned."""
    fwd = model if fwd is None else fwd
    lsq = [p for n, p in model.named_parameters() if n.endswith(("scale", "offset")) and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.endswith(("scale", "offset"))]
    opt = torch.optim.SGD(rest, lr=lr)
    sched = oscqat.QATSchedule(model, steps)
    outs = []
    for _ in range(steps):
        with autocast():
            y = fwd(x)
            loss = y.float().square().mean() + 0.1 * oscqat.dampening_loss(model)
        loss.backward()
        outs.append((y.detach().clone(), loss.detach().clone(), [p.grad.clone() for p in rest],
                     [p.grad.clone() for p in lsq]))
        opt.step()
        opt.zero_grad()
        for p in lsq:
            p.grad = None
        sched.step()
    model.eval()
    with torch.no_grad(), autocast():
        outs.append((model(x).detach().clone(), None, [], []))
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return outs, state
