"""Multi-step parity: a small model trained with freezing and dampening on each fused backend ends with the
same integer weights and oscillation states as with the reference backend."""
import functools

import pytest
import torch

import oscqat
from oscqat.ops import backends as backend
from helpers.training import make_opt, qat_model, train_steps

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton on CPU runs in its interpreter, ~20x slower than the reference: fewer steps there.
STEPS = {"triton": 30 if DEVICE == "cuda" else 8}


def run(name, steps):
    with oscqat.use_backend(name):
        model, x = qat_model(method="dampen+freeze")
        model.to(DEVICE)
        sched = oscqat.QATSchedule(model, steps)
        train_steps(model, make_opt(model), sched, x.to(DEVICE), steps)
        return {n: (q.int_weight(model.get_submodule(n.rpartition(".")[0]).weight), q.prev_int, q.flags, q.freq,
                    q.ema) for n, q in model.named_modules() if isinstance(q, oscqat.WeightQuantizer)}


@functools.lru_cache(maxsize=None)
def reference(steps):
    return run("torch", steps)


@pytest.mark.parametrize("name", ["triton", "cpp", "cuda"])
def test_training_ends_with_identical_integers_and_states(name):
    if not backend.available(name, DEVICE):
        pytest.skip(f"backend {name!r} cannot run on {DEVICE} here")
    steps = STEPS.get(name, 30)
    expected = reference(steps)
    got = run(name, steps)
    frozen = sum(int((f.int() >= 3).sum()) for _, _, f, _, _ in expected.values() if f is not None)
    assert frozen > 0, "the run must freeze some weights to test freezing"
    for layer, ref_vals in expected.items():
        for what, a, b in zip(("int weight", "prev_int", "flags", "freq", "ema"), got[layer], ref_vals):
            if b is None:
                continue
            assert torch.equal(a.cpu(), b.cpu()), f"{layer}: {what} differs on backend {name} after {steps} steps"
