"""oscqat: oscillation-aware quantization-aware training. Semantics: docs/semantics.md.

    model = oscqat.prepare(model, oscqat.QATConfig(weight_bits=4, act_bits=4), calib_data=batches)
    sched = oscqat.QATSchedule(model, total_steps)
    ...   loss = task_loss + sched.lam * oscqat.dampening_loss(model); ...; opt.step(); sched.step()
    oscqat.reestimate_bn(model, batches)
"""
from . import ops  # registers the torch.library ops
from .backend import BackendUnavailable, get_backend, set_backend, use_backend
from .bn import reestimate_bn
from .config import METHODS, QATConfig
from .convert import FixedQuantAct, IntConv1d, IntConv2d, IntLinear, convert
from .correction import quantization_correction
from .dampening import dampening_loss
from .distributed import StateConsistencyCheck, broadcast_state, exclude_state_from_ddp, unwrap
from .ema import QATModelEMA
from .export import (compare_onnxruntime, encodings, export_encodings, export_onnx, export_program, export_pt2,
                     onnx_weight_ints)
from .fold import fold_bn
from .layers import QuantConv1d, QuantConv2d, QuantLinear, is_depthwise
from .prepare import prepare, quant_layers, quantizers, weight_quantizers
from .quantizers import NonFiniteError, QuantAct, WeightQuantizer, quantize_weights
from .report import format_report, oscillation_report
from .schedule import QATSchedule, arm_tracking, scales_at_floor
from .state_check import InvalidStateError
from .summary import PrepareSummary
from .transition import TransitionRateSchedule
from .weight_check import WeightChangedError

__all__ = ["BackendUnavailable", "METHODS", "NonFiniteError", "PrepareSummary", "QATConfig", "QATModelEMA", "QATSchedule",
           "QuantAct", "QuantConv1d", "QuantConv2d", "QuantLinear", "TransitionRateSchedule", "WeightChangedError",
           "WeightQuantizer", "arm_tracking", "dampening_loss", "fold_bn", "format_report", "get_backend", "ops",
           "oscillation_report", "prepare", "quant_layers", "quantization_correction", "quantize_weights",
           "quantizers", "reestimate_bn", "scales_at_floor", "set_backend", "use_backend", "weight_quantizers",
           "FixedQuantAct", "IntConv1d", "IntConv2d", "IntLinear", "compare_onnxruntime", "convert", "encodings",
           "export_encodings", "export_onnx", "export_program", "export_pt2", "onnx_weight_ints",
           "StateConsistencyCheck", "broadcast_state", "exclude_state_from_ddp", "unwrap", "InvalidStateError",
           "is_depthwise"]
__version__ = "0.1.0"
