"""`import oscqat` stays cheap on top of `import torch` (bench/results/cpu/import_time.md): it imports neither
torch._dynamo nor any optional package; those are imported where they are used."""
import os
import subprocess
import sys

import torch

import oscqat

HEAVY = ("torch._dynamo", "torch._inductor", "triton", "onnx", "onnxscript", "onnxruntime", "matplotlib", "sympy",
         "oscqat.kernels")


def test_import_oscqat_imports_no_dynamo_nor_optional_packages():
    code = ("import sys, torch; import oscqat; "
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.stdout.split() == [], r.stdout


def test_resolve_is_marked_as_torch_compiler_marks_a_constant():
    """backend.resolve is marked for dynamo without importing it; the mark must be the one torch's decorator sets."""
    def f():
        return 0
    marked = torch.compiler.assume_constant_result(f)
    attrs = {k for k in vars(marked) if k.startswith("_dynamo")}
    assert attrs == {"_dynamo_marked_constant"} and marked._dynamo_marked_constant is True
    assert oscqat.ops.backends.resolve._dynamo_marked_constant is True
