// oscqat_C::weight_quant: the weight quantizer's forward and backward as one differentiable op, the C++ twin of
// oscqat.ops.library.WeightQuantFn, for eager mode on the cpp and cuda backends. It calls the same ops (weight_fwd_track
// or weight_fwd, then weight_bwd) through the dispatcher, so its values are theirs bit for bit. What it saves
// is the Python around them: WeightQuantFn's forward and its backward node cost ~80 us per layer and step on
// CPU, as much as the kernels of a 100K-weight layer (MobileNetV2's weight set: 53 layers, 4.3 of 18 ms).
// torch.compile keeps WeightQuantFn, which it traces; this op has no fake implementation on purpose.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"

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

// One layer's forward (tracked when prev_int is given): w_hat, D, counts (empty when untracked), and the floored
// scale the backward uses. The scale floor (docs/semantics.md): max(s, s_min) forward; the gradient reaches the
// raw scale unchanged.
struct LayerFwd {
  Tensor w_hat, d, counts, s;
};

LayerFwd forward_layer(const Tensor& w, const Tensor& scale, const std::optional<Tensor>& prev_int_,
                       const std::optional<Tensor>& flags_, const std::optional<Tensor>& freq_,
                       const std::optional<Tensor>& ema_, const Tensor& f_th, int64_t n, int64_t p, double momentum,
                       bool damp, double damp_div, std::optional<double> s_min) {
  LayerFwd r;
  r.s = s_min.has_value() ? scale.clamp_min(*s_min) : scale;
  const Tensor wc = w.contiguous();
  if (prev_int_.has_value()) {
    static const auto fwd_track = op_handle<FwdTrackSig>("oscqat_C::weight_fwd_track");
    Tensor prev_int = *prev_int_, flags = get(flags_), freq = *freq_, ema = get(ema_);
    std::tie(r.w_hat, r.d, r.counts) =
        fwd_track.call(wc, r.s, prev_int, flags, freq, ema, f_th, n, p, momentum, damp, damp_div);
    // What the op's (a!) annotations promise autograd: a saved state tensor mutated later is caught.
    for (const Tensor* t : {&prev_int, &flags, &freq, &ema}) torch::autograd::impl::bump_version(*t);
  } else {
    static const auto fwd = op_handle<FwdSig>("oscqat_C::weight_fwd");
    std::tie(r.w_hat, r.d) = fwd.call(wc, r.s, flags_, ema_, n, p, damp, damp_div);
    r.counts = at::empty({0}, w.options().dtype(at::kInt));   // an op cannot return an undefined tensor
  }
  return r;
}

// The upstream gradients of w_hat and D as the backward kernel takes them (undefined: zero).
std::pair<Tensor, Tensor> upstream(const Tensor& g_hat, const Tensor& g_damp, const Tensor& w, bool damp) {
  return {g_hat.defined() ? g_hat.contiguous() : at::zeros_like(w, at::MemoryFormat::Contiguous),
          g_damp.defined() && damp ? g_damp : at::zeros({}, w.options().dtype(at::kFloat))};
}

// One layer's backward: (grad w, grad scale).
std::pair<Tensor, Tensor> backward_layer(const Tensor& g_hat, const Tensor& g_damp, const Tensor& w, const Tensor& s,
                                         const Tensor& flags, const Tensor& ema, int64_t n, int64_t p,
                                         double grad_scale, bool damp, double damp_div, bool tracked) {
  const auto [g, g_d] = upstream(g_hat, g_damp, w, damp);
  static const auto bwd = op_handle<BwdSig>("oscqat_C::weight_bwd");
  auto [gw, gs] = bwd.call(g, w.contiguous(), s, opt(flags), opt(ema), g_d, n, p, grad_scale, damp, damp_div, tracked);
  return {gw, gs};      // gs: fp32 like the scale (the quantizer keeps its scale in fp32)
}

// Inputs: w, scale, prev_int, flags, freq, ema (optional: autograd's input bookkeeping needs a device for every
// tensor it is given, so "none" cannot be an undefined tensor), f_th, then the numbers.
// Tracked when prev_int is given. Outputs: w_hat, D, counts (empty when untracked).
class WeightQuant : public torch::autograd::Function<WeightQuant> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& w, const Tensor& scale,
                               const std::optional<Tensor>& prev_int, const std::optional<Tensor>& flags,
                               const std::optional<Tensor>& freq, const std::optional<Tensor>& ema,
                               const Tensor& f_th, int64_t n, int64_t p,
                               double momentum, bool damp, double damp_div, double grad_scale,
                               std::optional<double> s_min) {
    LayerFwd r = forward_layer(w, scale, prev_int, flags, freq, ema, f_th, n, p, momentum, damp, damp_div, s_min);
    ctx->mark_non_differentiable({r.counts});
    ctx->save_for_backward({w, r.s, get(flags), get(ema)});
    ctx->saved_data["n"] = n;
    ctx->saved_data["p"] = p;
    ctx->saved_data["grad_scale"] = grad_scale;
    ctx->saved_data["damp"] = damp;
    ctx->saved_data["damp_div"] = damp_div;
    ctx->saved_data["tracked"] = prev_int.has_value();
    return {r.w_hat, r.d, r.counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto [gw, gs] = backward_layer(grads[0], grads[1], saved[0], saved[1], saved[2], saved[3],
                                   ctx->saved_data["n"].toInt(), ctx->saved_data["p"].toInt(),
                                   ctx->saved_data["grad_scale"].toDouble(), ctx->saved_data["damp"].toBool(),
                                   ctx->saved_data["damp_div"].toDouble(), ctx->saved_data["tracked"].toBool());
    variable_list out(14);
    out[0] = gw;
    out[1] = gs;
    return out;
  }
};

// check_weight's answer as an error; `layer` >= 0 names the layer of a list. oscqat/nn/quantizers.py turns the two
// messages into NonFiniteError and WeightChangedError with the layer's name.
void raise_check_failure(int64_t bad, int64_t layer) {
  const std::string where = layer >= 0 ? " [layer " + std::to_string(layer) + "]" : "";
  TORCH_CHECK(bad != 1, "oscqat_C.weight_quant: NaN or Inf in the weight or its scale", where);
  TORCH_CHECK(bad != 2, "oscqat_C.weight_quant: the weight's checksum differs from weight_ref", where);
}

// The step's first-forward checks (CPU) before any state is written.
void check_before_writing(const Tensor& w, const Tensor& scale, bool finite, const std::optional<Tensor>& ref) {
  if (!finite && !ref.has_value()) return;
  static const auto check = op_handle<int64_t(const Tensor&, const Tensor&, const std::optional<Tensor>&, bool)>(
      "oscqat_C::check_weight");
  raise_check_failure(check.call(w, scale, ref, finite), -1);
}

std::tuple<Tensor, Tensor, Tensor> weight_quant(const Tensor& w, const Tensor& scale,
                                                const std::optional<Tensor>& prev_int,
                                                const std::optional<Tensor>& flags,
                                                const std::optional<Tensor>& freq, const std::optional<Tensor>& ema,
                                                const Tensor& f_th, int64_t n, int64_t p, double momentum, bool damp,
                                                double damp_div, double grad_scale, std::optional<double> s_min,
                                                bool check_finite, const std::optional<Tensor>& weight_ref) {
  check_before_writing(w, scale, check_finite, weight_ref);
  TORCH_CHECK(prev_int.has_value() == freq.has_value(),
              "oscqat_C.weight_quant: prev_int and freq must be given together (tracking needs both)");
  TORCH_CHECK(!prev_int.has_value() || (flags.has_value() && ema.has_value()),
              "oscqat_C.weight_quant: tracking needs flags and ema too");
  auto out = WeightQuant::apply(w, scale, prev_int, flags, freq, ema, f_th, n, p, momentum, damp,
                                damp_div, grad_scale, s_min);
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------------------------------------- list form
// weight_quant_list: weight_quant of many layers in one call and one autograd node (oscqat.quantize_weights), the
// same values bit for bit. What it saves is the per-layer Python, op binding and autograd node; on the CPU all
// layers' kernels also run in one parallel region (weight_fwd_list, weight_bwd_list), where per layer the threads
// were woken for each kernel. The MobileNetV2 weight-set step on two CPU threads: 16.5 -> 14.0 ms.
using TensorOpts = c10::List<std::optional<Tensor>>;
using FwdListSig = std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>(
    at::TensorList, at::TensorList, const TensorOpts&, const TensorOpts&, const TensorOpts&, const TensorOpts&,
    at::TensorList, at::IntArrayRef, at::IntArrayRef, at::ArrayRef<double>, at::IntArrayRef, at::ArrayRef<double>);
using BwdListSig = std::tuple<std::vector<Tensor>, std::vector<Tensor>>(
    at::TensorList, at::TensorList, at::TensorList, const TensorOpts&, const TensorOpts&, at::TensorList,
    at::IntArrayRef, at::IntArrayRef, at::ArrayRef<double>, at::IntArrayRef, at::ArrayRef<double>, at::IntArrayRef);

struct Layers {     // what autograd must not see as inputs: the state, f_th and the numbers, one entry per layer
  TensorOpts prev_int, flags, freq, ema;
  at::TensorList f_th;
  at::IntArrayRef n, p, damp;
  at::ArrayRef<double> momentum, damp_div, grad_scale, s_min;
};

bool all_cpu(at::TensorList ts) {
  for (const Tensor& t : ts)
    if (!t.device().is_cpu()) return false;
  return true;
}

// Outputs: w_hat of every layer, then D of every layer, then counts (empty when untracked).
class WeightQuantList : public torch::autograd::Function<WeightQuantList> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList ws, at::TensorList scales, const Layers* l) {
    const size_t L = ws.size();
    std::vector<Tensor> w_hat(L), d(L), counts(L), wc(L), s(L);
    for (size_t k = 0; k < L; ++k) {
      s[k] = scales[k].clamp_min(l->s_min[k]);      // the scale floor, as in weight_quant
      wc[k] = ws[k].contiguous();
    }
    if (all_cpu(ws)) {
      static const auto fwd_list = op_handle<FwdListSig>("oscqat_C::weight_fwd_list");
      std::tie(w_hat, d, counts) = fwd_list.call(wc, s, l->prev_int, l->flags, l->freq, l->ema, l->f_th, l->n, l->p,
                                                 l->momentum, l->damp, l->damp_div);
      for (size_t k = 0; k < L; ++k)
        if (l->prev_int.get(k).has_value())
          for (const auto& t : {l->prev_int.get(k), l->flags.get(k), l->freq.get(k), l->ema.get(k)})
            torch::autograd::impl::bump_version(*t);
    } else {
      for (size_t k = 0; k < L; ++k) {
        LayerFwd r = forward_layer(wc[k], s[k], l->prev_int.get(k), l->flags.get(k), l->freq.get(k), l->ema.get(k),
                                   l->f_th[k], l->n[k], l->p[k], l->momentum[k], l->damp[k] != 0, l->damp_div[k],
                                   std::nullopt);
        w_hat[k] = r.w_hat;
        d[k] = r.d;
        counts[k] = r.counts;
      }
    }
    variable_list saved(4 * L);
    std::vector<int64_t> tracked(L);
    for (size_t k = 0; k < L; ++k) {
      saved[4 * k] = ws[k];
      saved[4 * k + 1] = s[k];
      saved[4 * k + 2] = get(l->flags.get(k));
      saved[4 * k + 3] = get(l->ema.get(k));
      tracked[k] = l->prev_int.get(k).has_value();
    }
    ctx->mark_non_differentiable(counts);
    ctx->set_materialize_grads(false);      // tells the backward which layers' outputs no loss used
    ctx->save_for_backward(saved);
    ctx->saved_data["n"] = l->n.vec();
    ctx->saved_data["p"] = l->p.vec();
    ctx->saved_data["grad_scale"] = l->grad_scale.vec();
    ctx->saved_data["damp_div"] = l->damp_div.vec();
    ctx->saved_data["damp"] = l->damp.vec();
    ctx->saved_data["tracked"] = tracked;
    variable_list out;
    out.reserve(3 * L);
    for (const auto* part : {&w_hat, &d, &counts}) out.insert(out.end(), part->begin(), part->end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const auto n = ctx->saved_data["n"].toIntVector(), p = ctx->saved_data["p"].toIntVector();
    const auto grad_scale = ctx->saved_data["grad_scale"].toDoubleVector();
    const auto damp_div = ctx->saved_data["damp_div"].toDoubleVector();
    const auto damp = ctx->saved_data["damp"].toIntVector(), tracked = ctx->saved_data["tracked"].toIntVector();
    const size_t L = n.size();
    variable_list out(2 * L + 1);      // grad of every w, of every scale, none of the layers' description
    std::vector<size_t> ran;            // layers whose outputs a loss used (the others get no gradient)
    for (size_t k = 0; k < L; ++k)
      if (grads[k].defined() || grads[L + k].defined()) ran.push_back(k);
    if (ran.empty()) return out;
    if (!saved[0].device().is_cpu()) {
      for (size_t k : ran) {
        const Tensor* sv = &saved[4 * k];
        std::tie(out[k], out[L + k]) = backward_layer(grads[k], grads[L + k], sv[0], sv[1], sv[2], sv[3], n[k], p[k],
                                                      grad_scale[k], damp[k], damp_div[k], tracked[k]);
      }
      return out;
    }
    std::vector<Tensor> g, w, s, g_d;
    TensorOpts flags, ema;
    std::vector<int64_t> nr, pr, dr, tr;
    std::vector<double> gsr, ddr;
    for (size_t k : ran) {
      const Tensor* sv = &saved[4 * k];
      const auto [gk, g_dk] = upstream(grads[k], grads[L + k], sv[0], damp[k] != 0);
      g.push_back(gk);
      g_d.push_back(g_dk);
      w.push_back(sv[0].contiguous());
      s.push_back(sv[1]);
      flags.push_back(opt(sv[2]));
      ema.push_back(opt(sv[3]));
      nr.push_back(n[k]);
      pr.push_back(p[k]);
      gsr.push_back(grad_scale[k]);
      dr.push_back(damp[k]);
      ddr.push_back(damp_div[k]);
      tr.push_back(tracked[k]);
    }
    static const auto bwd_list = op_handle<BwdListSig>("oscqat_C::weight_bwd_list");
    auto [gw, gs] = bwd_list.call(g, w, s, flags, ema, g_d, nr, pr, gsr, dr, ddr, tr);
    for (size_t i = 0; i < ran.size(); ++i) {
      out[ran[i]] = gw[i];
      out[L + ran[i]] = gs[i];
    }
    return out;
  }
};

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> weight_quant_list(
    at::TensorList w, at::TensorList scale, const TensorOpts& prev_int, const TensorOpts& flags,
    const TensorOpts& freq, const TensorOpts& ema, at::TensorList f_th, at::IntArrayRef n, at::IntArrayRef p,
    at::ArrayRef<double> momentum, at::IntArrayRef damp, at::ArrayRef<double> damp_div,
    at::ArrayRef<double> grad_scale, at::ArrayRef<double> s_min, at::IntArrayRef check_finite,
    const TensorOpts& weight_ref) {
  const size_t L = w.size();
  const char* op = "oscqat_C.weight_quant_list";
  check_list_lengths(op, L, {scale.size(), prev_int.size(), flags.size(), freq.size(), ema.size(), f_th.size(),
                             n.size(), p.size(), momentum.size(), damp.size(), damp_div.size(), grad_scale.size(),
                             s_min.size(), check_finite.size(), weight_ref.size()});
  for (size_t k = 0; k < L; ++k) {
    const bool pi = prev_int.get(k).has_value();
    TORCH_CHECK(pi == freq.get(k).has_value() && (!pi || (flags.get(k).has_value() && ema.get(k).has_value())), op,
                ": layer ", k, ": tracking needs prev_int, flags, freq and ema");
  }
  // Every layer's checks before any layer's state is written (a failed step leaves all of them as they were), in
  // one pass over all the weights that need one (CPU).
  std::vector<int64_t> which;
  for (size_t k = 0; k < L; ++k)
    if (check_finite[k] || weight_ref.get(k).has_value()) which.push_back(static_cast<int64_t>(k));
  if (!which.empty()) {
    std::vector<Tensor> cw, cs;
    TensorOpts cref;
    std::vector<int64_t> cfin;
    for (int64_t k : which) {
      cw.push_back(w[k]);
      cs.push_back(scale[k]);
      cref.push_back(weight_ref.get(k));
      cfin.push_back(check_finite[k]);
    }
    static const auto check = op_handle<std::vector<int64_t>(at::TensorList, at::TensorList, const TensorOpts&,
                                                             at::IntArrayRef)>("oscqat_C::check_weight_list");
    const std::vector<int64_t> bad = check.call(cw, cs, cref, cfin);
    for (size_t i = 0; i < which.size(); ++i) raise_check_failure(bad[i], which[i]);
  }
  const Layers layers{prev_int, flags, freq, ema, f_th, n, p, damp, momentum, damp_div, grad_scale, s_min};
  variable_list out = WeightQuantList::apply(w, scale, &layers);
  return {std::vector<Tensor>(out.begin(), out.begin() + L), std::vector<Tensor>(out.begin() + L, out.begin() + 2 * L),
          std::vector<Tensor>(out.begin() + 2 * L, out.end())};
}

}  // namespace

// CompositeImplicitAutograd: autograd sees the Function's node, whatever the device of the tensors.
TORCH_LIBRARY_IMPL(oscqat_C, CompositeImplicitAutograd, m) {
  m.impl("weight_quant", &weight_quant);
  m.impl("weight_quant_list", &weight_quant_list);
}

}  // namespace oscqat
