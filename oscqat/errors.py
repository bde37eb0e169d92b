"""Every error type oscqat raises of its own: each message names the layer (or backend) and the value."""


class BackendUnavailable(RuntimeError):
    """The chosen backend cannot run here (missing package or extension, or no kernel for the device)."""


class NonFiniteError(FloatingPointError):
    """A NaN or infinite value entered a quantizer; the message names the layer and what was non-finite."""


class WeightChangedError(RuntimeError):
    """A quantized layer's weight changed outside the optimizer since its last step."""


class InvalidStateError(ValueError):
    """A checkpoint's tracking state holds a value that no run can have written (oscqat/nn/state_check.py)."""
