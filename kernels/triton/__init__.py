"""The `triton` backend (`oscqat.set_backend("triton")`): backend.py, kernels.py, aot.py."""
