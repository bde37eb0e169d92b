// The fused per-block cores of the CPU kernels, compiled three times: `Base` for the baseline ISA of the build
// (SSE2 on x86-64) and, with GCC on x86, `Avx2` under `#pragma GCC target("avx2")` and `Avx512` under
// AVX-512 F/BW/DQ/VL with 512-bit vectors preferred (-ffp-contract=off forbids contraction into FMA, which
// AVX-512 has; every operation is the same IEEE operation, only the vector width differs, so all give the same
// bits). `with_isa` calls its functor with the best one this CPU runs (in the environment, OSCQAT_NO_AVX512=1:
// at most `Avx2`; OSCQAT_NO_AVX2=1: always `Base`). On a Xeon (Sapphire Rapids) AVX-512 makes the in-cache
// passes ~1.5x faster than AVX2.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "../flags.h"

// GCC only (clang ignores `#pragma GCC target`; there the baseline build runs everywhere, which is correct).
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define OSCQAT_X86_AVX2_DISPATCH 1
#else
#define OSCQAT_X86_AVX2_DISPATCH 0
#endif

namespace oscqat {
namespace cpu {

struct Base {
#include "cores_impl.h"
};

#if OSCQAT_X86_AVX2_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx2")
struct Avx2 {
#include "cores_impl.h"
};
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,prefer-vector-width=512")
struct Avx512 {
#include "cores_impl.h"
};
#pragma GCC pop_options
#endif

inline bool cpu_has_avx512() {
#if OSCQAT_X86_AVX2_DISPATCH
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                          std::getenv("OSCQAT_NO_AVX512") == nullptr && std::getenv("OSCQAT_NO_AVX2") == nullptr;
  return has;
#else
  return false;
#endif
}

inline bool cpu_has_avx2() {
#if OSCQAT_X86_AVX2_DISPATCH
  // OSCQAT_NO_AVX2=1 forces the baseline build (the tests use it to check that both give the same bits).
  static const bool has = __builtin_cpu_supports("avx2") && std::getenv("OSCQAT_NO_AVX2") == nullptr;
  return has;
#else
  return false;
#endif
}

template <typename F>
inline void with_isa(F&& f) {
#if OSCQAT_X86_AVX2_DISPATCH
  if (cpu_has_avx512()) {
    f(Avx512{});
    return;
  }
  if (cpu_has_avx2()) {
    f(Avx2{});
    return;
  }
#endif
  f(Base{});
}

}  // namespace cpu
}  // namespace oscqat
