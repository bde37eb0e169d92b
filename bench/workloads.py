"""Workloads of bench/run.py: for (workload, contender) a zero-argument callable, plus the bytes model.

Every builder raises contenders.Skip when the contender does not apply. All contenders of one workload get the
same inputs (same seeds, same shapes, same mid-training state).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import oscqat
from oscqat.app import models
from oscqat.ops.library import ActQuantFn, quantize_weight
from oscqat.nn.prepare import weight_scale
from oscqat.nn.quantizers import WeightQuantizer

import contenders as C


def grad(outputs, inputs, grad_outputs, retain_graph=False):
    """torch.autograd.grad minus its Python checks of each grad_output against its output (_make_grads: ~12 us
    per output; 0.7 ms of a weight-set step's 53). In a training step the engine reaches these outputs from the
    layers above with no such checks; this is the engine call torch.autograd.grad makes after them, for every
    autograd contender alike."""
    return _ENGINE.run_backward(tuple(outputs), tuple(grad_outputs), retain_graph, False, tuple(inputs), False, False)


_ENGINE = torch.autograd.Variable._execution_engine

W_BITS = 4
WN, WP = -(2 ** (W_BITS - 1)), 2 ** (W_BITS - 1) - 1       # signed 4-bit weights
AN, AP = 0, 2 ** 4 - 1                                      # unsigned 4-bit activations (after ReLU)
FAN_IN = 256                                                # single-tensor weights are (N / 256, 256)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def es(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# Fewest bytes per element each op must move (docs/semantics.md), e = element size of w / x / g.
BYTES_MODEL = {
    "weight_fwd_track": ("read w e + prev_int 1 + flags 1 + freq 4 + ema 4; write w_hat e + the 10 B of state",
                         lambda e: 2 * e + 20),
    "weight_bwd": ("read g e + w e + flags 1 + ema 4; write dL/dw e (dL/ds and D are reductions)",
                   lambda e: 3 * e + 5),
    "act_fwd": ("read x e; write y e", lambda e: 2 * e),
    "act_bwd": ("read g e + x e; write dL/dx e", lambda e: 3 * e),
    "weightset_step": ("weight_fwd_track + weight_bwd over every weight of MobileNetV2 (fp32: 28 + 17)",
                       lambda e: 5 * e + 25),
}


def bytes_per_elem(op: str, dtype: torch.dtype) -> int:
    return BYTES_MODEL[op][1](es(dtype))


def _scale_param(value, device):
    return nn.Parameter(torch.full((1,), float(value), device=device))


# ====================================================================== single-tensor weight ops
class WeightCase:
    def __init__(self, numel: int, dtype, device, seed=0):
        self.shape = (numel // FAN_IN, FAN_IN)
        self.numel, self.dtype, self.device = numel, dtype, device
        self.s = 0.02
        self.scale = _scale_param(self.s, device)
        self.ws = C.weight_pair(self.shape, self.s, dtype, device, seed)
        for w in self.ws:
            w.requires_grad_(True)
        self.state, self.raw = C.make_weight_state(self.ws[0], self.scale.detach(), WN, WP, seed + 1)
        self.f_th = torch.tensor(C.F_TH, device=device)
        gen = torch.Generator().manual_seed(seed + 2)
        self.g = torch.randn(self.shape, generator=gen).to(device=device, dtype=dtype)
        self.gD = torch.tensor(C.LAMBDA, device=device)
        self.div = float(FAN_IN)
        self.gs = 1.0 / math.sqrt(numel * WP)
        self.alt = C.Alternate(self.ws)


def _cpp_ops(device):
    C.check_backend("cpp", device)
    return torch.ops.oscqat_C


def build_weight(contender: str, op: str, case: WeightCase, device: str):
    c = case
    st = c.state
    if contender == C.CPP_OP:
        ops = _cpp_ops(device)
        s = c.scale.detach()
        if op == "weight_fwd_track":
            return lambda: ops.weight_fwd_track(c.alt().detach(), s, st["prev_int"], st["flags"], st["freq"], st["ema"],
                                                c.f_th, WN, WP, C.MOMENTUM, True, c.div)
        w0 = c.ws[0].detach()
        return lambda: ops.weight_bwd(c.g, w0, s, st["flags"], st["ema"], c.gD, WN, WP, c.gs, True, c.div, True)
    if contender == C.REF:
        tracker = C.RefTracker()
        tracker.init_state(**c.raw)
        q = C.RefLSQQuantizer(c.scale.detach(), WN, WP, c.numel, tracker=tracker).to(device)

        def fwd():
            w = c.alt()
            return q(w), C.ref_dampening_loss(w, q)
        if op == "weight_fwd_track":
            return fwd
        w_hat, d = q(c.ws[0]), C.ref_dampening_loss(c.ws[0], q)
        return lambda: grad([w_hat, d], [c.ws[0], q.delta], [c.g, c.gD], retain_graph=True)

    if C.is_oscqat_backend(contender):
        b = C.backend_of(contender)
        C.check_backend(b, device)

        def fwd():
            return quantize_weight(c.alt(), c.scale, st["flags"], st["ema"], (st["prev_int"], st["freq"]), c.f_th,
                                   WN, WP, C.MOMENTUM, True, c.div, c.gs, b)
        if op == "weight_fwd_track":
            return fwd
        # The graph's own copy of the state: the contenders of a row are built first, then timed round-robin, and
        # another contender's tracked forward on shared state would invalidate this graph (autograd's version check).
        st = {k: v.clone() for k, v in st.items()}
        w_hat, d, _ = quantize_weight(c.ws[0], c.scale, st["flags"], st["ema"], (st["prev_int"], st["freq"]),
                                      c.f_th, WN, WP, C.MOMENTUM, True, c.div, c.gs, b)
        return lambda: grad([w_hat, d], [c.ws[0], c.scale], [c.g, c.gD], retain_graph=True)

    if contender == C.COMPILED:
        s = c.scale.detach()
        if op == "weight_fwd_track":
            f = C.compiled("weight_fwd_track")
            return lambda: f(c.alt().detach(), s, st["prev_int"], st["flags"], st["freq"], st["ema"], c.f_th, WN, WP,
                             C.MOMENTUM, True, c.div)
        f = C.compiled("weight_bwd")
        w0 = c.ws[0].detach()
        return lambda: f(c.g, w0, s, st["flags"], st["ema"], c.gD, WN, WP, c.gs, True, c.div, True)

    if contender == C.ATEN:
        zp = torch.zeros(1, device=device)

        def fq(w):
            return torch._fake_quantize_learnable_per_tensor_affine(w, c.scale, zp, WN, WP, c.gs)
        if op == "weight_fwd_track":
            return lambda: fq(c.alt())
        y = fq(c.ws[0])
        return lambda: grad([y], [c.ws[0], c.scale], [c.g], retain_graph=True)
    raise C.Skip(f"unknown contender {contender}")


# ====================================================================== single-tensor activation ops
class ActCase:
    def __init__(self, numel: int, dtype, device, seed=0):
        batch = max(1, numel // 65536)
        self.shape = (batch, numel // batch)
        gen = torch.Generator().manual_seed(seed)
        self.xs = [(torch.randn(self.shape, generator=gen) * 0.4).to(device=device, dtype=dtype).requires_grad_(True)
                   for _ in range(2)]
        self.g = torch.randn(self.shape, generator=gen).to(device=device, dtype=dtype)
        self.scale = _scale_param(0.05, device)
        self.gs = 1.0 / math.sqrt(self.shape[1] * AP)
        self.alt = C.Alternate(self.xs)
        self.numel = numel


def build_act(contender: str, op: str, case: ActCase, device: str):
    c = case
    if contender == C.CPP_OP:
        ops = _cpp_ops(device)
        s = c.scale.detach()
        if op == "act_fwd":
            return lambda: ops.act_fwd(c.alt().detach(), s, None, AN, AP)
        x0 = c.xs[0].detach()
        return lambda: ops.act_bwd(c.g, x0, s, None, AN, AP, c.gs)
    if contender == C.REF:
        q = C.RefLSQQuantizer(c.scale.detach(), AN, AP, c.shape[1]).to(device)
        if op == "act_fwd":
            return lambda: q(c.alt())
        y = q(c.xs[0])
        return lambda: grad([y], [c.xs[0], q.delta], [c.g], retain_graph=True)
    if C.is_oscqat_backend(contender):
        b = C.backend_of(contender)
        C.check_backend(b, device)
        if op == "act_fwd":
            return lambda: ActQuantFn.apply(c.alt(), c.scale, None, AN, AP, c.gs, b)
        y = ActQuantFn.apply(c.xs[0], c.scale, None, AN, AP, c.gs, b)
        return lambda: grad([y], [c.xs[0], c.scale], [c.g], retain_graph=True)
    if contender == C.COMPILED:
        s = c.scale.detach()
        if op == "act_fwd":
            f = C.compiled("act_fwd")
            return lambda: f(c.alt().detach(), s, None, AN, AP)
        f = C.compiled("act_bwd")
        x0 = c.xs[0].detach()
        return lambda: f(c.g, x0, s, None, AN, AP, c.gs)
    if contender == C.ATEN:
        zp = torch.zeros(1, device=device)
        if op == "act_fwd":
            return lambda: torch._fake_quantize_learnable_per_tensor_affine(c.alt(), c.scale, zp, AN, AP, c.gs)
        y = torch._fake_quantize_learnable_per_tensor_affine(c.xs[0], c.scale, zp, AN, AP, c.gs)
        return lambda: grad([y], [c.xs[0], c.scale], [c.g], retain_graph=True)
    raise C.Skip(f"unknown contender {contender}")


# ====================================================================== MobileNetV2 weight set, one QAT step
def mobilenet_weight_shapes():
    m = models.mobilenet_v2()
    return [mod.weight.detach().clone() for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]


class WeightSetCase:
    """Every Conv2d/Linear weight of MobileNetV2 (53 tensors, 3.47M weights), all W4 per-tensor, tracked, frozen and
    dampened (8-bit first/last layers of a real run would be untracked; here every layer does the full work)."""

    def __init__(self, device, seed=0):
        torch.manual_seed(seed)
        base = mobilenet_weight_shapes()
        self.n_layers = len(base)
        self.numel = sum(w.numel() for w in base)
        self.device = device
        self.scales, self.pairs, self.states, self.raws, self.gs_list = [], [], [], [], []
        gen = torch.Generator().manual_seed(seed + 7)
        for i, w in enumerate(base):
            s = weight_scale(w, WN, WP, per_channel=False, method="lsq")
            bump = (torch.rand(w.shape, generator=gen) < 0.33) * (torch.rand(w.shape, generator=gen) - 0.5) * (0.6 * s)
            pair = [w.to(device).requires_grad_(True), (w + bump).to(device).requires_grad_(True)]
            st, raw = C.make_weight_state(pair[0], s.to(device), WN, WP, seed + 100 + i)
            self.scales.append(s.to(device))
            self.pairs.append(pair)
            self.states.append(st)
            self.raws.append(raw)
            self.gs_list.append(torch.randn(w.shape, generator=gen).to(device))
        self.i = 0

    def weights(self):
        self.i ^= 1
        return [p[self.i] for p in self.pairs]

    @property
    def fan_ins(self):
        return [p[0].numel() // p[0].shape[0] for p in self.pairs]


def build_weightset(contender: str, c: WeightSetCase, device: str):
    lam = torch.tensor(C.LAMBDA, device=device)
    if contender == C.REF:
        qs = []
        for s, raw, p in zip(c.scales, c.raws, c.pairs):
            tr = C.RefTracker()
            tr.init_state(**raw)
            qs.append(C.RefLSQQuantizer(s, WN, WP, p[0].numel(), tracker=tr).to(device))
        deltas = [q.delta for q in qs]

        def step():
            ws = c.weights()
            outs = [q(w) for q, w in zip(qs, ws)]
            damp = sum(C.ref_dampening_loss(w, q) for q, w in zip(qs, ws)) * C.LAMBDA    # DampeningLoss
            return grad(outs + [damp], ws + deltas, c.gs_list + [torch.ones((), device=device)])
        return step

    if C.is_oscqat_backend(contender):
        b = C.backend_of(contender)
        C.check_backend(b, device)
        qs = []
        for i, (s, st, p) in enumerate(zip(c.scales, c.states, c.pairs)):
            q = WeightQuantizer(p[0].shape, W_BITS, per_channel=False, track=True, dampen=True, freeze=True,
                                momentum=C.MOMENTUM, name=f"w{i}").to(device)
            with torch.no_grad():
                q.scale.copy_(s)
                for k, v in st.items():
                    getattr(q, k).copy_(v)
                q.freeze_threshold.fill_(C.F_TH)
            q.train()
            qs.append(q)
        scales = [q.scale for q in qs]
        in_one_call = contender == C.batched(C.oscqat_name(b))

        def step():
            ws = c.weights()
            with oscqat.use_backend(b):
                for q in qs:
                    q.arm()
                outs = oscqat.quantize_weights(qs, ws) if in_one_call else [q(w) for q, w in zip(qs, ws)]
                damp = torch.stack([q.last_damp for q in qs]).sum()
                return grad(outs + [damp], ws + scales, c.gs_list + [lam])
        return step

    if contender == C.CPP_OP:
        ops = _cpp_ops(device)
        gsc = [1.0 / math.sqrt(p[0].numel() * WP) for p in c.pairs]
        f_th = torch.tensor(C.F_TH, device=device)

        def step():      # in training order: every forward, then the backwards in reverse
            ws = [w.detach() for w in c.weights()]
            for w, s, st, div in zip(ws, c.scales, c.states, c.fan_ins):
                ops.weight_fwd_track(w, s, st["prev_int"], st["flags"], st["freq"], st["ema"], f_th, WN, WP,
                                     C.MOMENTUM, True, float(div))
            for w, s, st, g, div, gs in reversed(list(zip(ws, c.scales, c.states, c.gs_list, c.fan_ins, gsc))):
                ops.weight_bwd(g, w, s, st["flags"], st["ema"], lam, WN, WP, gs, True, float(div), True)
        return step

    if contender == C.COMPILED:
        fwd, bwd = C.compiled("weight_fwd_track"), C.compiled("weight_bwd")
        f_th = torch.tensor(C.F_TH, device=device)
        gsc = [1.0 / math.sqrt(p[0].numel() * WP) for p in c.pairs]
        # 2-D views (C, fan-in) of every tensor, as the reference reshapes anyway: one compiled graph for all layers
        # (and the same one as the single-tensor workloads) instead of one per rank.
        st2d = [{k: v.view(v.shape[0], -1) for k, v in st.items()} for st in c.states]
        g2d = [g.reshape(g.shape[0], -1) for g in c.gs_list]

        def step():
            ws = c.weights()
            out = []
            for w, s, st, g, div, gs in zip(ws, c.scales, st2d, g2d, c.fan_ins, gsc):
                w = w.detach().reshape(w.shape[0], -1)
                w_hat, d, _ = fwd(w, s, st["prev_int"], st["flags"], st["freq"], st["ema"], f_th, WN, WP, C.MOMENTUM,
                                  True, float(div))
                out.append(bwd(g, w, s, st["flags"], st["ema"], lam, WN, WP, gs, True, float(div), True))
            return out
        return step

    if contender == C.ATEN:
        zp = torch.zeros(1, device=device)
        scales = [nn.Parameter(s.clone()) for s in c.scales]
        gsc = [1.0 / math.sqrt(p[0].numel() * WP) for p in c.pairs]

        def step():
            ws = c.weights()
            outs = [torch._fake_quantize_learnable_per_tensor_affine(w, s, zp, WN, WP, gs)
                    for w, s, gs in zip(ws, scales, gsc)]
            return grad(outs, ws + scales, c.gs_list)
        return step
    raise C.Skip(f"unknown contender {contender}")


# ====================================================================== end-to-end training step
BATCHED_E2E = "dampen+freeze, batch_weights"      # QATConfig(batch_weights=True): the weights in one call
E2E_VARIANTS = ("fp32", "lsq", "dampen+freeze", BATCHED_E2E)
E2E_ARCHS = ("mobilenet_v2", "resnet18")


def build_e2e(variant: str, backend: str | None, device: str, batch: int, res: int, arch: str = "mobilenet_v2",
              compiled: bool = False, seed=0):
    """One SGD step of a torchvision model (W4A4 per-tensor, 8-bit first/last as QATConfig's default): forward,
    loss (+ lam * dampening_loss), backward, optimizer step, QATSchedule.step(). The schedule is placed
    mid-training (past warm-up) so that freezing and dampening are on. `compiled`: the model's forward (and so its
    backward) under torch.compile (inductor); the loss, optimizer and schedule stay eager."""
    try:
        import torchvision
    except ImportError as e:
        raise C.Skip(f"torchvision is not installed ({e})") from e
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)().to(device).train()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, res, res, generator=gen).to(device)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    sched = None
    if variant != "fp32":
        C.check_backend(backend, device)
        method = variant.split(",")[0]
        cfg = oscqat.QATConfig(weight_bits=4, act_bits=4, method=method, track=(method != "lsq"),
                               weight_init="lsq", batch_weights=(variant == BATCHED_E2E))
        # No calib_data: activation scales take the LSQ init from the first training batch (the timer's warm-up).
        # (Calibrating a freshly initialised model runs it in eval mode with untrained BatchNorm statistics, which
        # gives ~1e-8 scales deep in the net and a negative scale after one SGD step.)
        oscqat.prepare(model, cfg, verbose=False)
        sched = oscqat.QATSchedule(model, 100_000, cfg)
        sched.load_state_dict({"step_count": 50_000, "total_steps": 100_000})
    opt = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
    fwd = torch.compile(model) if compiled else model

    def step():
        ctx = oscqat.use_backend(backend) if backend else _null()
        with ctx:
            loss = F.cross_entropy(fwd(x), y)
            if sched is not None and sched.lam > 0:
                loss = loss + sched.lam * oscqat.dampening_loss(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()
        return loss
    return step


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
