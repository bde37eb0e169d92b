"""Loading a checkpoint validates the tracking state's values (oscqat/nn/state_check.py, docs/semantics.md "The flag
encoding"): a flags value no run writes, a frozen integer off the grid or not an integer, a freq outside [0, 1] or
NaN, a non-finite ema are refused, naming the state-dict key, the index and the value, and nothing is loaded."""
import math

import pytest
import torch

import oscqat


def _trained():
    """A 4-bit QuantLinear after two tracked steps, with some weights frozen (flags 4 and 7, integer ema)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(oscqat.QuantLinear(6, 4, weight_bits=4, act_bits=8, name="fc"))
    q = model[0].weight_quant
    assert q.tracking
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(3, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        q.flags[0, :2] = torch.tensor([4, 7], dtype=torch.int8)
        q.ema[0, :2] = torch.tensor([-8.0, 7.0])
    return model


def _state(model):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}


def test_a_trained_state_loads_and_round_trips():
    model = _trained()
    sd = _state(model)
    fresh = torch.nn.Sequential(oscqat.QuantLinear(6, 4, weight_bits=4, act_bits=8, name="fc"))
    fresh.load_state_dict(sd)
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v) if isinstance(v, torch.Tensor) else fresh.state_dict()[k] == v, k
    # a fresh quantizer's state (flags -128, zeros) loads too
    model.load_state_dict(torch.nn.Sequential(oscqat.QuantLinear(6, 4, weight_bits=4, act_bits=8)).state_dict())


BAD = [
    # (state key, index, value, message)
    ("flags", (1, 2), 2, r"flags must be -128 \(uninitialised\) or last_dir \+ 4 \* fz.*got 2 at index \(1, 2\)"),
    ("flags", (3, 5), -5, r"got -5 at index \(3, 5\)"),
    ("flags", (0, 3), -127, r"got -127 at index \(0, 3\)"),
    ("flags", (2, 0), 127, r"got 127 at index \(2, 0\)"),
    ("flags", (2, 1), 10, r"got 10 at index \(2, 1\)"),
    ("freq", (1, 1), math.nan, r"freq \(an EMA of oscillations\) must lie in \[0, 1\], got nan at index \(1, 1\)"),
    ("freq", (0, 4), 1.5, r"got 1.5 at index \(0, 4\)"),
    ("freq", (3, 3), -0.25, r"got -0.25 at index \(3, 3\)"),
    ("ema", (2, 2), math.inf, r"ema must be finite, got inf at index \(2, 2\)"),
    ("ema", (1, 3), -math.nan, r"ema must be finite, got nan at index \(1, 3\)"),
    ("ema", (0, 0), 8.0, r"frozen integer, which must be an integer in the grid \[-8, 7\], got 8.0 at index \(0, 0\)"),
    ("ema", (0, 1), -9.0, r"\[-8, 7\], got -9.0 at index \(0, 1\)"),
    ("ema", (0, 1), 2.5, r"\[-8, 7\], got 2.5 at index \(0, 1\)"),
]


@pytest.mark.parametrize("key,index,value,message", BAD)
def test_invalid_state_is_refused_naming_the_layer_index_and_value(key, index, value, message):
    model = _trained()
    before = _state(model)
    sd = _state(model)
    t = sd[f"0.weight_quant.{key}"]
    t[index] = value
    with pytest.raises(oscqat.InvalidStateError, match=rf"fc.weight: refusing to load '0.weight_quant.{key}': .*"
                                                       rf"{message}"):
        model.load_state_dict(sd)
    for k, v in before.items():             # refused before anything was copied
        if isinstance(v, torch.Tensor):
            assert torch.equal(model.state_dict()[k], v), k


def test_partial_load_checks_against_the_quantizer_own_state():
    """flags alone (strict=False) that freeze a weight whose own ema slot holds no integer are refused; ema alone
    that puts a non-integer into a weight the quantizer's own flags say is frozen, too."""
    model = _trained()
    q = model[0].weight_quant
    flags = q.flags.clone()
    flags[1, 1] = 4
    with torch.no_grad():
        q.ema[1, 1] = 0.3
    with pytest.raises(oscqat.InvalidStateError, match=r"'0.weight_quant.ema'.*got 0.3\d* at index \(1, 1\)"):
        model.load_state_dict({"0.weight_quant.flags": flags}, strict=False)
    ema = q.ema.clone()
    ema[0, 0] = 0.5                        # flags[0, 0] = 4: frozen
    with pytest.raises(oscqat.InvalidStateError, match=r"got 0.5 at index \(0, 0\)"):
        model.load_state_dict({"0.weight_quant.ema": ema}, strict=False)
    # non-frozen weights' ema may be any finite value (after fold_bn it can lie one step outside the grid)
    ema[0, 0] = -8.0
    ema[1, 2] = 123.25
    model.load_state_dict({"0.weight_quant.ema": ema}, strict=False)
    assert q.ema[1, 2].item() == 123.25


def test_error_type_is_a_value_error():
    assert issubclass(oscqat.InvalidStateError, ValueError)


def test_the_first_offending_index_is_named_and_a_1d_index_is_a_number():
    """With several bad values the first, in row-major order, is named; the index of a 1-D state is one number."""
    model = _trained()
    sd = _state(model)
    sd["0.weight_quant.flags"][2, 3] = 6
    sd["0.weight_quant.flags"][1, 4] = 2
    with pytest.raises(oscqat.InvalidStateError, match=r"got 2 at index \(1, 4\)"):
        model.load_state_dict(sd)
    q = oscqat.WeightQuantizer((5,), 4, name="v")
    sd = q.state_dict()
    sd["freq"][3] = 2.0
    with pytest.raises(oscqat.InvalidStateError, match=r"^v: refusing to load 'freq': .*, got 2.0 at index 3 \("):
        q.load_state_dict(sd)


def test_freq_at_the_ends_of_its_range_loads():
    """freq is an EMA of a 0/1 indicator: 0 and 1 themselves are valid (a weight that oscillates at every tracked
    step keeps freq = 1 exactly: fp32(om * 1) + m rounds to 1 at m = 0.5)."""
    model = _trained()
    sd = _state(model)
    sd["0.weight_quant.freq"][0, 0] = 1.0
    sd["0.weight_quant.freq"][0, 1] = 0.0
    model.load_state_dict(sd)
    assert model[0].weight_quant.freq[0, :2].tolist() == [1.0, 0.0]


def test_an_untracked_quantizer_does_not_read_a_tracked_state():
    """An 8-bit (untracked) quantizer has no state: a tracked checkpoint's state keys are unexpected keys (refused
    by a strict load, ignored by strict=False), never read or checked."""
    sd = {"0.weight_quant.flags": _state(_trained())["0.weight_quant.flags"]}
    untracked = torch.nn.Sequential(oscqat.QuantLinear(6, 4, weight_bits=8, act_bits=8, name="fc"))
    assert not untracked[0].weight_quant.tracking
    assert untracked.load_state_dict(sd, strict=False).unexpected_keys == ["0.weight_quant.flags"]


def test_a_model_on_the_meta_device_loads_without_checks():
    """A model built on the meta device (materialised later) has no values to check against: a meta state dict
    loads, and so does part of a real one (which torch copies into meta tensors as a no-op, and says so)."""
    with torch.device("meta"):
        model = torch.nn.Sequential(oscqat.QuantLinear(6, 4, weight_bits=4, act_bits=8, name="fc"))
    model.load_state_dict(model.state_dict())
    flags = _state(_trained())["0.weight_quant.flags"]
    with pytest.warns(UserWarning, match="no-op"):
        model.load_state_dict({"0.weight_quant.flags": flags}, strict=False)
