#!/usr/bin/env bash
# Compile check of the CUDA sources with nvcc alone (nvcc -c, nothing is linked or run): every kernel
# instantiation, and also where the build does not compile them (a CPU-only torch, OSCQAT_NO_CUDA, an nvcc whose
# major version differs from torch's CUDA).
#   1. csrc/cuda/check_kernels.cu: every kernel of quant_kernels.cuh, every dtype combination; needs only the
#      CUDA toolkit.
#   2. csrc/cuda/quant_cuda.cu: the ATen glue, against the installed torch's headers. A CPU-only torch wheel
#      ships the c10/cuda and ATen/cuda headers but not the CMake-generated c10/cuda/impl/cuda_cmake_macros.h;
#      a stand-in with its one define is put in a temporary include directory. Skipped (with a note) when torch
#      is not importable.
# Flags are the build's: -O3 --fmad=false (no fused multiply-add: docs/semantics.md). Override the architecture
# with CUDA_ARCH (default sm_90) and the compiler with NVCC.
# Usage: bash csrc/check_cuda_compile.sh        (exit status 0 = both compile)
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
    if command -v nvcc >/dev/null; then NVCC=nvcc
    elif [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
    else echo "check_cuda_compile: nvcc not found; nothing to check" >&2; exit 0
    fi
fi
ARCH=${CUDA_ARCH:-sm_90}
PY=${PYTHON:-python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
flags=(-c -O3 --fmad=false -arch="$ARCH" -Xcompiler -fPIC)

echo "check_cuda_compile: $("$NVCC" --version | tail -1)"
echo "check_cuda_compile: kernels (csrc/cuda/check_kernels.cu, $ARCH)"
"$NVCC" "${flags[@]}" -std=c++17 -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ csrc/cuda/check_kernels.cu -o "$tmp/kernels.o"

if ! incs=$("$PY" -c "import torch.utils.cpp_extension as c; print('\n'.join(c.include_paths()))" 2>/dev/null); then
    echo "check_cuda_compile: torch not importable; skipped the ATen glue (csrc/cuda/quant_cuda.cu)"
    exit 0
fi
abi=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
# torch's own nvcc flags for extensions (no implicit half conversions, --expt-relaxed-constexpr)
read -r -a torch_nvcc <<<"$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join(c.COMMON_NVCC_FLAGS))")"
inc_flags=()
while IFS= read -r d; do [ -n "$d" ] && inc_flags+=(-I"$d"); done <<<"$incs"
have_macros=0
while IFS= read -r d; do [ -f "$d/c10/cuda/impl/cuda_cmake_macros.h" ] && have_macros=1; done <<<"$incs"
if [ "$have_macros" = 0 ]; then
    mkdir -p "$tmp/shim/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$tmp/shim/c10/cuda/impl/cuda_cmake_macros.h"
    inc_flags+=(-I"$tmp/shim")
fi
note=$([ "$have_macros" = 0 ] && echo ' + cuda_cmake_macros.h stand-in' || true)
echo "check_cuda_compile: ATen glue (csrc/cuda/quant_cuda.cu, torch headers$note)"
"$NVCC" "${flags[@]}" "${torch_nvcc[@]}" -std=c++20 -DOSCQAT_WITH_CUDA -D_GLIBCXX_USE_CXX11_ABI="$abi" \
    -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
    -diag-suppress 3306 -Xcompiler -Wno-c++20-extensions "${inc_flags[@]}" csrc/cuda/quant_cuda.cu -o "$tmp/glue.o"
echo "check_cuda_compile: ok"
