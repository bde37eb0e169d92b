// The flag encoding (docs/semantics.md, "The flag encoding"): the one decoding of the per-weight int8 `flags` for
// the C++ and CUDA kernels, included by csrc/cpu/cores.h and csrc/cuda/quant_kernels.cuh (the reference's is
// oscqat.ops.reference.decode_flags, Triton's kernels/triton/kernels.py `_decode_flags`).
//   flags = last_dir + 4 * fz, or -128 = not yet initialised. Every int8 value decodes: only -128 is
//   uninitialised; below -1, fz = last_dir = 0 (initialised, as 0); from -1 on, fz = (f + 1) >> 2 and
//   last_dir = f - 4 * fz.
// Plain constexpr integer functions, so that the CPU cores inline them into loops that GCC still vectorises.
#pragma once

#if defined(__CUDACC__)
#define OSCQAT_FLAGS_FN __host__ __device__ __forceinline__ constexpr
#else
#define OSCQAT_FLAGS_FN inline constexpr
#endif

namespace oscqat {

constexpr int FLAGS_UNINIT = -128;

OSCQAT_FLAGS_FN bool flag_uninit(int f) { return f == FLAGS_UNINIT; }
OSCQAT_FLAGS_FN int flag_fz(int f) { return f >= -1 ? (f + 1) >> 2 : 0; }
OSCQAT_FLAGS_FN int flag_last_dir(int f) { return f >= -1 ? f - 4 * flag_fz(f) : 0; }
// "frozen" as a forward and an untracked forward's backward see it (fz >= 1), and as a tracked forward's backward
// sees it (fz == 1), written without the shift: the comparisons the CPU cores vectorise best. That they equal
// the decoding above is checked at compile time, below, for all 256 values.
OSCQAT_FLAGS_FN bool flag_frozen(int f) { return f >= 3; }
OSCQAT_FLAGS_FN bool flag_frozen_tracked(int f) { return (f >= 3) & (f <= 6); }

namespace detail {
OSCQAT_FLAGS_FN bool flag_shortcuts_agree() {
  for (int f = -128; f < 128; ++f)
    if (flag_frozen(f) != (flag_fz(f) >= 1) || flag_frozen_tracked(f) != (flag_fz(f) == 1)) return false;
  return true;
}
}  // namespace detail
static_assert(detail::flag_shortcuts_agree(), "flag_frozen / flag_frozen_tracked disagree with flag_fz");

}  // namespace oscqat
