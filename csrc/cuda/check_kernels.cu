// Compile check only (csrc/check_cuda_compile.sh); not part of the build. Instantiates every kernel of
// quant_kernels.cuh for every dtype combination the glue launches, without torch headers, so that the device
// code is compiled even where torch has no CUDA.
#include "quant_kernels.cuh"

namespace oscqat {
namespace cuda {

template <typename T>
void take_weight_fwd(void** k) {
  k[0] = reinterpret_cast<void*>(&weight_fwd_kernel<T, false>);
  k[1] = reinterpret_cast<void*>(&weight_fwd_kernel<T, true>);
  k[2] = reinterpret_cast<void*>(&act_fwd_kernel<T, false>);
  k[3] = reinterpret_cast<void*>(&act_fwd_kernel<T, true>);
}

template <typename TG, typename TW>
void take_bwd(void** k) {
  k[0] = reinterpret_cast<void*>(&weight_bwd_kernel<TG, TW>);
  k[1] = reinterpret_cast<void*>(&act_bwd_kernel<TG, TW, false>);
  k[2] = reinterpret_cast<void*>(&act_bwd_kernel<TG, TW, true>);
}

template <typename TG>
void take_bwd_all(void** k) {
  take_bwd<TG, float>(k);
  take_bwd<TG, __half>(k + 3);
  take_bwd<TG, __nv_bfloat16>(k + 6);
}

void* all_kernels[64];

void take_all() {
  void** k = all_kernels;
  take_weight_fwd<float>(k);
  take_weight_fwd<__half>(k + 4);
  take_weight_fwd<__nv_bfloat16>(k + 8);
  take_bwd_all<float>(k + 12);
  take_bwd_all<__half>(k + 21);
  take_bwd_all<__nv_bfloat16>(k + 30);
  k[39] = reinterpret_cast<void*>(&weight_fwd_finish_kernel);
  k[40] = reinterpret_cast<void*>(&weight_bwd_finish_kernel);
  k[41] = reinterpret_cast<void*>(&act_bwd_finish_kernel);
}

}  // namespace cuda
}  // namespace oscqat
