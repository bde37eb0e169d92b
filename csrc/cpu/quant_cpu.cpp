// CPU kernels of oscqat's op contract (docs/semantics.md), registered for the CPU dispatch key.
//
// Each op is one fused pass over the tensor. Work is cut into fixed tasks -- (channel, block of at most BLOCK
// elements of that channel) -- independent of the thread count; at::parallel_for runs whole tasks, each task
// writes its own partial sums, and the partials are added in task order afterwards. So every result is the
// same, bit for bit, whatever the number of threads. Threads are used only from 2^15 elements per thread up:
// waking OpenMP threads costs more than it saves below that, and far more on a machine whose cores are busy.
//
// Bit-exactness: arithmetic is fp32 in the order of the semantics; this file is compiled with
// -ffp-contract=off (no fused multiply-add) and without -ffast-math; r = 1.0f / s is an IEEE division;
// round-half-to-even is the exact "add and subtract 2^23" form below (the rounding mode is the default one).
// The inner loops are branch-free so that the compiler vectorises them; bf16/fp16 blocks are widened into a
// float buffer first and rounded back (to nearest even, as ATen does) at the end, except that the activation
// cores convert bf16 themselves, element by element (same conversions, same bits).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../checks.h"
#include "cores.h"

namespace oscqat {
namespace cpu {

constexpr int64_t BLOCK = 1024;      // elements per task (at most); fixes the summation order
constexpr int64_t GRAIN_ELEMS = 1 << 15;  // elements per thread, at least: below, no threads are woken
constexpr int64_t SUB = 256;         // elements per pass of the tracked core (its buffers stay in L1)

// ------------------------------------------------------------------------------------------ dtype plumbing
// A core reads and writes elements of type U: the tensor's own type T when U == T, else (T narrower than the
// float U) a block widened into a float buffer first and narrowed back after. bf16/fp16 blocks are widened and
// narrowed by the ISA build's own loops (K::widen, K::narrow): compiled here, at the baseline ISA, they ran 16
// bytes at a time and made the bf16 rows slower than inductor's.
template <typename K, typename T, typename U = float>
static inline const U* load_block(const T* __restrict src, int64_t len, float* __restrict buf) {
  if constexpr (std::is_same_v<T, U>) {
    return src;
  } else {
    K::widen(len, src, buf);
    return buf;
  }
}

template <typename T, typename U = float>
static inline U* out_block(T* dst, float* buf) {
  if constexpr (std::is_same_v<T, U>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename K, typename T, typename U = float>
static inline void store_block(const U* __restrict buf, int64_t len, T* __restrict dst) {
  if constexpr (!std::is_same_v<T, U>) K::narrow(len, buf, dst);
}

// The activation cores convert bf16 in their own loop (a shift in, a rounding add out; it vectorises, and saves
// the buffer passes: ~20% on the bf16 activation rows). fp16's conversions vectorise poorly inside a core (10-30%
// slower there than in K::widen / K::narrow), so fp16 still goes through a float buffer.
template <typename T>
using act_io_t = std::conditional_t<std::is_same_v<T, c10::Half>, float, T>;

template <typename F>
static void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "oscqat_C: unsupported dtype ", t);
  }
}

template <typename F>
static void dispatch_bool(bool b, F&& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

// Tasks: channel c, block b of that channel.
struct Split {
  int64_t C, per_ch, nb;
  Split(int64_t N, int64_t C_) : C(C_), per_ch(N / C_), nb((N / C_ + BLOCK - 1) / BLOCK) {}
  int64_t tasks() const { return C * nb; }
  int64_t channel(int64_t t) const { return t / nb; }
  int64_t begin(int64_t t) const { return (t / nb) * per_ch + (t % nb) * BLOCK; }
  int64_t len(int64_t t) const { return std::min(BLOCK, per_ch - (t % nb) * BLOCK); }
  int64_t grain() const { return std::max<int64_t>(1, GRAIN_ELEMS / std::max<int64_t>(1, std::min(per_ch, BLOCK))); }
};

// ------------------------------------------------------------------------------------------ helpers
static float scalar_value(const at::Tensor& t) {
  // 0-d control tensors (f_th, grad_d, offset) on the CPU: read directly, as fp32.
  switch (t.scalar_type()) {
    case at::kFloat: return *t.const_data_ptr<float>();
    case at::kDouble: return static_cast<float>(*t.const_data_ptr<double>());
    case at::kBFloat16: return static_cast<float>(*t.const_data_ptr<c10::BFloat16>());
    case at::kHalf: return static_cast<float>(*t.const_data_ptr<c10::Half>());
    default: TORCH_CHECK(false, "oscqat_C: unsupported scalar dtype ", t.scalar_type());
  }
}

static void check_cpu(const char* op, const at::Tensor& first) {
  TORCH_CHECK(first.device().is_cpu(), op, ": the CPU kernel got a tensor on ", first.device().str());
}

static at::Tensor f32_scalar(float v) {
  at::Tensor t = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  *t.mutable_data_ptr<float>() = v;
  return t;
}

// A big output is a fresh mmap (glibc maps every block of 32 MB or more), and its first touch costs one page fault
// per 4 KiB: a 64 MB output took ~35 ms of faults, more than the op's own work at 1 thread. Transparent huge
// pages (where the system's THP mode is "madvise" or "always") cut that to ~6 ms; c10 does the same for every
// allocation under THP_MEM_ALLOC_ENABLE. Only the 2 MiB-aligned interior is advised, so no memory is added, and
// the advice is best effort: a failure changes nothing. Below 16 MB the block is often reused heap memory,
// already mapped, where the advice would gain nothing.
constexpr size_t HUGE_PAGE = size_t{1} << 21;
constexpr size_t HUGE_OUT_BYTES = size_t{1} << 24;

static at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (t.nbytes() >= HUGE_OUT_BYTES) {
    const uintptr_t b = reinterpret_cast<uintptr_t>(t.data_ptr()), e = b + t.nbytes();
    const uintptr_t lo = (b + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1), hi = e & ~(HUGE_PAGE - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return t;
}

static double sum_partials(const std::vector<double>& v, int64_t begin, int64_t end) {
  double acc = 0;
  for (int64_t i = begin; i < end; ++i) acc += v[i];
  return acc;
}

// ------------------------------------------------------------------------------------------ jobs
// One weight op on one tensor: its tasks and what a range of them does. A task writes only its own elements and
// its own partial sums, which the op reduces in task order at the end, so any split of the tasks over threads,
// and any grouping with other tensors' tasks (run_jobs), gives the same bits.
struct Job {
  Split sp;
  std::function<void(int64_t, int64_t)> run;  // tasks [t0, t1)
};

// The first task of `sp` that starts at or after element e (0 <= e <= numel).
static int64_t task_at(const Split& sp, int64_t e) {
  const int64_t c = e / sp.per_ch, r = e % sp.per_ch;
  return c * sp.nb + std::min(sp.nb, (r + BLOCK - 1) / BLOCK);
}

// The jobs in one parallel region: the threads share out the elements of all of them (a task goes to the thread
// whose share holds its first element). A weight set's 53 layers then wake the threads once, not 53 times, and
// its small layers no longer run on one thread while the others wait.
static void run_jobs(const std::vector<Job>& all) {
  std::vector<const Job*> jobs;
  for (const Job& j : all)
    if (j.sp.tasks() > 0) jobs.push_back(&j);
  if (jobs.size() == 1) {
    at::parallel_for(0, jobs[0]->sp.tasks(), jobs[0]->sp.grain(), jobs[0]->run);
    return;
  }
  std::vector<int64_t> first(jobs.size() + 1, 0);  // each job's first element, numbering all jobs' elements
  for (size_t k = 0; k < jobs.size(); ++k) first[k + 1] = first[k] + jobs[k]->sp.C * jobs[k]->sp.per_ch;
  at::parallel_for(0, first.back(), GRAIN_ELEMS, [&](int64_t e0, int64_t e1) {
    size_t k = std::upper_bound(first.begin(), first.end(), e0) - first.begin() - 1;
    for (; k < jobs.size() && first[k] < e1; ++k) {
      const Split& sp = jobs[k]->sp;
      const int64_t t0 = task_at(sp, std::max<int64_t>(e0 - first[k], 0));
      const int64_t t1 = task_at(sp, std::min(e1, first[k + 1]) - first[k]);
      if (t1 > t0) jobs[k]->run(t0, t1);
    }
  });
}

// A weight op's job: its split and its run(t0, t1). `op` must outlive the job.
template <typename Op>
static Job job_of(Op& op) {
  return {op.sp, [&op](int64_t t0, int64_t t1) { op.run(t0, t1); }};
}

// ------------------------------------------------------------------------------------------ weight ops
// Each op as a job (the tasks) and a result (the reductions), for the single-tensor ops and their list forms.
struct WeightFwd {
  at::Tensor w, scale, out;
  std::optional<at::Tensor> flags, ema;
  bool state, damp;
  float nf, pf, damp_div;
  Split sp;
  std::vector<double> dpart;

  WeightFwd(const char* op, const at::Tensor& w_, const at::Tensor& scale_, const std::optional<at::Tensor>& flags_,
            const std::optional<at::Tensor>& ema_, int64_t n, int64_t p, bool damp_, double damp_div_)
      : w(w_), scale(scale_), flags(flags_), ema(ema_), damp(damp_), nf(static_cast<float>(n)),
        pf(static_cast<float>(p)), damp_div(static_cast<float>(damp_div_)), sp(1, 1) {
    check_cpu(op, w);
    const WeightArgs args = check_weight_fwd_args(op, w, scale, flags, ema, n, p, damp, damp_div_);
    state = args.state;
    out = empty_output(w.sizes(), w.options());
    sp = Split(w.numel(), args.channels);
    dpart.resize(damp ? sp.tasks() : 0);
  }

  void run(int64_t t0, int64_t t1) {
    // Locals, not members: the int8 state stores may alias any member, which would reload them per task.
    const Split sp = this->sp;
    double* const parts = dpart.data();
    const float* sc = scale.const_data_ptr<float>();
    const int8_t* fl = state ? flags->const_data_ptr<int8_t>() : nullptr;
    const float* em = state ? ema->const_data_ptr<float>() : nullptr;
    with_isa([&](auto isa) {
      using K = decltype(isa);
      dispatch_float(w.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        const T* wp = w.const_data_ptr<T>();
        T* op_ = out.mutable_data_ptr<T>();
        dispatch_bool(state, [&](auto ST) {
          dispatch_bool(damp, [&](auto DA) {
            float wbuf[BLOCK], obuf[BLOCK];
            for (int64_t t = t0; t < t1; ++t) {
              const int64_t b = sp.begin(t), len = sp.len(t);
              const float s = sc[sp.channel(t)], r = 1.0f / s;
              const float* wf = load_block<K, T>(wp + b, len, wbuf);
              float* o = out_block<T>(op_ + b, obuf);
              float acc[K::LANES] = {};
              K::template wfwd_core<decltype(ST)::value, decltype(DA)::value>(
                  len, wf, s, r, nf, pf, state ? fl + b : nullptr, state ? em + b : nullptr, o, acc);
              store_block<K, T>(o, len, op_ + b);
              if constexpr (decltype(DA)::value) parts[t] = K::lanes_total(acc);
            }
          });
        });
      });
    });
  }

  float d() const { return damp ? static_cast<float>(sum_partials(dpart, 0, sp.tasks())) / damp_div : 0.f; }
};

struct WeightFwdTrack {
  at::Tensor w, scale, prev_int, flags, freq, ema, out;
  bool damp;
  float nf, pf, m, om, fth, damp_div;
  Split sp;
  std::vector<double> dpart;
  std::vector<int64_t> cpart;

  WeightFwdTrack(const char* op, const at::Tensor& w_, const at::Tensor& scale_, const at::Tensor& prev_int_,
                 const at::Tensor& flags_, const at::Tensor& freq_, const at::Tensor& ema_, const at::Tensor& f_th,
                 int64_t n, int64_t p, double momentum, bool damp_, double damp_div_)
      : w(w_), scale(scale_), prev_int(prev_int_), flags(flags_), freq(freq_), ema(ema_), damp(damp_),
        nf(static_cast<float>(n)), pf(static_cast<float>(p)), m(static_cast<float>(momentum)),
        om(static_cast<float>(1.0 - momentum)),  // in double, then rounded
        damp_div(static_cast<float>(damp_div_)), sp(1, 1) {
    check_cpu(op, w);
    const int64_t C = check_weight_fwd_track_args(op, w, scale, prev_int, flags, freq, ema, f_th, n, p, momentum,
                                                  damp, damp_div_);
    const float fth_v = scalar_value(f_th);
    fth = fth_v > 0.f ? fth_v : INFINITY;  // f_th <= 0: no freezing
    out = empty_output(w.sizes(), w.options());
    sp = Split(w.numel(), C);
    dpart.resize(damp ? sp.tasks() : 0);
    cpart.assign(2 * sp.tasks(), 0);
  }

  void run(int64_t t0, int64_t t1) {
    // Locals, not members: the int8 state stores may alias any member, which would reload them per task.
    const Split sp = this->sp;
    double* const parts = dpart.data();
    int64_t* const cparts = cpart.data();
    const float* sc = scale.const_data_ptr<float>();
    int8_t* pv = prev_int.mutable_data_ptr<int8_t>();
    int8_t* fl = flags.mutable_data_ptr<int8_t>();
    float* fq = freq.mutable_data_ptr<float>();
    float* em = ema.mutable_data_ptr<float>();
    with_isa([&](auto isa) {
      using K = decltype(isa);
      dispatch_float(w.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        const T* wp = w.const_data_ptr<T>();
        T* op_ = out.mutable_data_ptr<T>();
        dispatch_bool(damp, [&](auto DA) {
          // The three passes of the tracked core run over sub-blocks of SUB elements: the eight per-element
          // buffers between them then stay in L1 (over whole blocks they took 32 KB and the core slowed 2x).
          float wbuf[BLOCK], obuf[BLOCK], fzb[SUB], ldb[SUB], unb[SUB], weffb[SUB], nflb[SUB], swb[SUB], oscb[SUB],
              pvb[SUB];
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t b = sp.begin(t), len = sp.len(t);
            const float s = sc[sp.channel(t)], r = 1.0f / s;
            const float* wf = load_block<K, T>(wp + b, len, wbuf);
            float* o = out_block<T>(op_ + b, obuf);
            int64_t nsw = 0, nosc = 0;
            float acc[K::LANES] = {};
            for (int64_t j = 0; j < len; j += SUB) {
              const int64_t l = std::min(SUB, len - j), e = b + j;
              K::track_decode(l, fl + e, pv + e, fzb, ldb, unb, pvb);
              K::template wtrack_core<decltype(DA)::value>(l, wf + j, s, r, nf, pf, pvb, fzb, ldb, unb, fq + e,
                                                           em + e, m, om, fth, o + j, acc, weffb, nflb, swb, oscb);
              K::track_encode(l, weffb, nflb, swb, oscb, pv + e, fl + e, nsw, nosc);
            }
            store_block<K, T>(o, len, op_ + b);
            cparts[2 * t] = nsw;
            cparts[2 * t + 1] = nosc;
            if constexpr (decltype(DA)::value) parts[t] = K::lanes_total(acc);
          }
        });
      });
    });
  }

  float d() const { return damp ? static_cast<float>(sum_partials(dpart, 0, sp.tasks())) / damp_div : 0.f; }

  at::Tensor counts() const {
    int64_t nsw = 0, nosc = 0;
    for (int64_t t = 0; t < sp.tasks(); ++t) {
      nsw += cpart[2 * t];
      nosc += cpart[2 * t + 1];
    }
    at::Tensor c = at::empty({2}, at::TensorOptions().dtype(at::kInt));
    c.mutable_data_ptr<int32_t>()[0] = static_cast<int32_t>(nsw);
    c.mutable_data_ptr<int32_t>()[1] = static_cast<int32_t>(nosc);
    return c;
  }
};

struct WeightBwd {
  at::Tensor g, w, scale, gw;
  std::optional<at::Tensor> flags, ema;
  bool state, tracked, damp;
  float nf, pf, coef, gsc;
  Split sp;
  std::vector<double> part;

  WeightBwd(const char* op, const at::Tensor& g_, const at::Tensor& w_, const at::Tensor& scale_,
            const std::optional<at::Tensor>& flags_, const std::optional<at::Tensor>& ema_, const at::Tensor& grad_d,
            int64_t n, int64_t p, double grad_scale, bool damp_, double damp_div, bool tracked_)
      : g(g_), w(w_), scale(scale_), flags(flags_), ema(ema_), tracked(tracked_), damp(damp_),
        nf(static_cast<float>(n)), pf(static_cast<float>(p)), gsc(static_cast<float>(grad_scale)), sp(1, 1) {
    check_cpu(op, g);
    const WeightArgs args = check_weight_bwd_args(op, g, w, scale, flags, ema, grad_d, n, p, grad_scale, damp,
                                                  damp_div);
    state = args.state;
    // coef = 2 * gD / div: one fp32 multiply by 2, one IEEE division
    coef = damp ? (2.0f * scalar_value(grad_d)) / static_cast<float>(damp_div) : 0.f;
    gw = empty_output(w.sizes(), g.options());
    sp = Split(w.numel(), args.channels);
    part.resize(sp.tasks());
  }

  void run(int64_t t0, int64_t t1) {
    // Locals, not members: the int8 state stores may alias any member, which would reload them per task.
    const Split sp = this->sp;
    double* const parts = part.data();
    const float* sc = scale.const_data_ptr<float>();
    const int8_t* fl = state ? flags->const_data_ptr<int8_t>() : nullptr;
    const float* em = state ? ema->const_data_ptr<float>() : nullptr;
    with_isa([&](auto isa) {
      using K = decltype(isa);
      dispatch_float(g.scalar_type(), [&](auto gtag) {
        using TG = decltype(gtag);
        dispatch_float(w.scalar_type(), [&](auto wtag) {
          using TW = decltype(wtag);
          const TG* gp = g.const_data_ptr<TG>();
          const TW* wp = w.const_data_ptr<TW>();
          TG* gwp = gw.mutable_data_ptr<TG>();
          dispatch_bool(state, [&](auto ST) {
            dispatch_bool(tracked, [&](auto TR) {
              dispatch_bool(damp, [&](auto DA) {
                float gbuf[BLOCK], wbuf[BLOCK], obuf[BLOCK];
                for (int64_t t = t0; t < t1; ++t) {
                  const int64_t b = sp.begin(t), len = sp.len(t);
                  const float s = sc[sp.channel(t)], r = 1.0f / s;
                  const float* gf = load_block<K, TG>(gp + b, len, gbuf);
                  const float* wf = load_block<K, TW>(wp + b, len, wbuf);
                  float* o = out_block<TG>(gwp + b, obuf);
                  float acc[K::LANES] = {};
                  K::template wbwd_core<decltype(ST)::value, decltype(TR)::value, decltype(DA)::value>(
                      len, gf, wf, s, r, nf, pf, state ? fl + b : nullptr, state ? em + b : nullptr, coef, o, acc);
                  store_block<K, TG>(o, len, gwp + b);
                  parts[t] = K::lanes_total(acc);
                }
              });
            });
          });
        });
      });
    });
  }

  at::Tensor gs() const {
    at::Tensor r = at::empty(scale.sizes(), scale.options().dtype(at::kFloat));
    float* rp = r.mutable_data_ptr<float>();
    for (int64_t c = 0; c < sp.C; ++c) rp[c] = static_cast<float>(sum_partials(part, c * sp.nb, (c + 1) * sp.nb)) * gsc;
    return r;
  }
};

std::tuple<at::Tensor, at::Tensor> weight_fwd(const at::Tensor& w, const at::Tensor& scale,
                                              const std::optional<at::Tensor>& flags,
                                              const std::optional<at::Tensor>& ema, int64_t n, int64_t p,
                                              bool damp, double damp_div) {
  WeightFwd op("oscqat_C.weight_fwd", w, scale, flags, ema, n, p, damp, damp_div);
  run_jobs({job_of(op)});
  return {op.out, f32_scalar(op.d())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_fwd_track(const at::Tensor& w, const at::Tensor& scale,
                                                                at::Tensor& prev_int, at::Tensor& flags,
                                                                at::Tensor& freq, at::Tensor& ema,
                                                                const at::Tensor& f_th, int64_t n, int64_t p,
                                                                double momentum, bool damp, double damp_div) {
  WeightFwdTrack op("oscqat_C.weight_fwd_track", w, scale, prev_int, flags, freq, ema, f_th, n, p, momentum, damp,
                    damp_div);
  run_jobs({job_of(op)});
  return {op.out, f32_scalar(op.d()), op.counts()};
}

std::tuple<at::Tensor, at::Tensor> weight_bwd(const at::Tensor& g, const at::Tensor& w, const at::Tensor& scale,
                                              const std::optional<at::Tensor>& flags,
                                              const std::optional<at::Tensor>& ema, const at::Tensor& grad_d,
                                              int64_t n, int64_t p, double grad_scale, bool damp, double damp_div,
                                              bool tracked) {
  WeightBwd op("oscqat_C.weight_bwd", g, w, scale, flags, ema, grad_d, n, p, grad_scale, damp, damp_div, tracked);
  run_jobs({job_of(op)});
  return {op.gw, op.gs()};
}

// The list forms: layer k of every list is one call of the op above, all layers' tasks in one parallel region
// (run_jobs); the same bits as the calls one by one. A layer is tracked when its prev_int is given.

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> weight_fwd_list(
    at::TensorList w, at::TensorList scale, const c10::List<std::optional<at::Tensor>>& prev_int,
    const c10::List<std::optional<at::Tensor>>& flags, const c10::List<std::optional<at::Tensor>>& freq,
    const c10::List<std::optional<at::Tensor>>& ema, at::TensorList f_th, at::IntArrayRef n, at::IntArrayRef p,
    at::ArrayRef<double> momentum, at::IntArrayRef damp, at::ArrayRef<double> damp_div) {
  const char* op = "oscqat_C.weight_fwd_list";
  const size_t L = w.size();
  check_list_lengths(op, L, {scale.size(), prev_int.size(), flags.size(), freq.size(), ema.size(), f_th.size(),
                             n.size(), p.size(), momentum.size(), damp.size(), damp_div.size()});
  std::vector<std::unique_ptr<WeightFwd>> plain(L);
  std::vector<std::unique_ptr<WeightFwdTrack>> tracked(L);
  std::vector<Job> jobs;
  for (size_t k = 0; k < L; ++k) {
    const std::optional<at::Tensor> pi = prev_int.get(k), fl = flags.get(k), fq = freq.get(k), em = ema.get(k);
    if (pi.has_value()) {
      TORCH_CHECK(fl.has_value() && fq.has_value() && em.has_value(), op, ": layer ", k,
                  ": tracking needs prev_int, flags, freq and ema");
      tracked[k] = std::make_unique<WeightFwdTrack>(op, w[k], scale[k], *pi, *fl, *fq, *em, f_th[k], n[k], p[k],
                                                    momentum[k], damp[k] != 0, damp_div[k]);
      jobs.push_back(job_of(*tracked[k]));
    } else {
      plain[k] = std::make_unique<WeightFwd>(op, w[k], scale[k], fl, em, n[k], p[k], damp[k] != 0, damp_div[k]);
      jobs.push_back(job_of(*plain[k]));
    }
  }
  run_jobs(jobs);
  std::vector<at::Tensor> out(L), d(L), counts(L);
  for (size_t k = 0; k < L; ++k) {
    if (tracked[k]) {
      out[k] = tracked[k]->out;
      d[k] = f32_scalar(tracked[k]->d());
      counts[k] = tracked[k]->counts();
    } else {
      out[k] = plain[k]->out;
      d[k] = f32_scalar(plain[k]->d());
      counts[k] = at::empty({0}, at::TensorOptions().dtype(at::kInt));
    }
  }
  return {out, d, counts};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> weight_bwd_list(
    at::TensorList g, at::TensorList w, at::TensorList scale, const c10::List<std::optional<at::Tensor>>& flags,
    const c10::List<std::optional<at::Tensor>>& ema, at::TensorList grad_d, at::IntArrayRef n, at::IntArrayRef p,
    at::ArrayRef<double> grad_scale, at::IntArrayRef damp, at::ArrayRef<double> damp_div, at::IntArrayRef tracked) {
  const char* op = "oscqat_C.weight_bwd_list";
  const size_t L = w.size();
  check_list_lengths(op, L, {g.size(), scale.size(), flags.size(), ema.size(), grad_d.size(), n.size(), p.size(),
                             grad_scale.size(), damp.size(), damp_div.size(), tracked.size()});
  std::vector<std::unique_ptr<WeightBwd>> ops(L);
  std::vector<Job> jobs;
  for (size_t k = 0; k < L; ++k) {
    ops[k] = std::make_unique<WeightBwd>(op, g[k], w[k], scale[k], flags.get(k), ema.get(k), grad_d[k], n[k], p[k],
                                         grad_scale[k], damp[k] != 0, damp_div[k], tracked[k] != 0);
    jobs.push_back(job_of(*ops[k]));
  }
  run_jobs(jobs);
  std::vector<at::Tensor> gw(L), gs(L);
  for (size_t k = 0; k < L; ++k) {
    gw[k] = ops[k]->gw;
    gs[k] = ops[k]->gs();
  }
  return {gw, gs};
}

static void check_act(const char* op, const at::Tensor& x, const at::Tensor& scale,
                      const std::optional<at::Tensor>& offset, int64_t n, int64_t p) {
  check_data(op, "x", x, x.device());
  check_scale(op, scale, x, true);
  if (offset.has_value() && offset->defined()) {
    check_scalar(op, "offset", *offset, x.device(), /*cpu_ok=*/false);
    TORCH_CHECK(offset->is_contiguous(), op, ": offset must be contiguous");
  }
  check_range(op, n, p, false);
}

at::Tensor act_fwd(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& offset,
                   int64_t n, int64_t p) {
  const char* op = "oscqat_C.act_fwd";
  check_cpu(op, x);
  check_act(op, x, scale, offset, n, p);
  const bool off = offset.has_value() && offset->defined();
  const float s = *scale.const_data_ptr<float>(), r = 1.0f / s;
  const float o = off ? scalar_value(*offset) : 0.f;
  const float nf = static_cast<float>(n), pf = static_cast<float>(p);
  at::Tensor y = empty_output(x.sizes(), x.options());
  const Split sp(x.numel(), 1);
  with_isa([&](auto isa) {
    using K = decltype(isa);
    dispatch_float(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* xp = x.const_data_ptr<T>();
      T* yp = y.mutable_data_ptr<T>();
      dispatch_bool(off, [&](auto OF) {
        at::parallel_for(0, sp.tasks(), sp.grain(), [&](int64_t t0, int64_t t1) {
          using U = act_io_t<T>;
          float xbuf[BLOCK], obuf[BLOCK];
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t b = sp.begin(t), len = sp.len(t);
            const U* xf = load_block<K, T, U>(xp + b, len, xbuf);
            U* ob = out_block<T, U>(yp + b, obuf);
            K::template afwd_core<decltype(OF)::value>(len, xf, s, r, o, nf, pf, ob);
            store_block<K, T, U>(ob, len, yp + b);
          }
        });
      });
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> act_bwd(const at::Tensor& g, const at::Tensor& x,
                                                       const at::Tensor& scale,
                                                       const std::optional<at::Tensor>& offset, int64_t n, int64_t p,
                                                       double grad_scale) {
  const char* op = "oscqat_C.act_bwd";
  check_cpu(op, g);
  check_data(op, "g", g, g.device());
  check_act(op, x, scale, offset, n, p);
  TORCH_CHECK(x.device() == g.device(), op, ": x is on ", x.device().str(), " but g is on ", g.device().str());
  TORCH_CHECK(g.sizes() == x.sizes(), op, ": g has shape ", g.sizes(), " but x has shape ", x.sizes());
  check_grad_scale(op, grad_scale);
  const bool off = offset.has_value() && offset->defined();
  const float s = *scale.const_data_ptr<float>(), r = 1.0f / s;
  const float o = off ? scalar_value(*offset) : 0.f;
  const float nf = static_cast<float>(n), pf = static_cast<float>(p);
  at::Tensor gx = empty_output(x.sizes(), g.options());
  const Split sp(x.numel(), 1);
  std::vector<double> ps(sp.tasks()), po(off ? sp.tasks() : 0);
  with_isa([&](auto isa) {
    using K = decltype(isa);
    dispatch_float(g.scalar_type(), [&](auto gtag) {
      using TG = decltype(gtag);
      dispatch_float(x.scalar_type(), [&](auto xtag) {
        using TX = decltype(xtag);
        const TG* gp = g.const_data_ptr<TG>();
        const TX* xp = x.const_data_ptr<TX>();
        TG* gxp = gx.mutable_data_ptr<TG>();
        dispatch_bool(off, [&](auto OF) {
          at::parallel_for(0, sp.tasks(), sp.grain(), [&](int64_t t0, int64_t t1) {
            using UG = act_io_t<TG>;
            using UX = act_io_t<TX>;
            float gbuf[BLOCK], xbuf[BLOCK], obuf[BLOCK];
            for (int64_t t = t0; t < t1; ++t) {
              const int64_t b = sp.begin(t), len = sp.len(t);
              const UG* gf = load_block<K, TG, UG>(gp + b, len, gbuf);
              const UX* xf = load_block<K, TX, UX>(xp + b, len, xbuf);
              UG* ob = out_block<TG, UG>(gxp + b, obuf);
              float as[K::LANES] = {}, ao[K::LANES] = {};
              K::template abwd_core<decltype(OF)::value>(len, gf, xf, r, o, nf, pf, ob, as, ao);
              store_block<K, TG, UG>(ob, len, gxp + b);
              ps[t] = K::lanes_total(as);
              if constexpr (decltype(OF)::value) po[t] = K::lanes_total(ao);
            }
          });
        });
      });
    });
  });
  const float gsc = static_cast<float>(grad_scale);
  at::Tensor gs = at::empty(scale.sizes(), scale.options().dtype(at::kFloat));
  at::Tensor go = at::zeros(scale.sizes(), scale.options().dtype(at::kFloat));
  *gs.mutable_data_ptr<float>() = static_cast<float>(sum_partials(ps, 0, sp.tasks())) * gsc;
  if (off) *go.mutable_data_ptr<float>() = static_cast<float>(sum_partials(po, 0, sp.tasks())) * gsc;
  return {gx, gs, go};
}

// The checks of a step's first training forward on the CPU (docs/semantics.md, "Non-finite values" and "Weight
// changed"), in one pass over the weight just before the tracked kernel reads it again, from cache: 1 when
// `finite` and the weight or scale holds NaN/Inf, else 2 when the weight's checksum (oscqat/nn/weight_check.py)
// differs from `ref`, else 0. Integer work on the bit patterns: any split over threads gives the same answer.
template <typename B>
static int64_t scan_weight(const at::Tensor& w, B exp_mask, const std::optional<at::Tensor>& ref, bool finite) {
  const B* x = reinterpret_cast<const B*>(w.const_data_ptr());
  std::atomic<uint64_t> sum{0}, bad{0};
  with_isa([&](auto isa) {
    using K = decltype(isa);
    at::parallel_for(0, w.numel(), GRAIN_ELEMS, [&](int64_t b, int64_t e) {
      B s = 0, f = 0;
      K::template scan_core<B>(e - b, x + b, exp_mask, s, f);
      sum.fetch_add(s);
      bad.fetch_or(f);
    });
  });
  if (finite && bad.load()) return 1;
  if (ref.has_value()) {
    TORCH_CHECK(ref->numel() == 1 && ref->element_size() == sizeof(B) && ref->device().is_cpu(),
                "oscqat_C.check_weight: ref must be one CPU integer of the weight's element size, got ",
                ref->scalar_type(), " with ", ref->numel(), " elements on ", ref->device().str());
    if (static_cast<B>(sum.load()) != *reinterpret_cast<const B*>(ref->const_data_ptr())) return 2;
  }
  return 0;
}

int64_t check_weight(const at::Tensor& w, const at::Tensor& scale, const std::optional<at::Tensor>& ref,
                     bool finite) {
  const char* op = "oscqat_C.check_weight";
  check_cpu(op, w);
  check_cpu(op, scale);
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": scale must be fp32, got ", scale.scalar_type());
  if (finite) {
    const at::Tensor sc = scale.contiguous();
    const float* sp = sc.const_data_ptr<float>();
    for (int64_t i = 0; i < sc.numel(); ++i)
      if (!std::isfinite(sp[i])) return 1;
  }
  // Both answers ignore element order, so a dense layout of any strides (channels_last) is scanned in place;
  // only a strided view is copied.
  const at::Tensor wc = w.is_non_overlapping_and_dense() ? w : w.contiguous();
  switch (wc.scalar_type()) {
    case at::kFloat: return scan_weight<uint32_t>(wc, 0x7f800000u, ref, finite);
    case at::kBFloat16: return scan_weight<uint16_t>(wc, 0x7f80u, ref, finite);
    case at::kHalf: return scan_weight<uint16_t>(wc, 0x7c00u, ref, finite);
    default: TORCH_CHECK(false, op, ": unsupported dtype ", wc.scalar_type());
  }
}

// check_weight of many weights in one parallel pass: one wake-up of the threads instead of one per weight (at two
// threads, 53 small scans cost 3x one scan of the same bytes). Per weight 0, 1 or 2 as check_weight.
std::vector<int64_t> check_weight_list(at::TensorList w, at::TensorList scale,
                                       const c10::List<std::optional<at::Tensor>>& ref, at::IntArrayRef finite) {
  const char* op = "oscqat_C.check_weight_list";
  const size_t L = w.size();
  check_list_lengths(op, L, {scale.size(), ref.size(), finite.size()});
  std::vector<int64_t> code(L, 0);
  std::vector<at::Tensor> wc(L);
  struct Piece {
    size_t k;
    int64_t b, e;
  };
  std::vector<Piece> pieces;
  int64_t total = 0;
  for (size_t k = 0; k < L; ++k) {
    check_cpu(op, w[k]);
    check_cpu(op, scale[k]);
    TORCH_CHECK(scale[k].scalar_type() == at::kFloat, op, ": scale must be fp32, got ", scale[k].scalar_type());
    const auto dt = w[k].scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op, ": unsupported dtype ", dt);
    if (finite[k]) {
      const at::Tensor sc = scale[k].contiguous();
      const float* sp = sc.const_data_ptr<float>();
      for (int64_t i = 0; i < sc.numel(); ++i)
        if (!std::isfinite(sp[i])) code[k] = 1;
      if (code[k]) continue;
    }
    wc[k] = w[k].is_non_overlapping_and_dense() ? w[k] : w[k].contiguous();
    const int64_t n = wc[k].numel();
    for (int64_t b = 0; b < n; b += GRAIN_ELEMS) pieces.push_back({k, b, std::min(n, b + GRAIN_ELEMS)});
    total += n;
  }
  std::unique_ptr<std::atomic<uint64_t>[]> sum(new std::atomic<uint64_t>[L]), bad(new std::atomic<uint64_t>[L]);
  for (size_t k = 0; k < L; ++k) {
    sum[k].store(0);
    bad[k].store(0);
  }
  const int64_t np = static_cast<int64_t>(pieces.size());
  with_isa([&](auto isa) {
    using K = decltype(isa);
    at::parallel_for(0, np, total < GRAIN_ELEMS ? np : 1, [&](int64_t pb, int64_t pe) {
      for (int64_t i = pb; i < pe; ++i) {
        const Piece& pc = pieces[i];
        const at::Tensor& t = wc[pc.k];
        if (t.scalar_type() == at::kFloat) {
          uint32_t s = 0, f = 0;
          K::template scan_core<uint32_t>(pc.e - pc.b, reinterpret_cast<const uint32_t*>(t.const_data_ptr()) + pc.b, 0x7f800000u, s, f);
          sum[pc.k].fetch_add(s);
          bad[pc.k].fetch_or(f);
        } else {
          const uint16_t mask = t.scalar_type() == at::kBFloat16 ? 0x7f80u : 0x7c00u;
          uint16_t s = 0, f = 0;
          K::template scan_core<uint16_t>(pc.e - pc.b, reinterpret_cast<const uint16_t*>(t.const_data_ptr()) + pc.b,
                                          mask, s, f);
          sum[pc.k].fetch_add(s);
          bad[pc.k].fetch_or(f);
        }
      }
    });
  });
  for (size_t k = 0; k < L; ++k) {
    if (code[k]) continue;
    if (finite[k] && bad[k].load()) {
      code[k] = 1;
      continue;
    }
    const std::optional<at::Tensor> r = ref.get(k);
    if (r.has_value()) {
      const size_t es = wc[k].element_size();
      TORCH_CHECK(r->numel() == 1 && r->element_size() == static_cast<int64_t>(es) && r->device().is_cpu(), op,
                  ": ref must be one CPU integer of the weight's element size, got ", r->scalar_type(), " with ",
                  r->numel(), " elements on ", r->device().str());
      const uint64_t got = sum[k].load();
      const bool same = es == 4 ? static_cast<uint32_t>(got) == *reinterpret_cast<const uint32_t*>(r->const_data_ptr())
                                : static_cast<uint16_t>(got) == *reinterpret_cast<const uint16_t*>(r->const_data_ptr());
      if (!same) code[k] = 2;
    }
  }
  return code;
}

}  // namespace cpu
}  // namespace oscqat

TORCH_LIBRARY_IMPL(oscqat_C, CPU, m) {
  m.impl("weight_fwd", &oscqat::cpu::weight_fwd);
  m.impl("weight_fwd_track", &oscqat::cpu::weight_fwd_track);
  m.impl("weight_bwd", &oscqat::cpu::weight_bwd);
  m.impl("weight_fwd_list", &oscqat::cpu::weight_fwd_list);
  m.impl("weight_bwd_list", &oscqat::cpu::weight_bwd_list);
  m.impl("act_fwd", &oscqat::cpu::act_fwd);
  m.impl("act_bwd", &oscqat::cpu::act_bwd);
  m.impl("check_weight", &oscqat::cpu::check_weight);
  m.impl("check_weight_list", &oscqat::cpu::check_weight_list);
}
