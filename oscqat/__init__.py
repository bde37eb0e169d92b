"""oscqat: oscillation-aware quantization-aware training. Semantics: docs/semantics.md; where the code is:
docs/code-map.md (rooms: ops/ the op contract and backends, nn/ the modules and prepare, training/, export/).

    model = oscqat.prepare(model, oscqat.QATConfig(weight_bits=4, act_bits=4), calib_data=batches)
    sched = oscqat.QATSchedule(model, total_steps)
    ...   loss = task_loss + sched.lam * oscqat.dampening_loss(model); ...; opt.step(); sched.step()
    oscqat.reestimate_bn(model, batches)
"""
from . import ops  # registers the torch.library ops
from .errors import BackendUnavailable, InvalidStateError, NonFiniteError, WeightChangedError
from .ops.backends import get_backend, set_backend, use_backend
# the modules and prepare
from .nn.config import METHODS, QATConfig
from .nn.fold import fold_bn
from .nn.layers import (QuantConv1d, QuantConv2d, QuantLinear, is_depthwise, quant_layers, quantizers,
                        weight_quantizers)
from .nn.prepare import prepare
from .nn.quantizers import QuantAct, WeightQuantizer, quantize_weights
from .nn.summary import PrepareSummary
from .nn.wrappers import exclude_state_from_ddp, unwrap
# training-time machinery
from .training.bn import reestimate_bn
from .training.correction import quantization_correction
from .training.dampening import dampening_loss
from .training.distributed import StateConsistencyCheck, broadcast_state
from .training.ema import QATModelEMA
from .training.report import format_report, oscillation_report
from .training.schedule import QATSchedule, arm_tracking, scales_at_floor
from .training.transition import TransitionRateSchedule
# conversion and export
from .export.convert import FixedQuantAct, IntConv1d, IntConv2d, IntLinear, convert
from .export.formats import (compare_onnxruntime, encodings, export_encodings, export_onnx, export_program,
                             export_pt2, onnx_weight_ints)

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
