"""oscqat.app.optim.qat_optimizers, the one QAT optimizer setup of `oscqat train`, bench/experiments.py and
bench/transition_evidence.py, builds what each of them built before inline (copied below as it was): the same
optimizer and scheduler classes, param groups (the same tensors in the same order, the same hyperparameters),
scheduler state, and bit-identical parameters after a few training steps."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oscqat
from oscqat.app.optim import QATOptimizers, make_sgd, qat_optimizers, split_params


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    calib = [torch.randn(16, 1, 12, 12) for _ in range(2)]
    return oscqat.prepare(net, oscqat.QATConfig(4, 4, "dampen+freeze"), calib_data=calib, verbose=False)


# ------------------------------------------------------------------ the setups as they were written before
def _before_train(model, args, total):            # oscqat/app/qat_stage.py, Trainer.setup
    decay, no_decay, quant = split_params(model)
    opt_w = torch.optim.SGD([{"params": decay, "weight_decay": args["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args["lr"], momentum=0.9)
    opt_s = torch.optim.Adam(quant, lr=args["scale_lr"]) if quant else None
    lr_w = torch.optim.lr_scheduler.CosineAnnealingLR(opt_w, total)
    lr_s = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, total) if opt_s else None
    return opt_w, opt_s, lr_w, lr_s


def _before_experiments(model, c, steps):         # bench/experiments.py, run_one
    decay, no_decay, quant = split_params(model)
    opt_w = torch.optim.SGD([{"params": decay, "weight_decay": c["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=c["lr"], momentum=0.9)
    opt_s = torch.optim.Adam(quant, lr=c["scale_lr"])
    lr_w = torch.optim.lr_scheduler.CosineAnnealingLR(opt_w, steps) if c["lr_schedule"] == "cosine" else \
        torch.optim.lr_scheduler.LambdaLR(opt_w, lambda _: 1.0)
    lr_s = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, steps)
    return opt_w, opt_s, lr_w, lr_s


def _split_transition(model):                     # bench/transition_evidence.py, split
    quant = {id(p) for m in model.modules() if isinstance(m, (oscqat.WeightQuantizer, oscqat.QuantAct))
             for p in m.parameters(recurse=False)}
    decay = [p for p in model.parameters() if id(p) not in quant and p.dim() > 1]
    no_decay = [p for p in model.parameters() if id(p) not in quant and p.dim() <= 1]
    return decay, no_decay, [p for p in model.parameters() if id(p) in quant]


def _before_transition(model, opt_name, a, use_talr):   # bench/transition_evidence.py, run_model
    decay, no_decay, quant = _split_transition(model)
    groups = [{"params": decay, "weight_decay": a["wd"]}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=a["sgd_lr"], momentum=0.9) if opt_name == "sgd" else \
        torch.optim.AdamW(groups, lr=a["adamw_lr"])
    opt_s = torch.optim.Adam(quant, lr=a["scale_lr"])
    lr_s = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, a["steps"])
    lr_sched = None if use_talr else torch.optim.lr_scheduler.CosineAnnealingLR(opt, a["steps"])
    return opt, opt_s, lr_sched, lr_s


# ------------------------------------------------------------------ comparison
def _groups(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [{k: ([names[id(p)] for p in v] if k == "params" else v) for k, v in g.items()} for g in opt.param_groups]


def _same_setup(a, b, model_a, model_b):
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert type(x) is type(y)
        if x is None:
            continue
        if isinstance(x, torch.optim.Optimizer):
            assert x.defaults == y.defaults
            assert _groups(x, model_a) == _groups(y, model_b)
        else:
            sx, sy = x.state_dict(), y.state_dict()
            sx.pop("lr_lambdas", None), sy.pop("lr_lambdas", None)
            assert sx == sy


def _train(model, opts, steps=4):
    opt_w, opt_s, lr_w, lr_s = opts
    sched = oscqat.QATSchedule(model, steps)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = F.cross_entropy(model(x), y) + sched.lam * oscqat.dampening_loss(model)
        opt_w.zero_grad(set_to_none=True)
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        opt_w.step()
        opt_s.step()
        if lr_w is not None:
            lr_w.step()
        lr_s.step()
        sched.step()
    return [p.detach().clone() for p in model.parameters()] + [b.clone() for b in model.buffers()]


def _check(before, after):
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1, o2 = before(m1), after(m2)
    assert isinstance(o2, QATOptimizers)
    _same_setup(o1, o2, m1, m2)
    for t1, t2 in zip(_train(m1, o1), _train(m2, o2)):
        assert torch.equal(t1, t2)


def test_split_params_orders_weights_rest_and_scales():
    model = _model()
    decay, no_decay, quant = split_params(model)
    assert decay and no_decay and quant
    assert all(p.dim() > 1 for p in decay) and all(p.dim() <= 1 for p in no_decay)
    assert len(decay) + len(no_decay) + len(quant) == len(list(model.parameters()))
    assert [id(p) for p in quant] == [id(p) for p in _split_transition(model)[2]]
    assert [[id(p) for p in g] for g in split_params(model)] == \
        [[id(p) for p in g] for g in _split_transition(model)]


def test_train_setup_unchanged():
    args = {"lr": 0.01, "weight_decay": 5e-5, "scale_lr": 1e-3}
    _check(lambda m: _before_train(m, args, 4),
           lambda m: qat_optimizers(m, args["lr"], args["weight_decay"], args["scale_lr"], 4))


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_experiments_setup_unchanged(schedule):
    c = {"lr": 0.01, "weight_decay": 2.5e-5, "scale_lr": 1e-4, "lr_schedule": schedule}
    _check(lambda m: _before_experiments(m, c, 4),
           lambda m: qat_optimizers(m, c["lr"], c["weight_decay"], c["scale_lr"], 4, weight_schedule=c["lr_schedule"]))


@pytest.mark.parametrize("opt_name,use_talr", [("sgd", True), ("adamw", True), ("sgd", False)])
def test_transition_evidence_setup_unchanged(opt_name, use_talr):
    a = {"sgd_lr": 0.01, "adamw_lr": 1e-3, "wd": 5e-5, "scale_lr": 1e-3, "steps": 4}
    _check(lambda m: _before_transition(m, opt_name, a, use_talr),
           lambda m: qat_optimizers(m, a["sgd_lr"] if opt_name == "sgd" else a["adamw_lr"], a["wd"], a["scale_lr"],
                                    a["steps"], weights=opt_name, weight_schedule=None if use_talr else "cosine"))


def test_make_sgd_and_options():
    model = _model()
    opt = make_sgd(model, 0.05, 1e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0] and opt.defaults["momentum"] == 0.9
    o = qat_optimizers(model, 0.01, 1e-4, 1e-3, 10, scales="sgd", momentum=0.8)
    assert type(o.opt_s) is torch.optim.SGD and o.opt_s.defaults["momentum"] == 0.8
    assert o.opt_w.defaults["momentum"] == 0.8
    assert qat_optimizers(nn.Linear(2, 2), 0.01, 0.0, 1e-3, 10).opt_s is None     # no quantizer: no scales
    for bad in ({"weights": "adam"}, {"scales": "adamw"}, {"weight_schedule": "step"}):
        with pytest.raises(ValueError):
            qat_optimizers(model, 0.01, 0.0, 1e-3, 10, **bad)
