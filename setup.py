"""oscqat: oscillation-aware quantization-aware training. `kernels/` installs as `oscqat.kernels`.

The C++/CUDA extension `oscqat._C` (csrc/) is built whenever torch is importable at build time (build with
`pip install --no-build-isolation -e .` so that the installed torch is used): CPU kernels always, CUDA kernels
too when torch has CUDA and nvcc is found. OSCQAT_NO_EXT=1 turns the extension off (the package then runs on
the `torch`/`triton` backends); OSCQAT_NO_CUDA=1 builds the CPU kernels only.
"""
import os
import sys

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _extensions():
    """(ext_modules, cmdclass) for oscqat._C, or nothing when it cannot or should not be built."""
    if _flag("OSCQAT_NO_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("oscqat: torch is not importable at build time; building without the C++ extension "
              "(use pip install --no-build-isolation)", file=sys.stderr)
        return [], {}
    # Bit-exactness (docs/semantics.md): no fused multiply-add, no fast-math reassociation.
    if sys.platform == "win32":
        cxx = ["/O2", "/fp:precise"]
    else:
        cxx = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"]
    sources = ["csrc/oscqat_C.cpp", "csrc/cpu/quant_cpu.cpp"]
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and not _flag("OSCQAT_NO_CUDA"))
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "oscqat._C", sources + ["csrc/cuda/quant_cuda.cu"],
            extra_compile_args={"cxx": cxx + ["-DOSCQAT_WITH_CUDA"],
                                "nvcc": ["-O3", "--fmad=false", "-DOSCQAT_WITH_CUDA"]})
    else:
        ext = cpp_extension.CppExtension("oscqat._C", sources, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="oscqat",
    version="0.1.0",
    description="Oscillation-aware quantization-aware training with fused kernels",
    packages=["oscqat", "oscqat.app", "oscqat.kernels"],
    package_dir={"oscqat": "oscqat", "oscqat.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "train": ["matplotlib", "tqdm", "scikit-learn"],
        "test": ["pytest", "hypothesis", "triton>=3.0", "matplotlib", "tqdm", "scikit-learn", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["oscqat=oscqat.app.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
