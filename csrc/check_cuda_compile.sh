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
#   Step 1 runs for each architecture of CUDA_ARCHS (default "sm_80 sm_90", CI's build list) with ptxas -v: it
#   prints each kernel's registers and fails on a register spill or a stack frame.
#   3. With an argument (a built oscqat/_C*.so): cuobjdump --list-elf lists the SASS it holds, and every
#      architecture of CUDA_ARCHS must be among them.
# Flags are the build's: -O3 --fmad=false (no fused multiply-add: docs/semantics.md). Override the compiler with
# NVCC.
# Usage: bash csrc/check_cuda_compile.sh [path/to/_C.so]        (exit status 0 = all checks pass)
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
    if command -v nvcc >/dev/null; then NVCC=nvcc
    elif [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
    else echo "check_cuda_compile: nvcc not found; nothing to check" >&2; exit 0
    fi
fi
read -r -a ARCHS <<<"${CUDA_ARCHS:-sm_80 sm_90}"
ARCH=${ARCHS[-1]}
PY=${PYTHON:-python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
flags=(-c -O3 --fmad=false -arch="$ARCH" -Xcompiler -fPIC)

echo "check_cuda_compile: $("$NVCC" --version | tail -1)"
for a in "${ARCHS[@]}"; do
    echo "check_cuda_compile: kernels (csrc/cuda/check_kernels.cu, $a, ptxas -v)"
    "$NVCC" -c -O3 --fmad=false -arch="$a" -Xcompiler -fPIC -Xptxas -v -std=c++17 -D__CUDA_NO_HALF_OPERATORS__ \
        -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
        csrc/cuda/check_kernels.cu -o "$tmp/kernels_$a.o" 2>"$tmp/ptxas_$a.log" || { cat "$tmp/ptxas_$a.log"; exit 1; }
    # ptxas -v: "Compiling entry function '<mangled>' for 'sm_80'" then "Used N registers, ..." and
    # "N bytes stack frame, N bytes spill stores, N bytes spill loads"
    awk -v arch="$a" '
        /Compiling entry function/ { fn = $0; gsub(/.*function .|. for .*/, "", fn) }
        /bytes stack frame/ { stack = $2 + 0; spill = $6 + $10 }
        /Used [0-9]+ registers/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^registers/) regs = $i
            printf "check_cuda_compile: %s %3d registers, stack %d, spills %d  %s\n", arch, regs, stack, spill, fn
            if (stack || spill) bad = 1 }
        END { exit bad }' "$tmp/ptxas_$a.log" || { echo "check_cuda_compile: spill or stack frame in a CUDA kernel ($a)" >&2; exit 1; }
done

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

if [ $# -ge 1 ]; then
    CUOBJDUMP=${CUOBJDUMP:-$(dirname "$(command -v "$NVCC")")/cuobjdump}
    [ -x "$CUOBJDUMP" ] || CUOBJDUMP=$("$PY" -c "import os, triton; print(os.path.join(os.path.dirname(
        triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))")    # Triton ships one
    elves=$("$CUOBJDUMP" --list-elf "$1")
    echo "$elves" | sed "s/^/check_cuda_compile: SASS in $(basename "$1"): /"
    for a in "${ARCHS[@]}"; do
        echo "$elves" | grep -q "\.$a\." || { echo "check_cuda_compile: no $a SASS in $1" >&2; exit 1; }
    done
fi
echo "check_cuda_compile: ok"
