"""Drop-in quantized layers: nn.Conv1d/Conv2d/Linear whose weight goes through a WeightQuantizer and whose
input (optionally) through a QuantAct. Follow one weight: `QuantConv2d.forward` -> `WeightQuantizer.forward`
(oscqat/nn/quantizers.py) -> `quantize_weight` (oscqat/ops/library.py: `WeightQuantFn`, or in eager mode on
cpp/cuda the C++ autograd op `oscqat_C::weight_quant`) -> the backend kernel (oscqat/ops/reference.py,
kernels/triton/, csrc/)."""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from . import step_hook, weight_batch
from .config import QATConfig
from .quantizers import QuantAct, WeightQuantizer


class _QuantLayer:
    weight_quant: WeightQuantizer
    input_quant: QuantAct | None
    output_correction: nn.Module | None

    def _setup_quant(self, config: QATConfig, weight_bits: int | None, act_bits: int | None, name: str):
        config = config or QATConfig()
        wb = config.weight_bits if weight_bits is None else weight_bits
        ab = config.act_bits if act_bits is None else act_bits
        active = config.track and wb <= config.track_max_bits
        self.weight_quant = WeightQuantizer(
            self.weight.shape, wb, config.per_channel, track=active, dampen=active and config.dampen,
            freeze=active and config.freeze, momentum=config.momentum, damp_reduction=config.damp_reduction,
            lsq_grad_scale=config.lsq_grad_scale, name=f"{name}.weight" if name else type(self).__name__,
            scale_min=config.scale_min, check_finite=config.check_finite)
        self.input_quant = QuantAct(ab, signed=True, offset=config.act_offset, lsq_grad_scale=config.lsq_grad_scale,
                                    name=f"{name}.input" if name else f"{type(self).__name__}.input",
                                    scale_min=config.scale_min, check_finite=config.check_finite) \
            if config.quantize_activations else None
        self.output_correction = None      # set by oscqat.training.correction.quantization_correction
        step_hook.register(self, layer=True)

    def __setstate__(self, state):
        super().__setstate__(state)
        step_hook.register(self, layer=True)

    def _quant_weight(self):
        w_hat = weight_batch.take(self)
        return self.weight_quant(self.weight) if w_hat is None else w_hat

    def _quant_input(self, x):
        return x if self.input_quant is None else self.input_quant(x)

    def _correct(self, out):
        return out if self.output_correction is None else self.output_correction(out)

    @classmethod
    def from_float(cls, module: nn.Module, config: QATConfig | None = None, *, weight_bits: int | None = None,
                   act_bits: int | None = None, name: str = ""):
        """A quantized copy of `module` (weights and bias shared, same device and dtype)."""
        w = module.weight
        q = cls(**cls._float_kwargs(module), config=config, weight_bits=weight_bits, act_bits=act_bits, name=name,
                device=w.device, dtype=w.dtype)
        q.weight, q.bias = module.weight, module.bias
        q.to(w.device)
        q.train(module.training)
        return q


def _conv_kwargs(m):
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                padding_mode=m.padding_mode)


class QuantConv1d(_QuantLayer, nn.Conv1d):
    def __init__(self, *args, config: QATConfig | None = None, weight_bits=None, act_bits=None, name="", **kw):
        nn.Conv1d.__init__(self, *args, **kw)
        self._setup_quant(config, weight_bits, act_bits, name)

    _float_kwargs = staticmethod(_conv_kwargs)

    def forward(self, x):
        return self._correct(self._conv_forward(self._quant_input(x), self._quant_weight(), self.bias))


class QuantConv2d(_QuantLayer, nn.Conv2d):
    def __init__(self, *args, config: QATConfig | None = None, weight_bits=None, act_bits=None, name="", **kw):
        nn.Conv2d.__init__(self, *args, **kw)
        self._setup_quant(config, weight_bits, act_bits, name)

    _float_kwargs = staticmethod(_conv_kwargs)

    def forward(self, x):
        return self._correct(self._conv_forward(self._quant_input(x), self._quant_weight(), self.bias))


class QuantLinear(_QuantLayer, nn.Linear):
    def __init__(self, *args, config: QATConfig | None = None, weight_bits=None, act_bits=None, name="", **kw):
        nn.Linear.__init__(self, *args, **kw)
        self._setup_quant(config, weight_bits, act_bits, name)

    _float_kwargs = staticmethod(lambda m: dict(in_features=m.in_features, out_features=m.out_features,
                                                bias=m.bias is not None))

    def forward(self, x):
        return self._correct(F.linear(self._quant_input(x), self._quant_weight(), self.bias))


FLOAT_TO_QUANT = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quant_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _QuantLayer)]


def weight_quantizers(model: nn.Module) -> list[WeightQuantizer]:
    return [m for m in model.modules() if isinstance(m, WeightQuantizer)]


def quantizers(model: nn.Module) -> list[nn.Module]:
    """Every WeightQuantizer and QuantAct of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, (WeightQuantizer, QuantAct))]


def is_depthwise(layer: nn.Module) -> bool:
    """A depthwise convolution (one group per input channel, more than one), float or quantized."""
    return getattr(layer, "groups", 1) > 1 and layer.groups == layer.in_channels
