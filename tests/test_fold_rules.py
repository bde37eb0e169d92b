"""One rule for which BatchNorms are folded (oscqat/nn/fold.py, `foldable_bn`), used by `oscqat.fold_bn` and
`oscqat.convert(fold_bn=True)`: exact types only. A BatchNorm subclass may carry an activation (timm's
BatchNormAct2d); replacing it by nn.Identity would drop that activation, so neither fold touches it. And two
rules of docs/semantics.md, "Folding BatchNorm", fast: a folded scale below scale_min is an error, and a per-tensor
scale becomes per channel with the LSQ gradient scale of the per-channel count."""
import copy
import math

import pytest
import torch
from torch import nn

import oscqat
from oscqat.nn.fold import foldable_bn


class BNReLU(nn.BatchNorm2d):
    """A BatchNorm with an activation inside, as timm's BatchNormAct2d."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class Net(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), bn(6))
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(self.block(x))


def _prepared(bn, **cfg):
    torch.manual_seed(0)
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    model = oscqat.prepare(Net(bn), oscqat.QATConfig(4, 4, first_last_bits=None, **cfg), calib_data=data,
                           verbose=False)
    with torch.no_grad():                       # statistics worth folding: a shift that makes the ReLU matter
        model.block[1].running_mean.uniform_(-0.5, 0.5)
        model.block[1].running_var.uniform_(0.5, 2.0)
    return model.eval(), torch.cat(data)


def test_foldable_bn_is_by_exact_type():
    assert foldable_bn(nn.BatchNorm1d(3)) and foldable_bn(nn.BatchNorm2d(3)) and foldable_bn(nn.BatchNorm3d(3))
    assert foldable_bn(nn.SyncBatchNorm(3))
    assert not foldable_bn(BNReLU(3)) and not foldable_bn(nn.LayerNorm(3)) and not foldable_bn(nn.Identity())


def test_convert_keeps_a_batchnorm_subclass_with_an_activation():
    model, x = _prepared(BNReLU)
    with torch.no_grad():
        want = model(x)
        assert (model.block(x) == 0).any()      # the ReLU inside the BatchNorm does something here
    plain = oscqat.convert(model)
    folded = oscqat.convert(model, fold_bn=True)
    assert type(folded.block[1]) is BNReLU
    with torch.no_grad():
        assert torch.equal(folded.eval()(x), plain.eval()(x))
        assert torch.equal(plain(x), want)


def test_fold_bn_keeps_a_batchnorm_subclass_with_an_activation():
    model, x = _prepared(BNReLU)
    with torch.no_grad():
        want = model(x)
    assert oscqat.fold_bn(model) == []
    assert type(model.block[1]) is BNReLU
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_both_folds_take_the_plain_batchnorm():
    model, _ = _prepared(nn.BatchNorm2d)
    assert isinstance(oscqat.convert(model, fold_bn=True).block[1], nn.Identity)
    assert oscqat.fold_bn(copy.deepcopy(model)) == [("block.0", "block.1")]


# ---------------------------------------------------------------- docs/semantics.md, "Folding BatchNorm"
def test_fold_bn_refuses_a_scale_below_the_floor():
    """s'[c] = s[c] * |k[c]| below scale_min is an error naming both layers and the channel; nothing is folded."""
    model, x = _prepared(nn.BatchNorm2d)
    with torch.no_grad():
        model.block[1].weight[4] = 1e-9          # k[4] ~ 1e-9: s * |k| ~ 1e-10, far below 1e-6
        want = model(x)
    with pytest.raises(ValueError, match=r"folding block\.1 into block\.0 would take the weight scale of channel 4 "
                                         r"to .*, below scale_min=1e-06"):
        oscqat.fold_bn(model)
    assert type(model.block[1]) is nn.BatchNorm2d
    with torch.no_grad():
        assert torch.equal(model(x), want)


@pytest.mark.parametrize("lsq_grad_scale", [True, False])
def test_fold_bn_makes_a_per_tensor_scale_per_channel_with_its_gradient_scale(lsq_grad_scale):
    """A per-tensor scale becomes per channel, s'[c] = s * |k[c]|, and the LSQ gradient scale follows the
    per-channel count, 1 / sqrt(N_c * p) with N_c = 3 * 3 * 3 (1 / sqrt(N * p) before); 1 stays 1 when the LSQ
    gradient scale is off."""
    model, _ = _prepared(nn.BatchNorm2d, lsq_grad_scale=lsq_grad_scale)
    q, bn = model.block[0].weight_quant, model.block[1]
    assert not q.per_channel and q.scale.shape == (1,)
    assert q.grad_scale == (1 / math.sqrt(6 * 27 * 7) if lsq_grad_scale else 1.0)
    k = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    want = (q.scale.detach().double() * k.abs()).float()
    oscqat.fold_bn(model)
    assert q.per_channel and q.scale.shape == (6,) and torch.equal(q.scale.detach(), want)
    assert q.grad_scale == pytest.approx(1 / math.sqrt(27 * 7) if lsq_grad_scale else 1.0, rel=1e-12)
