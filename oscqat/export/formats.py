"""Export of a converted model (`oscqat.convert`): ONNX in QDQ form, an encodings JSON, a torch.export program.
Formats, the arithmetic each runtime does and the measured tolerances: docs/export.md."""
from __future__ import annotations

import ast
import contextlib
import json
import os

import torch
from torch import nn

from .convert import as_converted, aten_qdq, int_layers

_qd = torch.ops.quantized_decomposed
_DEFAULT_OPSET = 18           # the lowest the torch.onnx (dynamo) exporter writes; QDQ per-axis needs 13
_STANDARD_DOMAINS = ("", "ai.onnx")
ENCODINGS_FORMAT = "oscqat-encodings"
ENCODINGS_VERSION = 1


# ---- ONNX ------------------------------------------------------------------------------------------------------
def _onnx_translations():
    """quantized_decomposed -> standard ONNX: QuantizeLinear into an int8/uint8 container, then Clip in the
    integer domain to the low-bit range (torch's own translation drops quant_min/quant_max, which would widen a
    4-bit grid to 8 bits); DequantizeLinear, per tensor or along axis 0 for per-channel weights."""
    import numpy as np
    import onnx
    from onnxscript import opset18 as op

    # the exporter hands `dtype` over as an ONNX data type (onnx_ir.DataType)
    np_dtype = {"INT8": np.int8, "UINT8": np.uint8}
    full = {"INT8": (-128, 127), "UINT8": (0, 255)}

    def const(value, dtype):
        return op.Constant(value=onnx.numpy_helper.from_array(np.array(value, dtype=dtype)))

    def quantize(input, scale, zero_point, quant_min, quant_max, dtype):
        t = np_dtype[dtype.name]
        q = op.QuantizeLinear(input, const(scale, np.float32), const(zero_point, t))
        if (quant_min, quant_max) == full[dtype.name]:
            return q
        return op.Clip(q, const(quant_min, t), const(quant_max, t))

    def dequantize(input, scale, zero_point, quant_min, quant_max, dtype, out_dtype=None):
        return op.DequantizeLinear(input, const(scale, np.float32), const(zero_point, np_dtype[dtype.name]))

    def dequantize_channel(input, scales, zero_points, axis, quant_min, quant_max, dtype, out_dtype=None):
        if zero_points is not None:
            raise ValueError("export_onnx: per-channel zero points are not produced by oscqat.convert")
        return op.DequantizeLinear(input, scales, axis=axis)

    return {_qd.quantize_per_tensor.default: quantize, _qd.dequantize_per_tensor.default: dequantize,
            _qd.dequantize_per_channel.default: dequantize_channel}


def _batch_dim(args):
    return tuple({0: torch.export.Dim("batch")} for _ in args)


def _program(model: nn.Module, example_inputs, dynamic_batch: bool, aten: bool):
    model = as_converted(model).eval()
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    # copies: the program keeps its example inputs (a .pt2 saves them), and a slice such as x[:2] would bring the
    # whole storage of x with it (the test set, 31 MB, in a 0.5 MB model's .pt2)
    args = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
    if dynamic_batch and any(a.shape[0] < 2 for a in args):
        raise ValueError(f"export: a dynamic batch dimension needs example inputs with a batch of at least 2 "
                         f"(torch.export specialises size 1), got {[tuple(a.shape) for a in args]}; or pass "
                         f"dynamic_batch=False")
    with aten_qdq() if aten else contextlib.nullcontext():
        ep = torch.export.export(model, args, dynamic_shapes=_batch_dim(args) if dynamic_batch else None)
    return model, args, ep


def _name_activation_integers(graph) -> int:
    """Rename the integer output of each activation quantizer (its Clip, or its QuantizeLinear when the grid is
    the container's) to `<layer>.input_int`, the name export_encodings gives, from the exporter's name scopes."""
    last = {}
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "Clip"):
            continue
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props
                       if p.key == "pkg.torch.onnx.name_scopes"), [])
        if len(scopes) >= 2 and scopes[-2].endswith(".input_quant"):
            last[scopes[-2][:-len(".input_quant")]] = node
    renames = {node.output[0]: f"{layer}.input_int" for layer, node in last.items()}
    for node in graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        node.output[:] = [renames.get(o, o) for o in node.output]
    return len(renames)


def export_onnx(model: nn.Module, example_inputs, path, opset: int = _DEFAULT_OPSET,
                dynamic_batch: bool = True) -> str:
    """Write `model` (a QAT model, converted first, or a converted one) as ONNX at `path` with standard
    QuantizeLinear/DequantizeLinear only (QDQ; docs/export.md): weights are int8 initialisers named
    `<layer>.weight_int` feeding DequantizeLinear; activations QuantizeLinear -> Clip (low-bit range, int8 for
    signed and uint8 for unsigned grids; output named `<layer>.input_int`) -> DequantizeLinear, with Sub/Add
    around them for an LSQ+ offset. `example_inputs`: a tensor or a tuple of them; the batch dimension is
    dynamic unless `dynamic_batch=False`. Returns `path`."""
    import onnx

    if opset < _DEFAULT_OPSET:
        raise ValueError(f"export_onnx: opset {opset} is below {_DEFAULT_OPSET}, the lowest the torch.onnx "
                         f"exporter writes")
    model, args, ep = _program(model, example_inputs, dynamic_batch, aten=False)
    names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    prog = torch.onnx.export(ep, args, dynamo=True, opset_version=opset, verbose=False,
                             custom_translation_table=_onnx_translations(), input_names=names,
                             output_names=["output"])
    proto = prog.model_proto
    custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in _STANDARD_DOMAINS})
    if custom or proto.functions:
        raise RuntimeError(f"export_onnx: the ONNX graph holds non-standard ops {custom or list(proto.functions)}")
    acts = sum(m.input_quant is not None for _, m in int_layers(model))
    named = _name_activation_integers(proto.graph)
    if named != acts:
        raise RuntimeError(f"export_onnx: found {named} of the {acts} activation quantizers in the ONNX graph")
    onnx.save(proto, os.fspath(path))
    return os.fspath(path)


def onnx_weight_ints(path) -> dict[str, torch.Tensor]:
    """The int8 initialisers of an exported ONNX file, by layer name (`<layer>.weight_int` -> `<layer>`)."""
    import onnx
    from onnx import numpy_helper

    suffix = ".weight_int"
    return {t.name[:-len(suffix)]: torch.from_numpy(numpy_helper.to_array(t).copy())
            for t in onnx.load(os.fspath(path)).graph.initializer if t.name.endswith(suffix)}


# ---- encodings -------------------------------------------------------------------------------------------------
def _grid(scale: float, bits: int, qmin: int, qmax: int, offset: float = 0.0) -> dict:
    """One AIMET-style encoding: real = (u + offset) * scale for u in [0, 2^bits - 1]; min/max include an
    LSQ+ float offset, which is also given on its own (docs/export.md)."""
    return {"bitwidth": bits, "dtype": "int", "is_symmetric": qmin == -qmax - 1 and offset == 0.0,
            "scale": scale, "offset": qmin, "min": qmin * scale + offset, "max": qmax * scale + offset}


def encodings(model: nn.Module) -> dict:
    """The encodings of `model` (QAT or converted) as a dict: see export_encodings."""
    model = as_converted(model)
    params, acts, meta = {}, {}, {}
    for name, layer in int_layers(model):
        scales = layer.scales().tolist()
        params[f"{name}.weight"] = [_grid(s, layer.bits, layer.qmin, layer.qmax) for s in scales]
        frozen = layer.frozen.flatten().nonzero().flatten()
        meta[f"{name}.weight"] = {
            "signed": True, "qmin": layer.qmin, "qmax": layer.qmax, "axis": 0 if layer.per_channel else None,
            "shape": list(layer.weight_int.shape), "onnx_initializer": f"{name}.weight_int",
            "frozen_count": int(frozen.numel()), "frozen_indices": frozen.tolist()}
        a = layer.input_quant
        if a is not None:
            off = 0.0 if a.offset is None else a.offset
            acts[f"{name}.input"] = [_grid(a.scale, a.bits, a.qmin, a.qmax, off)]
            meta[f"{name}.input"] = {"signed": a.signed, "qmin": a.qmin, "qmax": a.qmax, "axis": None,
                                     "float_offset": off, "onnx_tensor": f"{name}.input_int"}
    return {"format": ENCODINGS_FORMAT, "version": ENCODINGS_VERSION, "param_encodings": params,
            "activation_encodings": acts, "oscqat": meta}


def export_encodings(model: nn.Module, path) -> str:
    """Write the JSON encodings of `model` (QAT or converted) at `path`, one entry per quantized tensor
    (`<layer>.weight`, `<layer>.input`): AIMET-style lists (one dict per channel) of bitwidth, scale, integer
    offset, min and max under "param_encodings"/"activation_encodings"; signedness, low-bit range, per-channel
    axis, LSQ+ float offset and the frozen weights (flat indices) under "oscqat". Format: docs/export.md."""
    with open(path, "w") as f:
        json.dump(encodings(model), f, indent=1)
    return os.fspath(path)


# ---- torch.export ----------------------------------------------------------------------------------------------
def export_program(model: nn.Module, example_inputs, dynamic_batch: bool = True,
                   keep_qdq: bool = False) -> torch.export.ExportedProgram:
    """torch.export of the converted `model`. By default quantize/dequantize are traced as the ATen ops that
    implement them (round, clamp, mul: the same arithmetic), so the program loads with `import torch` alone;
    `keep_qdq=True` keeps torch's `quantized_decomposed` ops (the pattern PT2E lowerings match; the loader must
    then `import torch.ao.quantization.fx._decomposed` first)."""
    _, _, ep = _program(model, example_inputs, dynamic_batch, aten=not keep_qdq)
    namespaces = {n.target.namespace for n in ep.graph.nodes
                  if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}
    foreign = namespaces - {"aten", "prims", "quantized_decomposed"}
    if foreign:
        raise RuntimeError(f"export_program: the program calls ops outside aten/quantized_decomposed: {foreign}")
    return ep


def export_pt2(model: nn.Module, example_inputs, path, dynamic_batch: bool = True, keep_qdq: bool = False) -> str:
    """Save `export_program(model, example_inputs, ...)` at `path` (`.pt2`, `torch.export.load` reads it). The file
    holds the program, the converted weights and a copy of `example_inputs` (its sample inputs): pass one small
    batch (docs/export.md, "File sizes")."""
    torch.export.save(export_program(model, example_inputs, dynamic_batch, keep_qdq), os.fspath(path))
    return os.fspath(path)


def compare_onnxruntime(path, model: nn.Module, inputs: torch.Tensor) -> dict:
    """Run the ONNX file at `path` in onnxruntime (CPU) and `model` (QAT or converted, in eval mode) on `inputs`:
    {"max_abs_diff": max |ort - model|, "max_abs_output": max |model|, "argmax_agreement": the fraction of rows
    whose argmax agrees (outputs of shape [batch, classes])}."""
    import onnxruntime as ort

    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: inputs.detach().cpu().numpy()})[0])
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(inputs).cpu()
    finally:
        model.train(was)
    return {"max_abs_diff": float((got - want).abs().max()), "max_abs_output": float(want.abs().max()),
            "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean())}
