"""TransitionRateSchedule: schedule the transition rate (TR) of the quantized weights instead of a learning rate,
and steer the latent weights with a transition-adaptive learning rate (TALR) so that the measured TR follows it
(after Lee, Jeon, Kim & Ham, *Scheduling Weight Transitions for Quantization-Aware Training*).

    opt  = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    talr = oscqat.TransitionRateSchedule(model, opt, total_steps, tr_start=1e-2, tr_end=1e-4)
    for x, y in loader:
        F.cross_entropy(model(x), y).backward(); opt.step(); opt.zero_grad(); talr.step()

The measured rate is read from the counts the tracked forward already produced (`WeightQuantizer.last_counts`),
the controller runs on 0-d device tensors, and the multiplier reaches the optimizer as the tensor `lr` of the
param group(s) holding the tracked latent weights: `step()` never synchronises with the device.
Semantics: docs/semantics.md, "Transition-rate scheduling (TR + TALR)"."""
from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from ..nn.layers import _QuantLayer, weight_quantizers
from ..nn.wrappers import prepared
from ..ops.reference import uninitialised

SCHEDULES = ("cosine", "linear", "step")
RULES = ("multiplicative", "additive")
REL_ERR_CLIP = 4.0     # multiplicative rule: (k - TR) / k is clipped to [-4, 1]; 1 is its maximum (TR = 0)


def target_rate(step: int, total: int, start: float, end: float, schedule: str = "cosine",
                milestones: tuple[float, ...] = (1 / 3, 2 / 3)) -> float:
    """The target transition rate k_t at step `t` of `total` (host float).

    cosine: end + (start - end) * (1 + cos(pi u)) / 2; linear: start + (end - start) * u, with u = t / total
    clamped to [0, 1]; step: start * (end / start) ** (i / len(milestones)), i = milestones (fractions of
    `total`) passed, so it reaches `end` after the last one."""
    u = min(1.0, max(0.0, step / total)) if total > 0 else 1.0
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * u))
    if schedule == "linear":
        return start + (end - start) * u
    if schedule == "step":
        passed = sum(u >= m for m in milestones)
        if start <= 0 or end <= 0:
            return start if passed < len(milestones) else end
        return start * (end / start) ** (passed / len(milestones))
    raise ValueError(f"target_rate: schedule must be one of {SCHEDULES}, got {schedule!r}")


def _foreach_on(group: dict, device: torch.device) -> bool:
    foreach = group.get("foreach")
    return device.type != "cpu" if foreach is None else bool(foreach)


class TransitionRateSchedule:
    """Transition-rate scheduling with a transition-adaptive learning rate. Step once per optimizer step,
    after `optimizer.step()` (and after any LR scheduler's step).

    model: a model prepared by `oscqat.prepare`; TR is measured over its tracked weight quantizers
        (`q.tracking`: layers at <= `track_max_bits`, so not the 8-bit first/last layers).
    optimizer: any torch optimizer holding the latent weights of those layers. Their latent weights are moved
        out of their param groups into groups of their own (hyper-parameters copied, optimizer state kept, the
        original groups left in place, possibly empty, the new ones appended), whose `lr` is a 0-d device
        tensor = base lr * mu, base lr = the group's lr now. Everything else keeps the user's LR.
    total_steps: optimizer steps over which the target goes from `tr_start` to `tr_end` (`schedule`).
    rule: "multiplicative" (default) mu <- clip(mu * exp(gamma * clip((k - TR) / k, -4, 1)), mu_min, mu_max);
        "additive" mu <- clip(mu + gamma * (k - TR), mu_min, mu_max).
    per_layer: one mu per tracked layer, driven by the layer's own TR, instead of one global mu.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int,
                 tr_start: float = 1e-2, tr_end: float = 1e-3, schedule: str = "cosine",
                 rule: str = "multiplicative", gamma: float | None = None, mu_init: float = 1.0,
                 mu_min: float | None = None, mu_max: float = 10.0, per_layer: bool = False,
                 feedforward: bool = True, milestones: tuple[float, ...] = (1 / 3, 2 / 3)):
        who = "TransitionRateSchedule"
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"{who}: total_steps must be a positive integer, got {total_steps!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"{who}: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if rule not in RULES:
            raise ValueError(f"{who}: rule must be one of {RULES}, got {rule!r}")
        lo = 0.0 if rule == "additive" else 1e-12
        for name, v in (("tr_start", tr_start), ("tr_end", tr_end)):
            if not (isinstance(v, (int, float)) and lo <= v <= 1.0 and (rule == "additive" or v > 0)):
                raise ValueError(f"{who}: {name} must be a fraction in {'[0, 1]' if rule == 'additive' else '(0, 1]'}"
                                 f" for rule {rule!r}, got {v!r}")
        if gamma is None:
            if rule == "additive":
                raise ValueError(f"{who}: the additive rule's gain is in units of mu per unit of TR and depends on "
                                 f"how TR grows with the learning rate in your model; pass gamma explicitly")
            gamma = 0.1
        mu_min = (1e-4 if rule == "multiplicative" else 0.0) if mu_min is None else mu_min
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"{who}: gamma must be positive and finite, got {gamma!r}")
        if not (0.0 <= mu_min <= mu_init <= mu_max and math.isfinite(mu_max)) or (rule == "multiplicative"
                                                                                     and mu_min <= 0):
            raise ValueError(f"{who}: need 0 <= mu_min <= mu_init <= mu_max < inf (mu_min > 0 for the "
                             f"multiplicative rule), got mu_min={mu_min!r}, mu_init={mu_init!r}, mu_max={mu_max!r}")
        model = prepared(model, who)
        self.model, self.optimizer, self.total_steps = model, optimizer, total_steps
        self.tr_start, self.tr_end, self.schedule, self.milestones = float(tr_start), float(tr_end), schedule, \
            tuple(milestones)
        self.rule, self.gamma, self.mu_min, self.mu_max, self.per_layer = rule, float(gamma), float(mu_min), \
            float(mu_max), bool(per_layer)
        self.feedforward = bool(feedforward) and rule == "multiplicative"
        self.step_count = 0

        # the tracked layers whose latent weight the optimizer holds
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        tracked = [(name, m) for name, m in model.named_modules()
                   if isinstance(m, _QuantLayer) and m.weight_quant.tracking]
        if not tracked:
            raise ValueError(f"{who}: the model has no tracked weight quantizer (prepare it with oscqat.prepare "
                             f"and a config with track=True and weight_bits <= track_max_bits)")
        self.layer_names = [name for name, m in tracked if id(m.weight) in in_opt]
        missing = [name for name, m in tracked if id(m.weight) not in in_opt]
        if not self.layer_names:
            raise ValueError(f"{who}: the optimizer holds none of the tracked latent weights "
                             f"({', '.join(n for n, _ in tracked[:3])}, ...); pass the model's parameters to it")
        self.untracked_by_optimizer = missing      # tracked layers left out of TR: their weights are not optimized
        layers = [m for name, m in tracked if id(m.weight) in in_opt]
        self._quantizers = [m.weight_quant for m in layers]
        self._numel = [m.weight.numel() for m in layers]
        device = layers[0].weight.device
        self.device = device

        # split the groups: latent weights of tracked layers -> TALR groups appended at the end
        index = {id(m.weight): i for i, m in enumerate(layers)}
        new_groups, base, gidx = [], [], []
        for g in optimizer.param_groups:
            keep, moved = [], {}
            for p in g["params"]:
                li = index.get(id(p))
                if li is None:
                    keep.append(p)
                else:
                    moved.setdefault(li if self.per_layer else 0, []).append(p)
            if not moved:
                continue
            lr = g["lr"]
            lr = float(lr.detach().cpu()) if isinstance(lr, torch.Tensor) else float(lr)   # construction only
            if "capturable" in g and not g["capturable"] and not g.get("fused") and _foreach_on(g, device):
                raise ValueError(f"{who}: {type(optimizer).__name__} with foreach and capturable=False cannot take "
                                 f"the tensor learning rate TALR needs; construct it with capturable=True or "
                                 f"fused=True (no host sync), or foreach=False")
            g["params"] = keep
            for mi in sorted(moved):
                ng = {k: v for k, v in g.items() if k not in ("params", "param_names")}
                ng["params"] = moved[mi]
                new_groups.append(ng)
                base.append(lr)
                gidx.append(mi)
        self._group_pos = list(range(len(optimizer.param_groups), len(optimizer.param_groups) + len(new_groups)))
        optimizer.param_groups.extend(new_groups)
        self._masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.base_lrs = base
        n_mu = len(layers) if self.per_layer else 1
        f32 = dict(device=device, dtype=torch.float32)
        self._mu = torch.full((n_mu,), float(mu_init), **f32)
        self._base = torch.tensor(base, **f32)
        self._gidx = torch.tensor(gidx, device=device, dtype=torch.long)
        self._lr_vec = torch.empty(len(new_groups), **f32)
        self._lr_views = [self._lr_vec[i] for i in range(len(new_groups))]
        self._numel_t = torch.tensor(self._numel, **f32)
        self._rates = torch.zeros(len(layers), **f32)
        self._rate = torch.zeros((), **f32)
        self._update_lr()
        self._bind()
        ref = weakref.ref(self)
        optimizer.register_load_state_dict_post_hook(lambda opt: ref() is not None and ref()._bind())

        # the counts of a quantizer's first tracked forward (initialisation) are not a measurement
        with torch.no_grad():
            uninit = torch.stack([uninitialised(q.flags).all() for q in self._quantizers]).tolist()  # one sync, here
        self._init_pending = [bool(u) for u in uninit]
        self._seen = [q.last_counts for q in self._quantizers]
        self._to_arm = weight_quantizers(model)     # all of them, as arm_tracking(model), without the module walk
        self._arm()

    # ---------------------------------------------------------------- views
    @property
    def target(self) -> float:
        """k_t for the forward measured at the next `step()` (host float)."""
        return target_rate(self.step_count, self.total_steps, self.tr_start, self.tr_end, self.schedule,
                           self.milestones)

    @property
    def last_target(self) -> float:
        """k_t of the last `step()` (what `last_rate` is compared with)."""
        return target_rate(max(0, self.step_count - 1), self.total_steps, self.tr_start, self.tr_end, self.schedule,
                           self.milestones)

    @property
    def last_rate(self) -> torch.Tensor:
        """TR of the last measured tracked forward over all tracked layers (0-d fp32 device tensor)."""
        return self._rate

    @property
    def last_rates(self) -> torch.Tensor:
        """Per tracked layer TR of the last measured forward ([L] fp32 device tensor, `layer_names` order)."""
        return self._rates

    @property
    def mu(self) -> torch.Tensor:
        """The TALR multiplier: 0-d (global) or [L] (per_layer) fp32 device tensor."""
        return self._mu[0] if not self.per_layer else self._mu

    @property
    def lr(self) -> torch.Tensor:
        """The learning rate the optimizer applies to the tracked latent weights (base lr * mu): 0-d when there is
        one TALR group, else one value per TALR group ([G], in `optimizer.param_groups[-G:]` order)."""
        return self._lr_views[0] if len(self._lr_views) == 1 else self._lr_vec

    # ---------------------------------------------------------------- internals
    def _update_lr(self) -> None:
        torch.mul(self._base, self._mu.index_select(0, self._gidx), out=self._lr_vec)

    def _arm(self) -> None:
        for q in self._to_arm:
            q.arm()

    def _bind(self) -> None:
        """Point the TALR groups' lr at our tensors (again after optimizer.load_state_dict replaced them)."""
        groups = self.optimizer.param_groups
        for pos, v in zip(self._group_pos, self._lr_views):
            if groups[pos]["lr"] is not v:
                groups[pos]["lr"] = v

    @torch.no_grad()
    def step(self) -> None:
        """Read this step's tracked counts, update mu and the TALR, arm the next tracked forward. No host sync."""
        fresh = []
        for i, q in enumerate(self._quantizers):
            c = q.last_counts
            if c is not self._seen[i]:          # a tracked forward ran since the last step (host identity)
                self._seen[i] = c
                if self._init_pending[i]:
                    self._init_pending[i] = False
                else:
                    fresh.append(i)
        if fresh:
            self._control(fresh, self.target)
        else:
            self._update_lr()       # undo what an LR scheduler may have written into the TALR groups' lr
        self.step_count += 1
        self._bind()
        self._arm()

    def _control(self, fresh: list[int], k: float) -> None:
        qs = self._quantizers
        switched = torch.stack([qs[i].last_counts for i in fresh])[:, 0].to(torch.float32)
        total = float(sum(self._numel[i] for i in fresh))
        torch.div(switched.sum(), total, out=self._rate)
        partial = len(fresh) != len(qs)
        if not partial:
            torch.div(switched, self._numel_t, out=self._rates)
        else:      # some layer ran no tracked forward: its rate is kept, its mu left alone
            idx, keep = self._partial(tuple(fresh))
            self._rates.index_copy_(0, idx, switched / self._numel_t.index_select(0, idx))
        if self.per_layer:
            err = k - self._rates
            if partial:
                err = torch.where(keep, err, torch.zeros_like(err))
        else:
            err = (k - self._rate).reshape(1)
        if self.rule == "multiplicative":
            ff = self._feedforward()
            self._mu.mul_(torch.exp(err.div(k).clamp_(-REL_ERR_CLIP, 1.0).mul_(self.gamma).add_(math.log(ff))))
        else:
            self._mu.add_(err, alpha=self.gamma)
        self._mu.clamp_(self.mu_min, self.mu_max)
        self._update_lr()

    def _feedforward(self) -> float:
        # mu set now drives the next optimizer step, measured against the target two steps ahead; TR ~ lr while
        # latent weights diffuse, so follow the schedule's own change of the target (host floats, no sync)
        if not self.feedforward:
            return 1.0
        t = self.step_count
        k1 = target_rate(t + 1, self.total_steps, self.tr_start, self.tr_end, self.schedule, self.milestones)
        k2 = target_rate(t + 2, self.total_steps, self.tr_start, self.tr_end, self.schedule, self.milestones)
        return k2 / k1 if k1 > 0 and k2 > 0 else 1.0

    def _partial(self, fresh: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        # index and mask of a subset of layers, built once per subset (a host-to-device copy the first time)
        if fresh not in self._masks:
            keep = torch.zeros(len(self._quantizers), dtype=torch.bool)
            keep[list(fresh)] = True
            self._masks[fresh] = (torch.tensor(fresh, dtype=torch.long).to(self.device), keep.to(self.device))
        return self._masks[fresh]

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps, "mu": self._mu.clone(),
                "rates": self._rates.clone(), "rate": self._rate.clone(), "base_lrs": list(self.base_lrs),
                "init_pending": list(self._init_pending), "layer_names": list(self.layer_names),
                "rule": self.rule, "per_layer": self.per_layer}

    def load_state_dict(self, state: dict) -> None:
        who = "TransitionRateSchedule.load_state_dict"
        if list(state["layer_names"]) != self.layer_names or bool(state["per_layer"]) != self.per_layer:
            raise ValueError(f"{who}: the checkpoint was taken on other tracked layers or per_layer setting "
                             f"({len(state['layer_names'])} layers, per_layer={state['per_layer']}); this schedule "
                             f"has {len(self.layer_names)} layers, per_layer={self.per_layer}")
        if len(state["base_lrs"]) != len(self.base_lrs):
            raise ValueError(f"{who}: the checkpoint has {len(state['base_lrs'])} TALR groups, this schedule "
                             f"{len(self.base_lrs)}")
        self.step_count = int(state["step_count"])
        self.total_steps = int(state["total_steps"])
        self.base_lrs = [float(b) for b in state["base_lrs"]]
        self._base.copy_(torch.tensor(self.base_lrs, dtype=torch.float32))
        self._mu.copy_(state["mu"])
        self._rates.copy_(state["rates"])
        self._rate.copy_(state["rate"])
        self._init_pending = [bool(b) for b in state["init_pending"]]
        self._seen = [q.last_counts for q in self._quantizers]
        self._update_lr()
        self._bind()
        self._arm()
