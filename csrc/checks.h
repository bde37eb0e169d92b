// Input validation shared by the CPU and CUDA entry points of oscqat._C (docs/semantics.md).
// Every failure is a TORCH_CHECK with a one-line message naming the op and the argument; it reaches Python as
// a RuntimeError. Host-only: no CUDA headers, so the CUDA glue can include it too.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>

namespace oscqat {

using at::Tensor;

inline std::string device_str(const Tensor& t) { return t.device().str(); }

// The list forms of the ops: every list holds one entry per layer.
inline void check_list_lengths(const char* op, size_t layers, std::initializer_list<size_t> lengths) {
  for (size_t len : lengths)
    TORCH_CHECK(len == layers, op, ": every list needs one entry per layer (", layers, " weights, a list of ", len,
                ")");
}

// torch's names for dtypes (torch.int8, not ATen's "Char").
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline bool is_float_dtype(const Tensor& t) {
  auto d = t.scalar_type();
  return d == at::kFloat || d == at::kBFloat16 || d == at::kHalf;
}

// A data tensor (w, g, x): fp32/bf16/fp16, dense, on `dev`.
inline void check_data(const char* op, const char* name, const Tensor& t, const at::Device& dev) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(is_float_dtype(t), op, ": ", name, " must be float32, bfloat16 or float16, got ",
              dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == dev, op, ": ", name, " is on ", device_str(t), " but the first input is on ", dev.str());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous() first)");
}

// A 0-d/1-element control tensor (f_th, grad_d, offset): any float dtype, on `dev` or a CPU scalar.
inline void check_scalar(const char* op, const char* name, const Tensor& t, const at::Device& dev,
                         bool cpu_ok = true) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must hold exactly one value, got shape ", t.sizes());
  TORCH_CHECK(is_float_dtype(t) || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be a floating-point tensor, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == dev || (cpu_ok && t.device().is_cpu()), op, ": ", name, " is on ", device_str(t),
              " but the first input is on ", dev.str());
}

// The scale: fp32, dense, C values with C dividing numel. Returns C.
inline int64_t check_scale(const char* op, const Tensor& scale, const Tensor& w, bool single) {
  TORCH_CHECK(scale.defined(), op, ": scale is undefined");
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ",
              dtype_name(scale.scalar_type()));
  TORCH_CHECK(scale.device() == w.device(), op, ": scale is on ", device_str(scale), " but the first input is on ",
              device_str(w));
  TORCH_CHECK(scale.is_contiguous(), op, ": scale must be contiguous");
  const int64_t C = scale.numel();
  TORCH_CHECK(C >= 1, op, ": scale is empty");
  if (single) {
    TORCH_CHECK(C == 1, op, ": the activation scale must hold one value, got ", C);
  } else {
    TORCH_CHECK(w.numel() % C == 0, op, ": scale has ", C, " values, which does not divide the ", w.numel(),
                " elements of w (per-channel scales run along dim 0)");
  }
  return C;
}

// Per-weight state buffer: given dtype, w's shape, w's device, dense.
inline void check_state(const char* op, const char* name, const Tensor& t, const Tensor& w, at::ScalarType dt) {
  TORCH_CHECK(t.defined(), op, ": state ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == dt, op, ": state ", name, " must be ", dtype_name(dt), ", got ",
              dtype_name(t.scalar_type()));
  TORCH_CHECK(t.sizes() == w.sizes(), op, ": state ", name, " has shape ", t.sizes(), " but w has shape ",
              w.sizes());
  TORCH_CHECK(t.device() == w.device(), op, ": state ", name, " is on ", device_str(t), " but w is on ", device_str(w));
  TORCH_CHECK(t.is_contiguous(), op, ": state ", name, " must be contiguous");
}

inline bool check_opt_state(const char* op, const std::optional<Tensor>& flags, const std::optional<Tensor>& ema,
                            const Tensor& w) {
  const bool hf = flags.has_value() && flags->defined(), he = ema.has_value() && ema->defined();
  TORCH_CHECK(hf == he, op, ": flags and ema must be given together (got ", hf ? "flags" : "ema", " only)");
  if (hf) {
    check_state(op, "flags", *flags, w, at::kChar);
    check_state(op, "ema", *ema, w, at::kFloat);
  }
  return hf;
}

// Integer range [n, p]. Weights keep their integers in int8 state, so -128 <= n < p <= 127; activations may
// be unsigned 8-bit (p <= 255).
inline void check_range(const char* op, int64_t n, int64_t p, bool weight) {
  const int64_t hi = weight ? 127 : 255;
  TORCH_CHECK(n >= -128 && n < p && p <= hi, op, ": integer range [n, p] = [", n, ", ", p,
              "] is out of range; need -128 <= n < p <= ", hi, " (2..8 bits)");
}

inline void check_div(const char* op, bool damp, double damp_div) {
  TORCH_CHECK(!damp || (std::isfinite(damp_div) && damp_div > 0), op,
              ": damp_div must be positive and finite, got ", damp_div);
}

inline void check_grad_scale(const char* op, double gs) {
  TORCH_CHECK(std::isfinite(gs), op, ": grad_scale must be finite, got ", gs);
}

inline void check_momentum(const char* op, double m) {
  TORCH_CHECK(std::isfinite(m) && m >= 0.0 && m <= 1.0, op, ": momentum must be in [0, 1], got ", m);
}

// Each weight op's arguments, checked in one place for both devices (the device is the caller's check).
struct WeightArgs {
  int64_t channels;
  bool state;
};

inline WeightArgs check_weight_fwd_args(const char* op, const Tensor& w, const Tensor& scale,
                                        const std::optional<Tensor>& flags, const std::optional<Tensor>& ema,
                                        int64_t n, int64_t p, bool damp, double damp_div) {
  check_data(op, "w", w, w.device());
  const int64_t C = check_scale(op, scale, w, false);
  const bool state = check_opt_state(op, flags, ema, w);
  check_range(op, n, p, true);
  check_div(op, damp, damp_div);
  return {C, state};
}

inline int64_t check_weight_fwd_track_args(const char* op, const Tensor& w, const Tensor& scale,
                                           const Tensor& prev_int, const Tensor& flags, const Tensor& freq,
                                           const Tensor& ema, const Tensor& f_th, int64_t n, int64_t p,
                                           double momentum, bool damp, double damp_div) {
  check_data(op, "w", w, w.device());
  const int64_t C = check_scale(op, scale, w, false);
  check_state(op, "prev_int", prev_int, w, at::kChar);
  check_state(op, "flags", flags, w, at::kChar);
  check_state(op, "freq", freq, w, at::kFloat);
  check_state(op, "ema", ema, w, at::kFloat);
  check_scalar(op, "f_th", f_th, w.device());
  check_range(op, n, p, true);
  check_momentum(op, momentum);
  check_div(op, damp, damp_div);
  return C;
}

inline WeightArgs check_weight_bwd_args(const char* op, const Tensor& g, const Tensor& w, const Tensor& scale,
                                        const std::optional<Tensor>& flags, const std::optional<Tensor>& ema,
                                        const Tensor& grad_d, int64_t n, int64_t p, double grad_scale, bool damp,
                                        double damp_div) {
  check_data(op, "g", g, g.device());
  check_data(op, "w", w, g.device());
  TORCH_CHECK(g.sizes() == w.sizes(), op, ": g has shape ", g.sizes(), " but w has shape ", w.sizes());
  const int64_t C = check_scale(op, scale, w, false);
  const bool state = check_opt_state(op, flags, ema, w);
  check_scalar(op, "grad_d", grad_d, w.device());
  check_range(op, n, p, true);
  check_grad_scale(op, grad_scale);
  check_div(op, damp, damp_div);
  return {C, state};
}

}  // namespace oscqat
