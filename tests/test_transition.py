"""Transition-rate scheduling (oscqat.TransitionRateSchedule): the measured rate, the controller, the optimizer
plumbing (group split, tensor lr, state kept), resume exactness, no host sync. docs/semantics.md,
"Transition-rate scheduling (TR + TALR)"."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import oscqat
from oscqat.training.transition import REL_ERR_CLIP, TransitionRateSchedule, target_rate


def _config(method="tr", **kw):
    kw.setdefault("quantize_activations", False)
    kw.setdefault("first_last_bits", None)
    return oscqat.QATConfig(method=method, **kw)


def _two_layers(method="tr", **kw):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False))
    m = oscqat.prepare(m, _config(method, weight_init="minmax", **kw))
    for layer in m:
        layer.weight_quant.scale.data.fill_(0.1)
    return m


def _set_ints(layer, ints):
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(ints, dtype=torch.float32).reshape(layer.weight.shape) * 0.1)
    oscqat.arm_tracking(layer)     # a deliberate change outside the optimizer (oscqat/nn/weight_check.py)


def _fake_counts(model, switched):
    """Pretend a tracked forward ran and switched `switched[i]` weights of tracked layer i (new tensors)."""
    qs = [q for q in oscqat.weight_quantizers(model) if q.tracking]
    for q, s in zip(qs, switched):
        q.last_counts = torch.tensor([s, 0], dtype=torch.int32)


# ---------------------------------------------------------------- the schedule of k_t
def test_target_rate_shapes():
    assert target_rate(0, 100, 1e-2, 1e-3) == pytest.approx(1e-2)
    assert target_rate(100, 100, 1e-2, 1e-3) == pytest.approx(1e-3)
    assert target_rate(50, 100, 1e-2, 1e-3) == pytest.approx(5.5e-3)                  # cosine midpoint
    assert target_rate(500, 100, 1e-2, 1e-3) == pytest.approx(1e-3)                  # clamped after the end
    assert target_rate(25, 100, 0.1, 0.0, "linear") == pytest.approx(0.075)
    assert target_rate(10, 90, 1e-2, 1e-4, "step") == pytest.approx(1e-2)
    assert target_rate(30, 90, 1e-2, 1e-4, "step") == pytest.approx(1e-3)             # one of two milestones
    assert target_rate(60, 90, 1e-2, 1e-4, "step") == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="schedule"):
        target_rate(0, 10, 0.1, 0.01, "exp")


# ---------------------------------------------------------------- the measured rate, by hand
def test_transition_rate_by_hand():
    m = _two_layers()
    a, b = m[0], m[1]                                 # 8 and 4 tracked weights
    _set_ints(a, [0, 1, 2, 3, -1, -2, -3, 0])
    _set_ints(b, [1, 1, -1, -1])
    opt = torch.optim.SGD(m.parameters(), lr=0.0)     # lr 0: nothing moves but what we set
    talr = TransitionRateSchedule(m, opt, 10, tr_start=0.5, tr_end=0.5, gamma=0.1, feedforward=False)
    x = torch.randn(3, 4)
    m(x).sum().backward(); opt.step(); talr.step()    # first tracked forward: initialises, measures nothing
    assert talr.last_rate.item() == 0.0 and talr.mu.item() == 1.0
    _set_ints(a, [0, 2, 2, 3, -1, -1, -3, 1])         # 3 of 8 change (one by 1, one up, one down)
    _set_ints(b, [1, 1, -1, 3])                       # 1 of 4 changes (by 4 levels: still one transition)
    m(x).sum().backward(); opt.step(); talr.step()
    assert talr.last_rate.item() == pytest.approx(4 / 12)
    assert talr.last_rates.tolist() == pytest.approx([3 / 8, 1 / 4])
    assert talr.last_rate.dim() == 0 and talr.lr.dim() == 0
    # e = (0.5 - 1/3) / 0.5 = 1/3 -> mu = exp(0.1 / 3)
    assert talr.mu.item() == pytest.approx(math.exp(0.1 / 3), rel=1e-6)
    m(x).sum().backward(); opt.step(); talr.step()    # nothing changed: TR 0, e = 1
    assert talr.last_rate.item() == 0.0
    assert talr.mu.item() == pytest.approx(math.exp(0.1 / 3 + 0.1), rel=1e-6)


def test_untracked_layers_keep_the_user_lr():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    m = oscqat.prepare(m, oscqat.QATConfig(method="tr", quantize_activations=False))   # first/last at 8 bits
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    talr = TransitionRateSchedule(m, opt, 10)
    assert talr.layer_names == ["2"]
    assert [len(g["params"]) for g in opt.param_groups] == [8, 1]   # 3 weights, 3 biases, 3 scales - 1
    assert opt.param_groups[1]["params"][0] is m[2].weight
    assert isinstance(opt.param_groups[0]["lr"], float)   # 8-bit weights, biases and scales keep the user's LR


# ---------------------------------------------------------------- the controller on known sequences
@pytest.mark.parametrize("feedforward", [False, True])
def test_multiplicative_controller_sequence(feedforward):
    m = _two_layers()
    opt = torch.optim.SGD(m.parameters(), lr=0.02)
    T, k0, k1, gamma = 8, 0.2, 0.05, 0.3
    talr = TransitionRateSchedule(m, opt, T, tr_start=k0, tr_end=k1, gamma=gamma, mu_max=1.1,
                                  feedforward=feedforward)
    seq = [(5, 2), (0, 0), (8, 4), (1, 0), (0, 1), (0, 0), (0, 0), (0, 0)]    # switched in layers of 8 and 4
    mu, expect_mu, expect_rate = 1.0, [], []
    for t, (sa, sb) in enumerate(seq):
        rate = (sa + sb) / 12
        if t > 0:                                      # t = 0: the initialising forward
            k = target_rate(t, T, k0, k1)
            e = min(1.0, max(-REL_ERR_CLIP, (k - rate) / k))
            ff = target_rate(t + 2, T, k0, k1) / target_rate(t + 1, T, k0, k1) if feedforward else 1.0
            mu = min(1.1, max(1e-4, mu * math.exp(gamma * e) * ff))
        expect_mu.append(mu)
        expect_rate.append(rate if t > 0 else 0.0)
    got_mu, got_rate = [], []
    for sa, sb in seq:
        _fake_counts(m, [sa, sb])
        talr.step()
        got_mu.append(talr.mu.item())
        got_rate.append(talr.last_rate.item())
        assert talr.lr.item() == pytest.approx(0.02 * got_mu[-1], rel=1e-6)
        assert opt.param_groups[-1]["lr"] is talr.lr
    assert got_rate == pytest.approx(expect_rate, rel=1e-6)
    assert got_mu == pytest.approx(expect_mu, rel=1e-5)
    assert max(got_mu) == pytest.approx(1.1)          # the clip was reached (TR 0 at step 1: mu * e^0.3)
    assert min(got_mu) < 0.5                           # TR (8 + 4) / 12 = 1, far above k: e clipped at -4


def test_additive_controller_sequence_and_clip():
    m = _two_layers()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    talr = TransitionRateSchedule(m, opt, 4, tr_start=0.25, tr_end=0.25, rule="additive", gamma=2.0, mu_max=1.2)
    mu = 1.0
    for sa, sb, first in [(0, 0, True), (6, 0, False), (12 - 4, 4, False), (0, 0, False), (0, 0, False)]:
        _fake_counts(m, [sa, sb])
        talr.step()
        if not first:
            mu = min(1.2, max(0.0, mu + 2.0 * (0.25 - (sa + sb) / 12)))
        assert talr.mu.item() == pytest.approx(mu, rel=1e-6)
    assert mu == pytest.approx(1.0)                    # 1.0 -> 0.5 -> 0 (clipped) -> 0.5 -> 1.0
    with pytest.raises(ValueError, match="gamma explicitly"):
        TransitionRateSchedule(m, torch.optim.SGD(m.parameters(), lr=0.1), 4, rule="additive")


def test_per_layer_controller():
    m = _two_layers()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    talr = TransitionRateSchedule(m, opt, 4, tr_start=0.25, tr_end=0.25, per_layer=True, gamma=0.5,
                                  feedforward=False)
    assert len(opt.param_groups) == 3 and talr.mu.shape == (2,) and talr.lr.shape == (2,)
    _fake_counts(m, [0, 0]); talr.step()
    _fake_counts(m, [4, 0]); talr.step()              # layer rates 1/2 and 0
    assert talr.last_rates.tolist() == pytest.approx([0.5, 0.0])
    assert talr.mu.tolist() == pytest.approx([math.exp(-0.5), math.exp(0.5)], rel=1e-6)
    assert [opt.param_groups[i]["lr"].item() for i in (1, 2)] == pytest.approx(
        [0.1 * math.exp(-0.5), 0.1 * math.exp(0.5)], rel=1e-6)
    # a layer that ran no tracked forward keeps its rate and its mu
    qs = [q for q in oscqat.weight_quantizers(m) if q.tracking]
    qs[1].last_counts = torch.tensor([4, 0], dtype=torch.int32)
    talr.step()
    assert talr.last_rates.tolist() == pytest.approx([0.5, 1.0])
    assert talr.mu.tolist() == pytest.approx([math.exp(-0.5), math.exp(0.5 - 0.5 * 3)], rel=1e-6)


def test_no_fresh_counts_no_update():
    m = _two_layers()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    talr = TransitionRateSchedule(m, opt, 10, feedforward=False)
    _fake_counts(m, [0, 0]); talr.step()
    _fake_counts(m, [0, 0]); talr.step()
    mu = talr.mu.item()
    talr.step()                                        # no tracked forward since: stale counts are not re-read
    talr.step()
    assert talr.mu.item() == mu and talr.step_count == 4


# ---------------------------------------------------------------- optimizer plumbing
def _mixed_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    return oscqat.prepare(m, _config("tr", quantize_activations=True), calib_data=[torch.randn(16, 6)])


def test_group_split_keeps_hyperparameters_and_state():
    m = _mixed_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    F.cross_entropy(m(torch.randn(16, 6)), torch.randint(0, 3, (16,))).backward()
    opt.step()
    bufs = {p: opt.state[p]["momentum_buffer"] for p in m.parameters() if p.requires_grad}
    latent = [m[0].weight, m[3].weight, m[5].weight]
    talr = TransitionRateSchedule(m, opt, 10, mu_init=0.5)
    assert len(opt.param_groups) == 2
    g0, g1 = opt.param_groups
    assert not any(p is w for p in g0["params"] for w in latent)
    assert [id(p) for p in g1["params"]] == [id(w) for w in latent]
    for k in ("momentum", "weight_decay", "nesterov", "dampening", "maximize", "foreach"):
        assert g1[k] == g0[k]
    assert g0["lr"] == 0.05 and torch.is_tensor(g1["lr"]) and g1["lr"].item() == pytest.approx(0.025)
    assert all(opt.state[p]["momentum_buffer"] is b for p, b in bufs.items())
    assert talr.base_lrs == [0.05]


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.Adam(ps, lr=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
], ids=["sgd", "adam", "adamw"])
def test_talr_scales_the_latent_update_only(make):
    m = _mixed_model()
    ref = copy.deepcopy(m)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    latent = {id(m[i].weight) for i in (0, 3, 5)}
    opt = make(m.parameters())
    TransitionRateSchedule(m, opt, 10, mu_init=0.25)
    # reference: the same optimizer with the latent weights at lr * 0.25 by hand
    ref_latent = [ref[i].weight for i in (0, 3, 5)]
    ref_other = [p for p in ref.parameters() if all(p is not w for w in ref_latent)]
    opt_ref = make(ref_other)
    base = opt_ref.param_groups[0]["lr"]
    opt_ref.add_param_group({"params": ref_latent, "lr": base * 0.25})
    for model, o in ((m, opt), (ref, opt_ref)):
        for _ in range(2):
            oscqat.arm_tracking(model)
            F.cross_entropy(model(x), y).backward()
            o.step()
            o.zero_grad()
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
    assert any(id(p) in latent for p in m.parameters())


def test_foreach_adam_without_capturable_is_refused():
    m = _two_layers()
    with pytest.raises(ValueError, match="capturable=True"):
        TransitionRateSchedule(m, torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True), 10)
    TransitionRateSchedule(m, torch.optim.Adam(m.parameters(), lr=1e-3, foreach=False), 10)


def test_errors_name_the_fix():
    m = _two_layers()
    with pytest.raises(ValueError, match="total_steps"):
        TransitionRateSchedule(m, torch.optim.SGD(m.parameters(), lr=0.1), 0)
    with pytest.raises(ValueError, match="tr_end"):
        TransitionRateSchedule(m, torch.optim.SGD(m.parameters(), lr=0.1), 10, tr_end=0.0)
    with pytest.raises(ValueError, match="holds none"):
        TransitionRateSchedule(m, torch.optim.SGD([m[0].weight_quant.scale], lr=0.1), 10)
    plain = oscqat.prepare(nn.Sequential(nn.Linear(4, 4)), oscqat.QATConfig(method="lsq", track=False,
                                                                              quantize_activations=False))
    with pytest.raises(ValueError, match="no tracked"):
        TransitionRateSchedule(plain, torch.optim.SGD(plain.parameters(), lr=0.1), 10)


def test_config_methods():
    c = oscqat.QATConfig(method="tr+freeze")
    assert c.transition and c.freeze and not c.dampen
    assert oscqat.QATConfig(method="tr+dampen+freeze").dampen
    assert not oscqat.QATConfig(method="dampen+freeze").transition
    with pytest.raises(ValueError, match="track"):
        oscqat.QATConfig(method="tr", track=False)


# ---------------------------------------------------------------- no host sync in step()
def test_step_never_syncs(monkeypatch):
    m = _two_layers()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    global_ = TransitionRateSchedule(m, opt, 10)
    m2 = _two_layers()
    per_layer = TransitionRateSchedule(m2, torch.optim.SGD(m2.parameters(), lr=0.1), 10, per_layer=True)

    def boom(*a, **k):
        raise AssertionError("host sync in TransitionRateSchedule.step()")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for talr, model in ((global_, m), (per_layer, m2)):
        for counts in ([1, 0], [2, 1], [0, 3]):
            _fake_counts(model, counts)
            talr.step()
        qs = [q for q in oscqat.weight_quantizers(model) if q.tracking]
        qs[0].last_counts = torch.tensor([1, 0], dtype=torch.int32)     # only one layer fresh
        talr.step()
    monkeypatch.undo()
    assert 0 < global_.mu.item() and per_layer.mu.shape == (2,)


# ---------------------------------------------------------------- resume, composition
def _loop(model, opt, talr, sched, ema, batches):
    for x, y in batches:
        loss = F.cross_entropy(model(x), y) + sched.lam * oscqat.dampening_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        talr.step()
        sched.step()
        if ema is not None:
            ema.update(model)


def _build(method="tr+dampen+freeze", per_layer=False):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                      nn.Linear(16, 3))
    cfg = oscqat.QATConfig(method=method, quantize_activations=False, warmup=0.1, freeze_start=0.3,
                           freeze_end=0.2, momentum=0.2)
    m = oscqat.prepare(m, cfg)
    opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-4)
    talr = TransitionRateSchedule(m, opt, 40, tr_start=0.05, tr_end=0.005, per_layer=per_layer)
    return m, opt, talr, oscqat.QATSchedule(m, 40, cfg)


@pytest.mark.parametrize("per_layer", [False, True])
def test_resume_is_exact(per_layer):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(24)]
    m, opt, talr, sched = _build(per_layer=per_layer)
    _loop(m, opt, talr, sched, None, data[:12])
    ck = copy.deepcopy({"model": m.state_dict(), "opt": opt.state_dict(), "talr": talr.state_dict(),
                        "sched": sched.state_dict()})
    _loop(m, opt, talr, sched, None, data[12:])

    m2, opt2, talr2, sched2 = _build(per_layer=per_layer)
    m2.load_state_dict(ck["model"])
    talr2.load_state_dict(ck["talr"])
    opt2.load_state_dict(ck["opt"])                  # replaces the groups' lr: the post-hook rebinds TALR's
    sched2.load_state_dict(ck["sched"])
    assert opt2.param_groups[-1]["lr"] is talr2._lr_views[-1]
    _loop(m2, opt2, talr2, sched2, None, data[12:])
    for (n, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, n
    assert torch.equal(talr.mu, talr2.mu) and torch.equal(talr.lr, talr2.lr)
    assert torch.equal(talr.last_rate, talr2.last_rate)
    assert talr.mu.min().item() != 1.0               # the controller did move


def test_composes_with_freezing_and_ema():
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(30)]
    m, opt, talr, sched = _build()
    ema = oscqat.QATModelEMA(m, decay=0.9)
    rates = []
    for batch in data:
        _loop(m, opt, talr, sched, ema, [batch])
        rates.append(talr.last_rate.item())
    frozen = sum(int(q.frozen().sum()) for q in oscqat.weight_quantizers(m) if q.tracking)
    assert frozen > 0                                 # freezing ran under TALR
    assert max(rates) > 0
    assert not torch.equal(ema.model[2].weight, m[2].weight)
    assert torch.equal(ema.model[2].weight_quant.flags, m[2].weight_quant.flags)


def test_toy_tr_follows_target():
    from oscqat.app.toy import run_toy_tr
    res = run_toy_tr("sgd", weights=4000, steps=400, tr_start=2e-2, tr_end=5e-3)
    r, k = res["rates"], res["targets"]
    # 40-step means of TR against the target's, second half: within 25%
    for i in range(200, 400, 40):
        assert sum(r[i:i + 40]) / 40 == pytest.approx(sum(k[i:i + 40]) / 40, rel=0.25)


def test_lr_scheduler_does_not_drive_the_talr_groups():
    m = _two_layers()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)          # built before: it sees the split later
    talr = TransitionRateSchedule(m, opt, 10, feedforward=False)
    for counts in ([0, 0], [1, 1], [0, 0], [2, 0]):
        _fake_counts(m, counts)
        opt.step()
        cos.step()                                     # writes into every group's lr, ours included
        talr.step()                                    # ... and talr.step() writes base lr * mu back
        assert opt.param_groups[-1]["lr"].item() == pytest.approx(0.1 * talr.mu.item(), rel=1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(cos.get_last_lr()[0]) and opt.param_groups[0]["lr"] < 0.1


def test_toy_cli_method_tr(capsys):
    import json

    from oscqat.app.cli import main
    assert main(["toy", "--method", "tr", "--optimizer", "adamw", "--weights", "500", "--steps", "40",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["optimizer"] == "adamw" and out["lr"] == 1e-3 and out["steps"] == 40
    assert out["mean_abs_err_2nd_half"] >= 0
