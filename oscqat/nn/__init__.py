"""The quantized modules and `prepare`: QATConfig, the quantizers (scales, tracking state, the checks of every
forward), the quantized layers, what `prepare` does to a model (swap, calibrate, summary), folding BatchNorm into
quantized layers, and the hooks the modules install after every optimizer step (step_hook.py, weight_check.py)."""
