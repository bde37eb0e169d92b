"""The fake implementations (oscqat/ops/fakes.py, one per op, registered for both op namespaces) against the real
ops: `torch.library.opcheck` runs each op for real and on FakeTensors and compares every output's shape, dtype and
strides, and checks the schema (mutated arguments declared). Mixed dtypes are where a fake goes wrong: a gradient
in bf16 for an fp32 tensor must come back in bf16 (the reference's rule, docs/semantics.md)."""
import pytest
import torch

import oscqat  # noqa: F401  (registers torch.ops.oscqat)
from oscqat.ops import backends

UNINIT = -128
CHECKS = ("test_schema", "test_faketensor")


def _namespaces():
    """(op namespace, backend argument): the Python ops on every backend that runs CPU tensors here, and the C++
    extension's own ops (`oscqat_C`, no backend argument) where it was built."""
    out = [("oscqat", b) for b in ("torch", "cpp", "triton") if backends.available(b, "cpu")]
    return out + ([("oscqat_C", None)] if backends.available("cpp", "cpu") else [])


def _weight_args(shape, channels, dtype, g_dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g).to(dtype)
    s = torch.rand(channels, generator=g) * 0.1 + 0.05
    flags = torch.full(shape, UNINIT, dtype=torch.int8)
    flags.view(-1)[::3] = 8                                            # some frozen (fz = 2), last_dir 0
    ema = torch.randint(-4, 4, shape, generator=g).float()
    prev, freq = torch.zeros(shape, dtype=torch.int8), torch.zeros(shape)
    return dict(w=w, s=s, flags=flags, ema=ema, prev=prev, freq=freq, g=torch.randn(shape, generator=g).to(g_dtype))


@pytest.mark.parametrize("ns,backend", _namespaces())
@pytest.mark.parametrize("dtype,g_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("shape,channels", [((6, 5), 1), ((4, 1, 3, 3), 4)])
def test_weight_op_fakes_match_the_ops(ns, backend, dtype, g_dtype, shape, channels):
    ops = getattr(torch.ops, ns)
    extra = () if backend is None else (backend,)
    a = _weight_args(shape, channels, dtype, g_dtype)
    n, p, fth, gd = -4, 3, torch.tensor(0.02), torch.tensor(1.0)
    torch.library.opcheck(ops.weight_fwd, (a["w"], a["s"], a["flags"], a["ema"], n, p, True, 1.0) + extra,
                          test_utils=CHECKS)
    torch.library.opcheck(ops.weight_fwd_track, (a["w"], a["s"], a["prev"], a["flags"], a["freq"], a["ema"], fth, n,
                                                 p, 0.01, True, 1.0) + extra, test_utils=CHECKS)
    torch.library.opcheck(ops.weight_bwd, (a["g"], a["w"], a["s"], a["flags"], a["ema"], gd, n, p, 0.5, True, 1.0,
                                           True) + extra, test_utils=CHECKS)


@pytest.mark.parametrize("ns,backend", _namespaces())
@pytest.mark.parametrize("dtype,g_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("offset", [False, True])
def test_activation_op_fakes_match_the_ops(ns, backend, dtype, g_dtype, offset):
    ops = getattr(torch.ops, ns)
    extra = () if backend is None else (backend,)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, generator=g).to(dtype)
    s, o = torch.tensor([0.05]), (torch.tensor([-0.1]) if offset else None)
    gx = torch.randn(2, 3, 4, 4, generator=g).to(g_dtype)
    torch.library.opcheck(ops.act_fwd, (x, s, o, 0, 15) + extra, test_utils=CHECKS)
    torch.library.opcheck(ops.act_bwd, (gx, x, s, o, 0, 15, 0.5) + extra, test_utils=CHECKS)
