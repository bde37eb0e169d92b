"""oscqat.quantize_weights and QATConfig.batch_weights: the list form of the weight quantizers is the per-layer loop
bit for bit (outputs, state, gradients, errors), and a prepared model that batches its weights trains as one that
does not."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.profiler import profile

import oscqat
from oscqat.nn import weight_check
from oscqat.ops import backends as backend
from helpers.training import STATE, assert_same, make_opt, qat_model, snapshot, train_steps


def _use(name: str):
    try:
        backend.check(name, "cpu")
    except backend.BackendUnavailable as e:
        pytest.skip(str(e))
    return oscqat.use_backend(name)


def _layers(seed: int):
    """Quantizers of assorted kinds (bits, per-channel, tracked or not, dampened, frozen, fp32/bf16 weights) with
    momentum and threshold that freeze weights within a few steps, and their weights."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 3, 3), (16, 1, 3, 3), (24, 16, 1, 1), (10, 24), (5, 7), (40, 300)]
    qs, ws = [], []
    for i, shape in enumerate(shapes):
        bits = int(torch.randint(2, 9, (), generator=gen)) if i % 3 == 2 else 4
        track = bits <= 4 and i != 4
        q = oscqat.WeightQuantizer(shape, bits, per_channel=bool(i % 2), track=track, dampen=track,
                                   freeze=track and i != 1, momentum=0.3, name=f"l{i}.weight").train()
        w = torch.randn(shape, generator=gen) * 0.2
        with torch.no_grad():
            q.scale.copy_(torch.full_like(q.scale, 2 * float(w.abs().mean()) / q.qmax ** 0.5))
            q.freeze_threshold.fill_(0.2)
        qs.append(q)
        ws.append(nn.Parameter(w.to(torch.bfloat16) if i == 3 else w))
    return qs, ws


def _step(qs, ws, batched: bool, gen):
    """One training step with gradient accumulation (the second forward is untracked): outputs, D, counts."""
    seen = []
    for q in qs:
        q.arm()
    for _ in range(2):
        outs = oscqat.quantize_weights(qs, ws) if batched else [q(w) for q, w in zip(qs, ws)]
        r = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
        damp = [q.last_damp for q in qs if q.last_damp is not None]
        (sum((o * ri).float().sum() for o, ri in zip(outs, r)) + 0.3 * torch.stack(damp).sum()).backward()
        seen += outs + damp + [q.last_counts.clone() for q in qs]
    with torch.no_grad():
        for t in ws + [q.scale for q in qs]:
            t -= (0.5 if t.dim() > 1 else 1e-3) * t.grad.to(t.dtype)
    return seen


@pytest.mark.parametrize("name", ["cpp", "torch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantize_weights_is_the_loop_bit_for_bit(name, seed):
    qs, ws = _layers(seed)
    qs2, ws2 = copy.deepcopy(qs), copy.deepcopy(ws)
    with _use(name):
        for step in range(8):
            a = _step(qs, ws, False, torch.Generator().manual_seed(step))
            with profile() as prof:
                b = _step(qs2, ws2, True, torch.Generator().manual_seed(step))
            assert len(a) == len(b)
            for x, y in zip(a, b):
                assert torch.equal(x, y), step
            for w, w2 in zip(ws, ws2):
                assert torch.equal(w, w2) and torch.equal(w.grad, w2.grad)
                w.grad = w2.grad = None
            for q, q2 in zip(qs, qs2):
                assert torch.equal(q.scale.grad, q2.scale.grad)
                q.scale.grad = q2.scale.grad = None
                assert_same(snapshot(q), snapshot(q2))
    ran = {e.key for e in prof.key_averages()}
    assert ("oscqat_C::weight_quant_list" in ran) == (name == "cpp")
    assert "oscqat_C::weight_quant" not in ran
    assert sum(int(q.frozen().sum()) for q in qs2) > 0       # the freeze path ran


def test_quantize_weights_of_a_quantizer_listed_twice_is_the_loop():
    qs, ws = _layers(0)
    q, w = qs[0], ws[0]
    twin, w2 = copy.deepcopy(q), copy.deepcopy(w)
    with _use("cpp"):
        a = oscqat.quantize_weights([q, q], [w, w])
        b = [twin(w2), twin(w2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert_same(snapshot(q), snapshot(twin))


@pytest.mark.parametrize("bad", ["nan_weight", "inf_scale", "changed"])
def test_quantize_weights_checks_every_layer_before_writing(bad):
    """On the CPU the list op checks all layers before any writes: a failure names the first failing layer and
    leaves every layer's state as it was, all still armed (a retry is checked again)."""
    qs, ws = _layers(3)
    with _use("cpp"):
        _step(qs, ws, True, torch.Generator().manual_seed(0))
        for q, w in zip(qs, ws):
            q.weight_ref = weight_check.checksum(w)
            q.arm()
        with torch.no_grad():
            if bad == "nan_weight":
                ws[2][1, 3, 0, 0] = float("nan")
            elif bad == "inf_scale":
                qs[2].scale.fill_(float("inf"))
            else:
                ws[2][0, 0, 0, 0] += 1.0
            ws[4][0, 0] = float("nan")                # a later layer fails too: the first one is named
        state = [snapshot(q) for q in qs]
        err = oscqat.WeightChangedError if bad == "changed" else oscqat.NonFiniteError
        what = {"nan_weight": r"weight has 1 NaN", "inf_scale": r"scale has 1 Inf", "changed": r"the weight changed"}
        for _ in range(2):
            with pytest.raises(err, match=rf"^l2.weight: {what[bad]}"):
                oscqat.quantize_weights(qs, ws)
            for q, s in zip(qs, state):
                assert q.armed
                assert_same(snapshot(q), s)


def test_prepared_model_with_batch_weights_trains_bit_for_bit_as_without():
    model, x = qat_model(seed=0)
    twin, _ = qat_model(seed=0, batch_weights=True)
    assert "QATConfig.batch_weights" in twin.oscqat_summary.short()
    assert "batch_weights" not in model.oscqat_summary.short()
    assert_same(snapshot(model), snapshot(twin))
    runs = [(m, make_opt(m), oscqat.QATSchedule(m, 40)) for m in (model, twin)]
    for chunk in range(3):
        for m, opts, sched in runs:
            train_steps(m, opts, sched, x, 2, seed=chunk)
        assert_same(snapshot(model), snapshot(twin))
    with profile() as prof:
        twin(x).sum().backward()
    ran = {e.key for e in prof.key_averages()}
    assert "oscqat_C::weight_quant_list" in ran and "oscqat_C::weight_quant" not in ran, \
        sorted(k for k in ran if "oscqat" in k)
    assert len(twin._oscqat_ran) == len(oscqat.quant_layers(twin))
    assert sum(int(q.frozen().sum()) for q in oscqat.weight_quantizers(twin)) > 0


def test_batch_weights_model_names_a_nan_weight_and_recovers_its_bookkeeping():
    from oscqat.nn import weight_batch
    model, x = qat_model(seed=0, batch_weights=True)
    opts = make_opt(model)
    train_steps(model, opts, oscqat.QATSchedule(model, 40), x, 2)
    conv = model.features[4].conv[1][0]
    state = snapshot(conv.weight_quant)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(oscqat.NonFiniteError, match=r"^features\.4\.conv\.1\.0\.weight: weight has 1 NaN"):
        model(x)
    assert weight_batch._frames.stack == []         # the post-hook ran although the pre-hook raised
    assert conv.weight_quant.armed
    assert_same(snapshot(conv.weight_quant), state)


class _Branchy(nn.Module):
    """A layer called twice per forward, and one that runs only when `use_c`."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.c = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)
        self.use_c = False

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.b(torch.relu(self.a(x))))))
        if self.use_c:
            h = torch.relu(self.c(h))
        return self.head(h.mean((2, 3)))


def test_batch_weights_follows_the_layers_that_run():
    """A layer that starts running joins the batch from the next forward, a layer called twice is batched once
    (its second call is untracked as per layer), and the run equals per-layer quantization; a layer that stops
    running is quantized (and tracked) once more: the documented difference."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    y = torch.randint(0, 3, (4,))
    cfg = dict(method="dampen+freeze", momentum=0.2, warmup=0.0, freeze_start=0.1, freeze_end=0.1)
    base = _Branchy()
    model = oscqat.prepare(copy.deepcopy(base), oscqat.QATConfig(**cfg), calib_data=[x], verbose=False)
    twin = oscqat.prepare(copy.deepcopy(base), oscqat.QATConfig(**cfg, batch_weights=True), calib_data=[x],
                          verbose=False)
    # weight decay and momentum: a layer that did not run must get no gradient (None), not a zero one
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1) for m in (model, twin)]

    def step(use_c):
        for m, opt in zip((model, twin), opts):
            m.use_c = use_c
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()

    for use_c in (False, False, True, True):
        step(use_c)
        assert_same(snapshot(model), snapshot(twin))
    assert [n for n, m in twin.named_modules() if m in twin._oscqat_ran] == ["a", "b", "c", "head"]
    for m in (model, twin):         # move c's integers, so that tracking it shows
        with torch.no_grad():
            m.c.weight += 1.5 * m.c.weight_quant.scale
        oscqat.arm_tracking(m)
    step(False)
    sm, st = snapshot(model), snapshot(twin)
    differs = {k for k in sm if not (torch.equal(sm[k], st[k]) if isinstance(sm[k], torch.Tensor) else sm[k] == st[k])}
    assert differs and differs <= {f"c.weight_quant.{k}" for k in STATE}, differs


def test_batch_weights_compiles_without_graph_breaks_and_matches_eager():
    model, x = qat_model(seed=0)
    twin, _ = qat_model(seed=0, batch_weights=True)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    out_e, out_c = model(x), compiled(x)
    assert torch.equal(out_e, out_c)
    (out_e.sum() + oscqat.dampening_loss(model)).backward()
    (out_c.sum() + oscqat.dampening_loss(twin)).backward()
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        if a.requires_grad:
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), n
    assert_same(snapshot(model), snapshot(twin))
