// CUDA kernels of oscqat's op contract (docs/semantics.md): pure device code that needs only the CUDA toolkit's
// headers (no torch), so that csrc/check_cuda_compile.sh can compile it on machines whose torch has no CUDA.
// The ATen glue that launches these kernels is csrc/cuda/quant_cuda.cu.
//
// Bit-exactness: every product and sum is an explicitly rounded __fmul_rn / __fadd_rn / __fsub_rn (and the
// build passes --fmad=false as well), r = __fdiv_rn(1, s) (IEEE division), round-half-to-even is rintf.
// Determinism: grid sizes depend only on the tensor sizes; each block reduces its own elements in a fixed
// tree (fp64 for float sums) and writes one partial; a second kernel adds the partials in a fixed order.
// No float atomics. Indices are int64 throughout; all loops are grid-stride loops.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../flags.h"

namespace oscqat {
namespace cuda {

constexpr int THREADS = 256;           // threads per block (a multiple of 32)
constexpr int64_t ELEMS_PER_THREAD = 4;  // elements per thread a grid is sized for
constexpr int64_t MAX_BLOCKS_X = 1024;   // blocks along the elements of one channel (or of the tensor)
constexpr int64_t MAX_BLOCKS_Y = 4096;   // blocks along channels (grid-stride beyond)

// ------------------------------------------------------------------------------------------ element helpers
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float rne(float x) { return rintf(x); }  // cvt.rni: round half to even
// torch.clamp: min(max(v, lo), hi), NaN propagates.
__device__ __forceinline__ float clampf(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return hi < v ? hi : v;
}

// ------------------------------------------------------------------------------------------ reductions
template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block in a fixed order; the result is valid in thread 0. Every thread of the block must call it.
template <typename V>
__device__ V block_sum(V v) {
  __shared__ V sh[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  v = (wid == 0 && lane < nw) ? sh[lane] : V(0);
  if (wid == 0) v = warp_sum(v);
  __syncthreads();  // sh may be reused by the next call
  return v;
}

// Sum of parts[first + k * stride], k < count, in a fixed order, by one block; valid in thread 0.
template <typename V>
__device__ V block_sum_strided(const V* __restrict__ parts, int64_t first, int64_t count, int64_t stride) {
  V acc = V(0);
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) acc += parts[first + k * stride];
  return block_sum(acc);
}

__device__ __forceinline__ float read_scalar(const float* p, float fallback) { return p ? *p : fallback; }

// ------------------------------------------------------------------------------------------ weight forward
// Grid (gx, gy): blockIdx.y walks channels (grid-stride), blockIdx.x the elements of a channel. Untracked
// (TRACK = false): flags/ema may be null (no state). Tracked: all four state buffers, updated in place.
// Partials: dpart (sum of err^2) and cpart (changes, oscillations) per block, index by * gx + bx.
template <typename T, bool TRACK>
__global__ void weight_fwd_kernel(const T* __restrict__ w, const float* __restrict__ scale, int64_t C,
                                  int64_t per_ch, float nf, float pf, bool damp, int8_t* __restrict__ prev,
                                  int8_t* __restrict__ flags, float* __restrict__ freq, float* __restrict__ ema,
                                  const float* __restrict__ fth_ptr, float fth_val, float m, float om,
                                  T* __restrict__ out, double* __restrict__ dpart, long long* __restrict__ cpart) {
  double dsum = 0.0;
  long long nsw = 0, nosc = 0;
  float fth = 0.f;
  if (TRACK) {
    const float v = read_scalar(fth_ptr, fth_val);
    fth = v > 0.f ? v : __int_as_float(0x7f800000);  // f_th <= 0: no freezing (freq > inf never holds)
  }
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    const float s = scale[c];
    const float r = __fdiv_rn(1.0f, s);
    const float lo = mul(s, nf), hi = mul(s, pf);
    const int64_t base = c * per_ch;
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < per_ch; k += stride) {
      const int64_t i = base + k;
      const float wf = to_f(w[i]);
      const float wi = clampf(rne(mul(wf, r)), nf, pf);
      float weff = wi;
      if (TRACK) {
        const int f = flags[i];
        const bool un = flag_uninit(f);
        const int fz = flag_fz(f);
        const int ld = flag_last_dir(f);
        const bool frozen = fz >= 1;
        const float e = ema[i];
        weff = frozen ? e : wi;
        const float delta = sub(weff, (float)prev[i]);
        const bool sw = (delta != 0.f) && !un;
        const int dir = (delta > 0.f) - (delta < 0.f);
        const bool osc = sw && dir == -ld;
        const float nfq = un ? 0.f : add(mul(om, freq[i]), osc ? m : 0.f);  // product, then sum
        const int nd = sw ? dir : ld;
        const bool newly = (nfq > fth) && fz == 0 && !un;
        float ne;
        if (un) ne = weff;
        else if (newly) ne = rne(e);                          // frozen_int, from the EMA before this step
        else if (frozen) ne = e;
        else ne = add(mul(om, e), mul(m, weff));             // three roundings
        const int nfz = newly ? 2 : (frozen ? 1 : 0);
        prev[i] = (int8_t)(int)weff;
        flags[i] = (int8_t)(un ? 0 : nd + 4 * nfz);
        freq[i] = nfq;
        ema[i] = ne;
        nsw += sw;
        nosc += osc;
      } else if (flags != nullptr) {
        if (flag_frozen(flags[i])) weff = ema[i];
      }
      const float q = mul(s, weff);
      out[i] = from_f<T>(q);
      if (damp) {
        const float d = sub(q, clampf(wf, lo, hi));
        dsum += (double)mul(d, d);
      }
    }
  }
  const int64_t part = (int64_t)blockIdx.y * gridDim.x + blockIdx.x;
  dsum = block_sum(dsum);
  if (TRACK) {
    nsw = block_sum(nsw);
    nosc = block_sum(nosc);
  }
  if (threadIdx.x == 0) {
    dpart[part] = dsum;
    if (TRACK) {
      cpart[2 * part] = nsw;
      cpart[2 * part + 1] = nosc;
    }
  }
}

// One block: D = fp32(sum of partials) / div (IEEE division), counts = int32 sums.
__global__ void weight_fwd_finish_kernel(const double* __restrict__ dpart, const long long* __restrict__ cpart,
                                         int64_t nparts, bool damp, float divf, float* __restrict__ d_out,
                                         int* __restrict__ counts) {
  const double d = block_sum_strided(dpart, 0, nparts, 1);
  long long nsw = 0, nosc = 0;
  if (counts != nullptr) {
    nsw = block_sum_strided(cpart, 0, nparts, 2);
    nosc = block_sum_strided(cpart, 1, nparts, 2);
  }
  if (threadIdx.x == 0) {
    *d_out = damp ? __fdiv_rn((float)d, divf) : 0.f;
    if (counts != nullptr) {
      counts[0] = (int)nsw;
      counts[1] = (int)nosc;
    }
  }
}

// ------------------------------------------------------------------------------------------ weight backward
// Same grid as the forward. Partial of dL/ds per (channel, bx): part[c * gx + bx].
template <typename TG, typename TW>
__global__ void weight_bwd_kernel(const TG* __restrict__ g, const TW* __restrict__ w, const float* __restrict__ scale,
                                  int64_t C, int64_t per_ch, float nf, float pf, const int8_t* __restrict__ flags,
                                  const float* __restrict__ ema, bool tracked, bool damp,
                                  const float* __restrict__ gd_ptr, float gd_val, float divf, TG* __restrict__ gw,
                                  double* __restrict__ part) {
  // coef = 2 * gD / div: one multiply by 2, one IEEE division
  const float coef = damp ? __fdiv_rn(mul(2.0f, read_scalar(gd_ptr, gd_val)), divf) : 0.f;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    const float s = scale[c];
    const float r = __fdiv_rn(1.0f, s);
    const float lo = mul(s, nf), hi = mul(s, pf);
    const int64_t base = c * per_ch;
    double acc = 0.0;
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < per_ch; k += stride) {
      const int64_t i = base + k;
      const float wf = to_f(w[i]), gf = to_f(g[i]);
      const float x = mul(wf, r);
      const float R = rne(x);
      const bool inr = R >= nf && R <= pf;
      const float wi = clampf(R, nf, pf);
      float weff = wi;
      bool mask = inr;
      if (flags != nullptr) {
        const int f = flags[i];
        const bool frozen = tracked ? flag_frozen_tracked(f) : flag_frozen(f);
        if (frozen) weff = ema[i];
        mask = inr && !frozen;
      }
      const float mf = mask ? 1.f : 0.f;
      float gv = mul(gf, mf);
      if (damp) {
        const float inside = (wf >= lo && wf <= hi) ? 1.f : 0.f;
        gv = add(gv, mul(mul(coef, sub(clampf(wf, lo, hi), mul(s, weff))), inside));
      }
      gw[i] = from_f<TG>(gv);
      acc += (double)mul(gf, sub(weff, mul(x, mf)));
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) part[c * gridDim.x + blockIdx.x] = acc;
  }
}

// Block b handles channels b, b + gridDim.x, ...: gs[c] = fp32(sum of its nx partials) * grad_scale.
__global__ void weight_bwd_finish_kernel(const double* __restrict__ part, int64_t C, int64_t nx, float gsc,
                                         float* __restrict__ gs) {
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    const double v = block_sum_strided(part, c * nx, nx, 1);
    if (threadIdx.x == 0) gs[c] = mul((float)v, gsc);
  }
}

// ------------------------------------------------------------------------------------------ activations
template <typename T, bool OFF>
__global__ void act_fwd_kernel(const T* __restrict__ x, int64_t N, const float* __restrict__ scale,
                               const float* __restrict__ offset, float nf, float pf, T* __restrict__ y) {
  const float s = *scale;
  const float r = __fdiv_rn(1.0f, s);
  const float o = OFF ? *offset : 0.f;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += (int64_t)gridDim.x * blockDim.x) {
    const float xv = to_f(x[i]);
    const float xs = OFF ? mul(sub(xv, o), r) : mul(xv, r);
    const float q = clampf(rne(xs), nf, pf);
    float v = mul(q, s);
    if (OFF) v = add(v, o);
    y[i] = from_f<T>(v);
  }
}

template <typename TG, typename TX, bool OFF>
__global__ void act_bwd_kernel(const TG* __restrict__ g, const TX* __restrict__ x, int64_t N,
                               const float* __restrict__ scale, const float* __restrict__ offset, float nf, float pf,
                               TG* __restrict__ gx, double* __restrict__ ps, double* __restrict__ po) {
  const float s = *scale;
  const float r = __fdiv_rn(1.0f, s);
  const float o = OFF ? *offset : 0.f;
  double as = 0.0, ao = 0.0;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += (int64_t)gridDim.x * blockDim.x) {
    const float gf = to_f(g[i]), xv = to_f(x[i]);
    const float xs = OFF ? mul(sub(xv, o), r) : mul(xv, r);
    const float R = rne(xs);
    const bool inr = R >= nf && R <= pf;
    const float q = clampf(R, nf, pf);
    const float mf = inr ? 1.f : 0.f;
    gx[i] = from_f<TG>(mul(gf, mf));
    as += (double)mul(gf, sub(q, mul(xs, mf)));
    if (OFF) ao += (double)mul(gf, inr ? 0.f : 1.f);
  }
  as = block_sum(as);
  if (OFF) ao = block_sum(ao);
  if (threadIdx.x == 0) {
    ps[blockIdx.x] = as;
    if (OFF) po[blockIdx.x] = ao;
  }
}

// One block: gs = fp32(sum ps) * grad_scale; go likewise (0 without an offset).
__global__ void act_bwd_finish_kernel(const double* __restrict__ ps, const double* __restrict__ po, int64_t nparts,
                                      float gsc, float* __restrict__ gs, float* __restrict__ go) {
  const double vs = block_sum_strided(ps, 0, nparts, 1);
  double vo = 0.0;
  if (po != nullptr) vo = block_sum_strided(po, 0, nparts, 1);
  if (threadIdx.x == 0) {
    *gs = mul((float)vs, gsc);
    *go = po != nullptr ? mul((float)vo, gsc) : 0.f;
  }
}

// ------------------------------------------------------------------------------------------ launch geometry
// Functions of the sizes only (never of the device), so partials and their order are fixed.
struct Grid2 {
  int64_t gx, gy;
};

inline Grid2 weight_grid(int64_t C, int64_t per_ch) {
  const int64_t gy = C < MAX_BLOCKS_Y ? C : MAX_BLOCKS_Y;
  int64_t gx = (per_ch + THREADS * ELEMS_PER_THREAD - 1) / (THREADS * ELEMS_PER_THREAD);
  const int64_t cap = MAX_BLOCKS_X / gy > 0 ? MAX_BLOCKS_X / gy : 1;  // at most ~1024 blocks in all
  gx = gx < cap ? gx : cap;
  return {gx > 0 ? gx : 1, gy > 0 ? gy : 1};
}

inline int64_t flat_grid(int64_t N) {
  int64_t b = (N + THREADS * ELEMS_PER_THREAD - 1) / (THREADS * ELEMS_PER_THREAD);
  b = b < MAX_BLOCKS_X ? b : MAX_BLOCKS_X;
  return b > 0 ? b : 1;
}

}  // namespace cuda
}  // namespace oscqat
