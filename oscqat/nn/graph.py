"""Input and output layers from the data flow of the model, not from module order.

A detector has several output convolutions (box, class, objectness per scale) and may register a fixed decoding
conv last; only the data flow tells them apart. One forward with hooks (any Python control flow: detection
models) gives the flow through the autograd graph; without an input, torch.fx where it can trace the model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# Bounded below by a small negative value (SiLU -0.278, Hardswish -0.375, GELU -0.170, Mish -0.309): the
# quantizer after them wants an unsigned grid with an offset rather than a signed one.
LOPSIDED = (nn.SiLU, nn.Hardswish, nn.GELU, nn.Mish)


@dataclass
class Flow:
    first: list[str]                      # layers whose input comes from the model's input through no layer
    last: list[str]                       # layers whose output reaches the model's output through no layer
    after: dict[str, str] = field(default_factory=dict)   # layer -> the LOPSIDED module type that feeds it
    how: str = ""


def _walk(start, preds, stop: dict, is_source) -> tuple[set[str], bool]:
    """Backwards from `start` until a node in `stop` (a layer's output): the layers met and whether a source
    (the model's input) was reached through none of them."""
    met, found, seen, todo = set(), False, set(), list(start)
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in stop:
            met.add(stop[node])
        elif is_source(node):
            found = True
        else:
            todo.extend(preds(node))
    return met, found


def _flow(layer_in, layer_out, roots, preds, is_source, how, after=None) -> Flow:
    """`layer_in`: (layer, node producing its input, or True for the model's input itself) per call."""
    first = [name for name, node in layer_in if node is True or _walk([node], preds, layer_out, is_source)[1]]
    last = _walk(roots, preds, layer_out, is_source)[0]
    order = list(dict.fromkeys(name for name, _ in layer_in))
    return Flow(list(dict.fromkeys(first)), [n for n in order if n in last], after or {}, how)


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _leaves(obj):
    """`obj` with every floating-point tensor replaced by a detached leaf that requires grad."""
    if torch.is_tensor(obj):
        return obj.detach().requires_grad_() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _leaves(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_leaves(v) for v in obj) if not hasattr(obj, "_fields") else type(obj)(*map(_leaves, obj))
    return obj


def traced_flow(model: nn.Module, layers: dict[str, nn.Module], example) -> Flow:
    """One forward of `example` with grad enabled; the autograd graph links each layer's input and output to
    the model's input and output. Run it with the model in the mode wanted (prepare: calibration mode)."""
    x = _leaves(example)
    inputs = {id(t) for t in _tensors(x) if t.requires_grad}
    if not inputs:
        raise ValueError("the example input holds no floating-point tensor to trace")
    layer_in, layer_out, made_by = [], {}, {}
    names = {id(m): name for name, m in layers.items()}

    def pre(m, args):
        t = args[0] if args and torch.is_tensor(args[0]) else None
        if t is not None and t.requires_grad:
            layer_in.append((names[id(m)], True if t.grad_fn is None and id(t) in inputs else t.grad_fn))

    def post(m, args, out):
        if torch.is_tensor(out) and out.grad_fn is not None:
            layer_out[out.grad_fn] = names[id(m)]

    def act(m, args, out):
        if torch.is_tensor(out) and out.grad_fn is not None:
            made_by[out.grad_fn] = type(m).__name__

    handles = [h for m in layers.values() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    handles += [m.register_forward_hook(act) for m in model.modules() if isinstance(m, LOPSIDED)]
    try:
        with torch.enable_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    roots = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]

    def is_source(node):
        return id(getattr(node, "variable", None)) in inputs

    def preds(node):
        return [f for f, _ in node.next_functions]

    after = {name: made_by[node] for name, node in layer_in if node is not True and node in made_by}
    return _flow(layer_in, layer_out, roots, preds, is_source, "a traced forward of the first calibration batch",
                 after)


def fx_flow(model: nn.Module, layers: dict[str, nn.Module]) -> Flow:
    """The same from torch.fx's symbolic trace (raises where the model cannot be traced symbolically)."""
    leaves = {id(m) for m in layers.values()}

    class Tracer(torch.fx.Tracer):     # a layer subclass (timm's Linear) is one node too
        def is_leaf_module(self, m, qualname):
            return id(m) in leaves or super().is_leaf_module(m, qualname)

    graph = Tracer().trace(model)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target in layers]
    layer_in = [(n.target, n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None) for n in calls]
    roots = [n for n in graph.nodes if n.op == "output"]
    return _flow(layer_in, {n: n.target for n in calls}, roots,
                 lambda n: [p for p in n.all_input_nodes if not _metadata(p)],
                 _required_input, "torch.fx (no calib_data to trace a forward with)")


def _required_input(n) -> bool:
    """A forward argument without a default: an optional one (timm's `attn_mask=None`) carries no data."""
    return n.op == "placeholder" and not n.args


def _metadata(n) -> bool:
    """A read of a tensor's shape, size or dtype: no data flows through it (`B, N, C = x.shape` in attention)."""
    if n.op == "call_function" and n.target is getattr:
        return n.args[1] in ("shape", "dtype", "device", "ndim")
    return (n.op == "call_method" and n.target in ("size", "dim")) or (n.op == "call_function" and n.target is len)
