"""Multi-step parity: a small model trained with freezing and dampening on each fused backend ends with the
same integer weights and oscillation states as with the reference backend."""
import pytest
import torch

import oscqat
from oscqat import backend
from training import make_opt, qat_model, train_steps

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 30


def run(name):
    with oscqat.use_backend(name):
        model, x = qat_model(method="dampen+freeze")
        model.to(DEVICE)
        sched = oscqat.QATSchedule(model, STEPS)
        train_steps(model, make_opt(model), sched, x.to(DEVICE), STEPS)
        return {n: (q.int_weight(model.get_submodule(n.rpartition(".")[0]).weight), q.prev_int, q.flags, q.freq,
                    q.ema) for n, q in model.named_modules() if isinstance(q, oscqat.WeightQuantizer)}


@pytest.fixture(scope="module")
def reference():
    return run("torch")


@pytest.mark.parametrize("name", ["triton", "cpp", "cuda"])
def test_training_ends_with_identical_integers_and_states(name, reference):
    if not backend.available(name, DEVICE):
        pytest.skip(f"backend {name!r} cannot run on {DEVICE} here")
    got = run(name)
    frozen = sum(int((f.int() >= 3).sum()) for _, _, f, _, _ in reference.values() if f is not None)
    assert frozen > 0, "the run must freeze some weights to test freezing"
    for layer, ref_vals in reference.items():
        for what, a, b in zip(("int weight", "prev_int", "flags", "freq", "ema"), got[layer], ref_vals):
            if b is None:
                continue
            assert torch.equal(a.cpu(), b.cpu()), f"{layer}: {what} differs on backend {name}"
