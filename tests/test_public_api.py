"""The public API (`oscqat.__all__`) is the contract with users: moving code between the library's rooms must not
change it. The list below is the API as of the room move (issue 26); a name added on purpose is added here too."""
import types

import oscqat

PUBLIC = {
    "arm_tracking", "BackendUnavailable", "broadcast_state", "compare_onnxruntime", "convert", "dampening_loss",
    "encodings", "exclude_state_from_ddp", "export_encodings", "export_onnx", "export_program", "export_pt2",
    "FixedQuantAct", "fold_bn", "format_report", "get_backend", "IntConv1d", "IntConv2d", "IntLinear",
    "InvalidStateError", "is_depthwise", "METHODS", "NonFiniteError", "onnx_weight_ints", "ops",
    "oscillation_report", "prepare", "PrepareSummary", "QATConfig", "QATModelEMA", "QATSchedule", "quant_layers",
    "QuantAct", "QuantConv1d", "QuantConv2d", "quantization_correction", "quantize_weights", "quantizers",
    "QuantLinear", "reestimate_bn", "scales_at_floor", "set_backend", "StateConsistencyCheck",
    "TransitionRateSchedule", "unwrap", "use_backend", "weight_quantizers", "WeightChangedError", "WeightQuantizer",
}


def test_public_names_are_exactly_the_pinned_ones():
    assert set(oscqat.__all__) == PUBLIC
    assert len(oscqat.__all__) == len(PUBLIC), "a name is listed twice in oscqat.__all__"


def test_every_public_name_resolves_to_what_it_was():
    missing = [n for n in PUBLIC if not hasattr(oscqat, n)]
    assert not missing
    assert isinstance(oscqat.ops, types.ModuleType)          # `oscqat.ops`: the op contract's module, not a function
    for n in PUBLIC - {"ops", "METHODS"}:
        assert callable(getattr(oscqat, n)), n
    assert issubclass(oscqat.NonFiniteError, FloatingPointError) and issubclass(oscqat.InvalidStateError, ValueError)
    assert issubclass(oscqat.WeightChangedError, RuntimeError) and issubclass(oscqat.BackendUnavailable, RuntimeError)
