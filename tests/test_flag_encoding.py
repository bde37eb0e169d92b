"""The flag encoding (docs/semantics.md, "The flag encoding"): every one of the 256 int8 values of `flags`, through
every backend (the `torch` reference, `cpp`, `triton` (its interpreter without a GPU), `cuda` where there is a
GPU), gives the same integers, w_hat, counts, states and dL/dw; and the reference decodes each value as the rule
says. Before the rule was pinned, the Triton kernels took -127..-2 for "uninitialised" and the others for 0."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from helpers import parity as P
from oscqat.ops import backends as backend
from oscqat.ops import reference as ref

ALL = torch.arange(-128, 128, dtype=torch.int32)
WRITTEN = {-128: (0, 0), -1: (0, -1), 0: (0, 0), 1: (0, 1), 3: (1, -1), 4: (1, 0), 5: (1, 1), 7: (2, -1),
           8: (2, 0), 9: (2, 1)}          # flags: (fz, last_dir), the table of docs/semantics.md
TRITON_DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [("cpp", "cpu"), ("triton", TRITON_DEV), ("cuda", "cuda")]


def test_reference_decodes_every_value_by_the_rule():
    flags = ALL.to(torch.int8)
    fz, last_dir = ref.decode_flags(flags)
    uninit = ref.uninitialised(flags)
    assert fz.dtype == last_dir.dtype == torch.int32
    assert set(ref.WRITTEN_FLAGS) == set(WRITTEN)
    for f, z, d, u in zip(ALL.tolist(), fz.tolist(), last_dir.tolist(), uninit.tolist()):
        assert u == (f == -128), f
        if f in WRITTEN:
            assert (z, d) == WRITTEN[f], f
        elif f < -1:
            assert (z, d) == (0, 0), f                  # -127..-2: decoded as 0, initialised
        else:                                            # f = last_dir + 4 fz with last_dir in [-1, 2]
            assert z >= 0 and -1 <= d <= 2 and d + 4 * z == f, f
    # what the other values mean to the kernels: -127..-2 are not frozen; 2 mod 4 gives last_dir 2; 10.. frozen
    assert not bool(((fz >= 1) & (ALL < -1)).any())
    assert ((last_dir == 2) == ((ALL >= 2) & (ALL % 4 == 2))).all()
    assert ((fz >= 1) == (ALL >= 3)).all() and ((fz == 1) == ((ALL >= 3) & (ALL <= 6))).all()


def _all_flags_case(seed: int, channels: int, dtype, device: str):
    """Eight weights per flag value (2048, per tensor or 16 channels), shuffled, in a mid-training state in which
    weights change, oscillate and freeze (f_th below the freq an oscillation gives at momentum 0.3)."""
    shape = (16, 128)
    c = P.make_weight_case(seed, shape, channels, 4, dtype, frozen_frac=0.5, f_th=0.02, device="cpu")
    gen = torch.Generator().manual_seed(seed + 1)
    flags = ALL.repeat_interleave(8)[torch.randperm(ALL.numel() * 8, generator=gen)].reshape(shape)
    frozen = ref.decode_flags(flags.to(torch.int8))[0] >= 1
    c["flags"] = flags.to(torch.int8)
    c["ema"] = torch.where(frozen, torch.round(c["ema"]), c["ema"])   # a frozen weight's slot holds an integer
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in c.items()}


@pytest.mark.parametrize("name,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 16])
def test_every_flag_value_gives_the_same_results_on_every_backend(name, device, dtype, channels):
    if not backend.available(name, device):
        pytest.skip(f"the {name} backend cannot run {device} tensors here")
    impl = backend.load(name)
    for seed, (damp, momentum) in enumerate([(False, 0.3), (True, 0.01)]):
        c = _all_flags_case(seed, channels, dtype, device)
        # untracked and tracked forward, both backwards (tests/helpers/parity.py); then a second tracked step from the
        # state the first one wrote (re-encoded: only last_dir = 2, from 2 mod 4, survives of the unwritten values)
        state = P.check_weight(impl, c, damp=damp, momentum=momentum)
        P.check_weight(impl, dict(c, **state), damp=damp, momentum=momentum)
