"""GPU kernels of the oscqat op contract, installed as `oscqat.kernels`: `triton/` is the `triton` backend (the
primary GPU backend; `backend.py` launches, `kernels.py` the @triton.jit kernels, `aot.py` compiles them ahead of
time). The C++/CUDA backends are in csrc/ (`oscqat.ops.cpp`)."""
