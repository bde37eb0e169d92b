// oscqat_C::weight_quant: the weight quantizer's forward and backward as one differentiable op, the C++ twin of
// oscqat.ops.WeightQuantFn, for eager mode on the cpp and cuda backends. It calls the same ops (weight_fwd_track
// or weight_fwd, then weight_bwd) through the dispatcher, so its values are theirs bit for bit. What it saves
// is the Python around them: WeightQuantFn's forward and its backward node cost ~80 us per layer and step on
// CPU, as much as the kernels of a 100K-weight layer (MobileNetV2's weight set: 53 layers, 4.3 of 18 ms).
// torch.compile keeps WeightQuantFn, which it traces; this op has no fake implementation on purpose.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace oscqat {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdTrackSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, Tensor&, Tensor&, Tensor&,
                                                        Tensor&, const Tensor&, int64_t, int64_t, double, bool,
                                                        double);
using FwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                          const std::optional<Tensor>&, int64_t, int64_t, bool, double);
using BwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                          const std::optional<Tensor>&, const Tensor&, int64_t, int64_t, double, bool,
                                          double, bool);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

std::optional<Tensor> opt(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }
Tensor get(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

// Inputs: w, scale, prev_int, flags, freq, ema (optional: autograd's input bookkeeping needs a device for every
// tensor it is given, so "none" cannot be an undefined tensor), f_th, then the numbers.
// Tracked when prev_int is given. Outputs: w_hat, D, counts (empty when untracked).
class WeightQuant : public torch::autograd::Function<WeightQuant> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& w, const Tensor& scale,
                               const std::optional<Tensor>& prev_int_, const std::optional<Tensor>& flags_,
                               const std::optional<Tensor>& freq_, const std::optional<Tensor>& ema_,
                               const Tensor& f_th, int64_t n, int64_t p,
                               double momentum, bool damp, double damp_div, double grad_scale,
                               std::optional<double> s_min) {
    // The scale floor (docs/semantics.md): max(s, s_min) forward; the gradient reaches the raw scale unchanged.
    const Tensor s = s_min.has_value() ? scale.clamp_min(*s_min) : scale;
    const Tensor wc = w.contiguous();
    Tensor prev_int = get(prev_int_), flags = get(flags_), freq = get(freq_), ema = get(ema_);
    const bool tracked = prev_int_.has_value();
    Tensor w_hat, d, counts;
    if (tracked) {
      static const auto fwd_track = op_handle<FwdTrackSig>("oscqat_C::weight_fwd_track");
      std::tie(w_hat, d, counts) =
          fwd_track.call(wc, s, prev_int, flags, freq, ema, f_th, n, p, momentum, damp, damp_div);
      // What the op's (a!) annotations promise autograd: a saved state tensor mutated later is caught.
      for (const Tensor* t : {&prev_int, &flags, &freq, &ema}) torch::autograd::impl::bump_version(*t);
    } else {
      static const auto fwd = op_handle<FwdSig>("oscqat_C::weight_fwd");
      std::tie(w_hat, d) = fwd.call(wc, s, flags_, ema_, n, p, damp, damp_div);
      counts = at::empty({0}, w.options().dtype(at::kInt));   // an op cannot return an undefined tensor
    }
    ctx->mark_non_differentiable({counts});
    ctx->save_for_backward({w, s, flags, ema});
    ctx->saved_data["n"] = n;
    ctx->saved_data["p"] = p;
    ctx->saved_data["grad_scale"] = grad_scale;
    ctx->saved_data["damp"] = damp;
    ctx->saved_data["damp_div"] = damp_div;
    ctx->saved_data["tracked"] = tracked;
    return {w_hat, d, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &w = saved[0], &s = saved[1], &flags = saved[2], &ema = saved[3];
    const bool damp = ctx->saved_data["damp"].toBool();
    Tensor g = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(w, at::MemoryFormat::Contiguous);
    Tensor g_d = grads[1].defined() && damp ? grads[1] : at::zeros({}, w.options().dtype(at::kFloat));
    static const auto bwd = op_handle<BwdSig>("oscqat_C::weight_bwd");
    auto [gw, gs] = bwd.call(g, w.contiguous(), s, opt(flags), opt(ema), g_d, ctx->saved_data["n"].toInt(),
                             ctx->saved_data["p"].toInt(), ctx->saved_data["grad_scale"].toDouble(), damp,
                             ctx->saved_data["damp_div"].toDouble(), ctx->saved_data["tracked"].toBool());
    variable_list out(14);
    out[0] = gw;
    out[1] = gs;      // fp32 like the scale (the quantizer keeps its scale in fp32)
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> weight_quant(const Tensor& w, const Tensor& scale,
                                                const std::optional<Tensor>& prev_int,
                                                const std::optional<Tensor>& flags,
                                                const std::optional<Tensor>& freq, const std::optional<Tensor>& ema,
                                                const Tensor& f_th, int64_t n, int64_t p, double momentum, bool damp,
                                                double damp_div, double grad_scale, std::optional<double> s_min,
                                                bool check_finite, const std::optional<Tensor>& weight_ref) {
  if (check_finite || weight_ref.has_value()) {
    // Before any state is written. oscqat/quantizers.py turns these two messages into NonFiniteError and
    // WeightChangedError with the layer's name.
    static const auto check = op_handle<int64_t(const Tensor&, const Tensor&, const std::optional<Tensor>&, bool)>(
        "oscqat_C::check_weight");
    const int64_t bad = check.call(w, scale, weight_ref, check_finite);
    TORCH_CHECK(bad != 1, "oscqat_C.weight_quant: NaN or Inf in the weight or its scale");
    TORCH_CHECK(bad != 2, "oscqat_C.weight_quant: the weight's checksum differs from weight_ref");
  }
  TORCH_CHECK(prev_int.has_value() == freq.has_value(),
              "oscqat_C.weight_quant: prev_int and freq must be given together (tracking needs both)");
  TORCH_CHECK(!prev_int.has_value() || (flags.has_value() && ema.has_value()),
              "oscqat_C.weight_quant: tracking needs flags and ema too");
  auto out = WeightQuant::apply(w, scale, prev_int, flags, freq, ema, f_th, n, p, momentum, damp,
                                damp_div, grad_scale, s_min);
  return {out[0], out[1], out[2]};
}

}  // namespace

// CompositeImplicitAutograd: autograd sees the Function's node, whatever the device of the tensors.
TORCH_LIBRARY_IMPL(oscqat_C, CompositeImplicitAutograd, m) { m.impl("weight_quant", &weight_quant); }

}  // namespace oscqat
