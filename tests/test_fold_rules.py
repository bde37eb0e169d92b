"""One rule for which BatchNorms are folded (oscqat/fold.py, `foldable_bn`), used by `oscqat.fold_bn` and
`oscqat.convert(fold_bn=True)`: exact types only. A BatchNorm subclass may carry an activation (timm's
BatchNormAct2d); replacing it by nn.Identity would drop that activation, so neither fold touches it."""
import copy

import torch
from torch import nn

import oscqat
from oscqat.fold import foldable_bn


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


def _prepared(bn):
    torch.manual_seed(0)
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    model = oscqat.prepare(Net(bn), oscqat.QATConfig(4, 4, first_last_bits=None), calib_data=data, verbose=False)
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
