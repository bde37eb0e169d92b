// CUDA entry points of oscqat's op contract: validation, output allocation and kernel launches on the current
// stream; registered for the CUDA dispatch key. The kernels themselves: csrc/cuda/quant_kernels.cuh.
// Nothing here synchronises with the device: 0-d control tensors (f_th, grad_d) are read by the kernels from
// device memory (or passed by value when they live on the CPU).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <type_traits>

#include "../checks.h"
#include "quant_kernels.cuh"

namespace oscqat {
namespace cuda {

namespace {

template <typename T>
struct Tag {
  using type = T;
};

// at:: dtype -> the CUDA element type the kernels use (layout-identical to c10::Half / c10::BFloat16).
template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, "oscqat_C: unsupported dtype ", t);
  }
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

void check_cuda(const char* op, const at::Tensor& first) {
  TORCH_CHECK(first.is_cuda(), op, ": the CUDA kernel got a tensor on ", first.device().str());
}

// A 1-element control tensor: (device pointer to an fp32 copy, nullptr) when on the GPU, else (nullptr, value).
// Returns the fp32 device tensor so that it outlives the launch (the caching allocator orders its reuse).
struct Scalar {
  at::Tensor keep;
  const float* ptr = nullptr;
  float val = 0.f;
};

Scalar control_scalar(const at::Tensor& t) {
  Scalar s;
  if (t.is_cuda()) {
    s.keep = t.reshape({}).to(at::kFloat).contiguous();  // no-op for an fp32 0-d tensor; never a sync
    s.ptr = s.keep.const_data_ptr<float>();
  } else {
    s.val = t.reshape({}).to(at::kFloat).item<float>();  // a CPU tensor: no device sync
  }
  return s;
}

at::TensorOptions f32(const at::Tensor& like) { return like.options().dtype(at::kFloat); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> weight_fwd(const at::Tensor& w, const at::Tensor& scale,
                                              const std::optional<at::Tensor>& flags,
                                              const std::optional<at::Tensor>& ema, int64_t n, int64_t p,
                                              bool damp, double damp_div) {
  const char* op = "oscqat_C.weight_fwd";
  check_cuda(op, w);
  const WeightArgs args = check_weight_fwd_args(op, w, scale, flags, ema, n, p, damp, damp_div);
  const int64_t C = args.channels;
  const bool state = args.state;
  const c10::cuda::CUDAGuard guard(w.device());
  auto stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor out = at::empty(w.sizes(), w.options());
  at::Tensor d = at::empty({}, f32(w));
  const int64_t N = w.numel(), per_ch = N / C;
  const Grid2 grid = weight_grid(C, per_ch);
  const int64_t nparts = grid.gx * grid.gy;
  at::Tensor dpart = at::empty({nparts}, w.options().dtype(at::kDouble));
  const dim3 g2(static_cast<unsigned>(grid.gx), static_cast<unsigned>(grid.gy));
  dispatch_float(w.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    weight_fwd_kernel<T, false><<<g2, THREADS, 0, stream>>>(
        cptr<T>(w), scale.const_data_ptr<float>(), C, per_ch, static_cast<float>(n), static_cast<float>(p), damp,
        nullptr, state ? const_cast<int8_t*>(flags->const_data_ptr<int8_t>()) : nullptr, nullptr,
        state ? const_cast<float*>(ema->const_data_ptr<float>()) : nullptr, nullptr, 0.f, 0.f, 0.f, mptr<T>(out),
        dpart.mutable_data_ptr<double>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  weight_fwd_finish_kernel<<<1, THREADS, 0, stream>>>(dpart.const_data_ptr<double>(), nullptr, nparts, damp,
                                                      static_cast<float>(damp_div), d.mutable_data_ptr<float>(),
                                                      nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, d};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_fwd_track(const at::Tensor& w, const at::Tensor& scale,
                                                                at::Tensor& prev_int, at::Tensor& flags,
                                                                at::Tensor& freq, at::Tensor& ema,
                                                                const at::Tensor& f_th, int64_t n, int64_t p,
                                                                double momentum, bool damp, double damp_div) {
  const char* op = "oscqat_C.weight_fwd_track";
  check_cuda(op, w);
  const int64_t C = check_weight_fwd_track_args(op, w, scale, prev_int, flags, freq, ema, f_th, n, p, momentum, damp,
                                                damp_div);
  const c10::cuda::CUDAGuard guard(w.device());
  auto stream = c10::cuda::getCurrentCUDAStream();

  const float m = static_cast<float>(momentum);
  const float om = static_cast<float>(1.0 - momentum);  // in double, then rounded
  const Scalar fth = control_scalar(f_th);
  at::Tensor out = at::empty(w.sizes(), w.options());
  at::Tensor d = at::empty({}, f32(w));
  at::Tensor counts = at::empty({2}, w.options().dtype(at::kInt));
  const int64_t N = w.numel(), per_ch = N / C;
  const Grid2 grid = weight_grid(C, per_ch);
  const int64_t nparts = grid.gx * grid.gy;
  at::Tensor dpart = at::empty({nparts}, w.options().dtype(at::kDouble));
  at::Tensor cpart = at::empty({2 * nparts}, w.options().dtype(at::kLong));
  const dim3 g2(static_cast<unsigned>(grid.gx), static_cast<unsigned>(grid.gy));
  dispatch_float(w.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    weight_fwd_kernel<T, true><<<g2, THREADS, 0, stream>>>(
        cptr<T>(w), scale.const_data_ptr<float>(), C, per_ch, static_cast<float>(n), static_cast<float>(p), damp,
        prev_int.mutable_data_ptr<int8_t>(), flags.mutable_data_ptr<int8_t>(), freq.mutable_data_ptr<float>(),
        ema.mutable_data_ptr<float>(), fth.ptr, fth.val, m, om, mptr<T>(out), dpart.mutable_data_ptr<double>(),
        reinterpret_cast<long long*>(cpart.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  weight_fwd_finish_kernel<<<1, THREADS, 0, stream>>>(
      dpart.const_data_ptr<double>(), reinterpret_cast<const long long*>(cpart.const_data_ptr<int64_t>()), nparts,
      damp, static_cast<float>(damp_div), d.mutable_data_ptr<float>(), counts.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, d, counts};
}

std::tuple<at::Tensor, at::Tensor> weight_bwd(const at::Tensor& g, const at::Tensor& w, const at::Tensor& scale,
                                              const std::optional<at::Tensor>& flags,
                                              const std::optional<at::Tensor>& ema, const at::Tensor& grad_d,
                                              int64_t n, int64_t p, double grad_scale, bool damp, double damp_div,
                                              bool tracked) {
  const char* op = "oscqat_C.weight_bwd";
  check_cuda(op, g);
  const WeightArgs args = check_weight_bwd_args(op, g, w, scale, flags, ema, grad_d, n, p, grad_scale, damp,
                                                damp_div);
  const int64_t C = args.channels;
  const bool state = args.state;
  const c10::cuda::CUDAGuard guard(w.device());
  auto stream = c10::cuda::getCurrentCUDAStream();

  const Scalar gd = control_scalar(grad_d);
  at::Tensor gw = at::empty(w.sizes(), g.options());
  at::Tensor gs = at::empty(scale.sizes(), f32(scale));
  const int64_t N = w.numel(), per_ch = N / C;
  const Grid2 grid = weight_grid(C, per_ch);
  at::Tensor part = at::empty({C * grid.gx}, w.options().dtype(at::kDouble));
  const dim3 g2(static_cast<unsigned>(grid.gx), static_cast<unsigned>(grid.gy));
  dispatch_float(g.scalar_type(), [&](auto gtag) {
    using TG = typename decltype(gtag)::type;
    dispatch_float(w.scalar_type(), [&](auto wtag) {
      using TW = typename decltype(wtag)::type;
      weight_bwd_kernel<TG, TW><<<g2, THREADS, 0, stream>>>(
          cptr<TG>(g), cptr<TW>(w), scale.const_data_ptr<float>(), C, per_ch, static_cast<float>(n),
          static_cast<float>(p), state ? flags->const_data_ptr<int8_t>() : nullptr,
          state ? ema->const_data_ptr<float>() : nullptr, tracked, damp, gd.ptr, gd.val,
          static_cast<float>(damp_div), mptr<TG>(gw), part.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  const int64_t fb = C < MAX_BLOCKS_Y ? C : MAX_BLOCKS_Y;
  weight_bwd_finish_kernel<<<static_cast<unsigned>(fb), THREADS, 0, stream>>>(
      part.const_data_ptr<double>(), C, grid.gx, static_cast<float>(grad_scale), gs.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gw, gs};
}

namespace {
// Validates the activation inputs; returns the offset as an fp32 device tensor (undefined without one).
at::Tensor check_act(const char* op, const at::Tensor& x, const at::Tensor& scale,
                     const std::optional<at::Tensor>& offset, int64_t n, int64_t p) {
  check_data(op, "x", x, x.device());
  check_scale(op, scale, x, true);
  check_range(op, n, p, false);
  if (offset.has_value() && offset->defined()) {
    check_scalar(op, "offset", *offset, x.device(), /*cpu_ok=*/false);
    return offset->reshape({}).to(at::kFloat).contiguous();
  }
  return at::Tensor();
}
}  // namespace

at::Tensor act_fwd(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& offset,
                   int64_t n, int64_t p) {
  const char* op = "oscqat_C.act_fwd";
  check_cuda(op, x);
  const at::Tensor off = check_act(op, x, scale, offset, n, p);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t N = x.numel();
  if (N == 0) return y;
  const unsigned blocks = static_cast<unsigned>(flat_grid(N));
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (off.defined()) {
      act_fwd_kernel<T, true><<<blocks, THREADS, 0, stream>>>(cptr<T>(x), N, scale.const_data_ptr<float>(),
                                                              off.const_data_ptr<float>(), static_cast<float>(n),
                                                              static_cast<float>(p), mptr<T>(y));
    } else {
      act_fwd_kernel<T, false><<<blocks, THREADS, 0, stream>>>(cptr<T>(x), N, scale.const_data_ptr<float>(), nullptr,
                                                               static_cast<float>(n), static_cast<float>(p),
                                                               mptr<T>(y));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> act_bwd(const at::Tensor& g, const at::Tensor& x,
                                                       const at::Tensor& scale,
                                                       const std::optional<at::Tensor>& offset, int64_t n, int64_t p,
                                                       double grad_scale) {
  const char* op = "oscqat_C.act_bwd";
  check_cuda(op, g);
  check_data(op, "g", g, g.device());
  TORCH_CHECK(x.device() == g.device(), op, ": x is on ", x.device().str(), " but g is on ", g.device().str());
  const at::Tensor off = check_act(op, x, scale, offset, n, p);
  TORCH_CHECK(g.sizes() == x.sizes(), op, ": g has shape ", g.sizes(), " but x has shape ", x.sizes());
  check_grad_scale(op, grad_scale);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor gx = at::empty(x.sizes(), g.options());
  at::Tensor gs = at::empty(scale.sizes(), f32(scale));
  at::Tensor go = at::empty(scale.sizes(), f32(scale));
  const int64_t N = x.numel();
  const int64_t blocks = flat_grid(N);
  at::Tensor ps = at::empty({blocks}, x.options().dtype(at::kDouble));
  at::Tensor po = at::empty({off.defined() ? blocks : 0}, x.options().dtype(at::kDouble));
  dispatch_float(g.scalar_type(), [&](auto gtag) {
    using TG = typename decltype(gtag)::type;
    dispatch_float(x.scalar_type(), [&](auto xtag) {
      using TX = typename decltype(xtag)::type;
      if (off.defined()) {
        act_bwd_kernel<TG, TX, true><<<static_cast<unsigned>(blocks), THREADS, 0, stream>>>(
            cptr<TG>(g), cptr<TX>(x), N, scale.const_data_ptr<float>(), off.const_data_ptr<float>(),
            static_cast<float>(n), static_cast<float>(p), mptr<TG>(gx), ps.mutable_data_ptr<double>(),
            po.mutable_data_ptr<double>());
      } else {
        act_bwd_kernel<TG, TX, false><<<static_cast<unsigned>(blocks), THREADS, 0, stream>>>(
            cptr<TG>(g), cptr<TX>(x), N, scale.const_data_ptr<float>(), nullptr, static_cast<float>(n),
            static_cast<float>(p), mptr<TG>(gx), ps.mutable_data_ptr<double>(), nullptr);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  act_bwd_finish_kernel<<<1, THREADS, 0, stream>>>(ps.const_data_ptr<double>(),
                                                   off.defined() ? po.const_data_ptr<double>() : nullptr, blocks,
                                                   static_cast<float>(grad_scale), gs.mutable_data_ptr<float>(),
                                                   go.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gx, gs, go};
}

}  // namespace cuda
}  // namespace oscqat

TORCH_LIBRARY_IMPL(oscqat_C, CUDA, m) {
  m.impl("weight_fwd", &oscqat::cuda::weight_fwd);
  m.impl("weight_fwd_track", &oscqat::cuda::weight_fwd_track);
  m.impl("weight_bwd", &oscqat::cuda::weight_bwd);
  m.impl("act_fwd", &oscqat::cuda::act_fwd);
  m.impl("act_bwd", &oscqat::cuda::act_bwd);
}
