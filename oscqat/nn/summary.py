"""What `oscqat.prepare` did to a model: `model.oscqat_summary` (printed in short by `prepare`)."""
from __future__ import annotations

from collections import Counter

from .config import QATConfig


class PrepareSummary:
    """`swapped`: (name, float type, quantized layer); `skipped`: (name, type, why it stays in float);
    `fallbacks`: (quantizer, note) where range initialisation could not use the data as is; `first`/`last`: the
    input/output layers (at `first_last_bits`) and `edges_from`, how they were found; `fixed_input_scales`: the
    model input quantizers kept at their calibrated range (QATConfig.learn_input_scale); `asymmetric`: (quantizer,
    why) for the activation grids with a learned offset; `calibration`: how activation ranges were calibrated."""

    def __init__(self, config: QATConfig):
        self.config = config
        self.swapped: list = []
        self.skipped: list[tuple[str, str, str]] = []
        self.fallbacks: list[tuple[str, str]] = []
        self.first: list[str] = []
        self.fixed_input_scales: list[str] = []
        self.last: list[str] = []
        self.edges_from = ""
        self.asymmetric: list[tuple[str, str]] = []
        self.calibration = "none: activation scales from the first training batch"

    @staticmethod
    def _bits(layer) -> str:
        a = layer.input_quant
        return f"W{layer.weight_quant.bits}" + (f"A{a.bits}" if a is not None else "")

    def rows(self) -> list[dict]:
        out = []
        for name, ftype, q in self.swapped:
            wq = q.weight_quant
            out.append({"layer": name, "float_type": ftype, "quantized_as": type(q).__name__,
                        "bits": self._bits(q), "tracked": wq.tracking, "dampen": wq.dampen, "freeze": wq.freeze})
        return out

    def short(self) -> str:
        c = self.config
        by_bits = Counter(self._bits(q) for _, _, q in self.swapped)
        tracked = sum(q.weight_quant.tracking for _, _, q in self.swapped)
        lines = [f"oscqat.prepare: {len(self.swapped)} layers quantized ("
                 + ", ".join(f"{b}: {n}" for b, n in sorted(by_bits.items())) + f"), {len(self.skipped)} left in "
                 f"float; method {c.method!r} on the {tracked} layers at <= {c.track_max_bits} bits"]
        if c.first_last_bits is not None and self.swapped:
            ends = dict.fromkeys(self.first + self.last)
            lines.append(f"  at {c.first_last_bits} bits (first/last): {', '.join(ends)} (input: {len(self.first)}, "
                         f"output: {len(self.last)}; from {self.edges_from})")
        if c.quantize_activations:
            lines.append(f"  activation calibration: {self.calibration}")
        if self.fixed_input_scales:
            lines.append(f"  model input quantizers with a fixed range (QATConfig.learn_input_scale=False): "
                         f"{', '.join(self.fixed_input_scales)}")
        if c.batch_weights:
            lines.append("  weights quantized all at once before each training forward (QATConfig.batch_weights; "
                         "eager, cpp/cuda backends)")
        if self.asymmetric:
            why = Counter("after " + w.split()[1] if w.startswith("after") else "small negative tail"
                          for _, w in self.asymmetric)
            lines.append(f"  asymmetric activation grids (unsigned, learned offset): {len(self.asymmetric)} ("
                         + ", ".join(f"{k}: {n}" for k, n in sorted(why.items())) + ")")
        for name, ftype, why in self.skipped:
            lines.append(f"  left in float: {name} ({ftype}): {why}")
        for name, note in self.fallbacks:
            lines.append(f"  range init: {name}: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        rows = self.rows()
        width = max([len(r["layer"]) for r in rows] + [5])
        table = [f"{'layer':{width}s}  {'float type':14s} {'bits':6s} remedies"]
        for r in rows:
            remedies = "+".join(k for k in ("tracked", "dampen", "freeze") if r[k]) or "-"
            table.append(f"{r['layer']:{width}s}  {r['float_type']:14s} {r['bits']:6s} {remedies}")
        return self.short() + "\n" + "\n".join(table)

    def __repr__(self) -> str:
        return f"PrepareSummary({len(self.swapped)} swapped, {len(self.skipped)} skipped)"
