// The fused per-block cores of the CPU kernels (docs/semantics.md), plain fp32 C++ written branch-free so that
// the compiler vectorises every loop. No include guard and no includes on purpose: csrc/cpu/cores.h includes
// this body twice, as the members of two structs, once for the baseline ISA and once under
// `#pragma GCC target("avx2")`; the kernels pick one at run time. Compile with -ffp-contract=off and without
// -ffast-math (-fno-trapping-math is fine and lets GCC if-convert the selects).
// ------------------------------------------------------------------------------------------ scalar helpers
// round_half_to_even for every fp32 x: for |x| < 2^23, |x| + 2^23 lies in [2^23, 2^24) where the spacing is 1,
// so the addition rounds |x| to the nearest integer, ties to even (default rounding mode), and subtracting
// 2^23 is exact; copysign keeps the sign of zero as nearbyint does (-0.3 -> -0). |x| >= 2^23 (and inf, NaN)
// are already integers (or propagate).
static inline float rne(float x) {
  const float big = 8388608.0f;
  const float ax = std::fabs(x);
  const float r = std::copysign((ax + big) - big, x);
  return ax < big ? r : x;
}

// torch.clamp: min(max(v, lo), hi), NaN propagates.
static inline float clampf(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return hi < v ? hi : v;
}

// Block sums (D's terms, dL/ds, dL/do) are accumulated in registers while a core runs: LANES fp32 partial sums,
// element i of the block into lane i % LANES, then added in double by a fixed tree. The lane count is fixed, not
// the vector width, so every ISA build adds the same numbers in the same order (and the tasks fix the rest: no
// dependence on the thread count); a lane adds at most BLOCK / LANES = 16 terms in fp32, well within the
// tolerance of docs/semantics.md. Storing the terms and summing them in double afterwards took a second pass over
// the block and one chain of dependent adds per block, which made act_bwd slower than inductor's fused loop.
// 64 lanes = one AVX-512 vector of int8: with 32, GCC vectorised the cores that read the int8 state flags with
// 256-bit vectors only, and weight_bwd's core ran 1.5x slower.
static constexpr int LANES = 64;

static inline double lanes_total(const float* __restrict acc) {
  double d[LANES / 2];
  for (int k = 0; k < LANES / 2; ++k) d[k] = static_cast<double>(acc[k]) + static_cast<double>(acc[k + LANES / 2]);
  for (int w = LANES / 4; w >= 1; w /= 2)
    for (int k = 0; k < w; ++k) d[k] = d[k] + d[k + w];
  return d[0];
}

// Runs elem(i, k) for every element i of a block, k = i % LANES being its lane; whole groups of LANES first, in a
// loop of constant trip count that the compiler vectorises with the lanes' accumulators held in registers.
template <typename F>
static inline void for_lanes(int64_t len, F&& elem) {
  int64_t i = 0;
  for (; i + LANES <= len; i += LANES)
    for (int k = 0; k < LANES; ++k) elem(i + k, k);
  for (int k = 0; i + k < len; ++k) elem(i + k, k);
}

// bf16/fp16 <-> fp32 for a block, with c10's conversions (widening is exact; narrowing rounds to nearest even).
template <typename T>
static inline void widen(int64_t len, const T* __restrict src, float* __restrict buf) {
  for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<float>(src[i]);
}

template <typename T>
static inline void narrow(int64_t len, const float* __restrict buf, T* __restrict dst) {
  for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<T>(buf[i]);
}

// The checks of a step's first forward (oscqat/nn/weight_check.py, docs/semantics.md "Non-finite values") over the
// bit patterns B of a block: `bad` gets 1 where an element's exponent bits are all ones (NaN or Inf), `sum` the
// wrapping sum of the patterns (unsigned: wraps as the signed sum of weight_check.checksum does, by definition).
template <typename B>
static inline void scan_core(int64_t len, const B* __restrict x, B exp_mask, B& sum, B& bad) {
  B s = 0, b = 0;
  for (int64_t i = 0; i < len; ++i) {
    s = static_cast<B>(s + x[i]);
    b |= static_cast<B>((x[i] & exp_mask) == exp_mask);
  }
  sum = static_cast<B>(sum + s);
  bad |= b;
}

// ------------------------------------------------------------------------------------------ fused cores
// Untracked weight forward: w_hat (as fp32) and, with DAMP, the dampening terms err^2 summed into `acc`.
template <bool STATE, bool DAMP>
static inline void wfwd_core(int64_t len, const float* __restrict w, float s, float r, float nf, float pf,
                      const int8_t* __restrict flags, const float* __restrict ema, float* __restrict out,
                      float* __restrict acc) {
  const float lo = s * nf, hi = s * pf;
  for_lanes(len, [&](int64_t i, int k) {
    const float wf = w[i];
    const float wi = clampf(rne(wf * r), nf, pf);
    float weff = wi;
    if constexpr (STATE) {
      const float e = ema[i];     // loaded unconditionally: a conditional load stops vectorisation
      weff = flag_frozen(flags[i]) ? e : wi;
    }
    const float q = s * weff;
    out[i] = q;
    if constexpr (DAMP) {
      const float e = q - clampf(wf, lo, hi);
      acc[k] += e * e;
    }
  });
}

// Tracked weight forward: w_hat, damp terms, and the state update, in three loops over the block (all
// vectorised): track_decode widens flags (into fz, last_dir, "uninitialised") and prev_int to floats;
// wtrack_core does the arithmetic on 32-bit lanes only (the integers involved are small and exact in fp32;
// mixing int8/int and float conditions stops GCC's vectoriser or makes it shuffle masks between widths);
// track_encode writes the int8 state back and counts changes and oscillations.
static inline void track_decode(int64_t len, const int8_t* __restrict flags, const int8_t* __restrict prev,
                                float* __restrict fzb, float* __restrict ldb, float* __restrict unb,
                                float* __restrict pvb) {
  for (int64_t i = 0; i < len; ++i) {
    const int f = flags[i];
    pvb[i] = static_cast<float>(prev[i]);
    fzb[i] = static_cast<float>(flag_fz(f));
    ldb[i] = static_cast<float>(flag_last_dir(f));
    unb[i] = flag_uninit(f) ? 1.f : 0.f;
  }
}

// `fth` must be +inf when f_th <= 0 (no freezing): then freq > fth never holds.
template <bool DAMP>
static inline void wtrack_core(int64_t len, const float* __restrict w, float s, float r, float nf, float pf,
                               const float* __restrict pvb, const float* __restrict fzb,
                               const float* __restrict ldb, const float* __restrict unb, float* __restrict freq,
                               float* __restrict ema, float m, float om, float fth, float* __restrict out,
                               float* __restrict acc, float* __restrict weffb, float* __restrict nflb,
                               float* __restrict swb, float* __restrict oscb) {
  const float lo = s * nf, hi = s * pf;
  for_lanes(len, [&](int64_t i, int k) {
    const float wf = w[i];
    const float wi = clampf(rne(wf * r), nf, pf);
    const float fz = fzb[i], ld = ldb[i];
    const bool un = unb[i] != 0.f;
    const bool frozen = fz >= 1.f;
    const float e = ema[i], fr = freq[i], pi = pvb[i];
    const float weff = frozen ? e : wi;
    const float q = s * weff;
    out[i] = q;
    if constexpr (DAMP) {
      const float d = q - clampf(wf, lo, hi);
      acc[k] += d * d;
    }
    const float delta = weff - pi;
    const bool sw = (delta != 0.f) & !un;
    const float dir = (delta > 0.f ? 1.f : 0.f) - (delta < 0.f ? 1.f : 0.f);
    const bool osc = sw & (dir == -ld);
    const float nfq = un ? 0.f : om * fr + (osc ? m : 0.f);  // two roundings: product, then sum
    const float nd = sw ? dir : ld;
    const bool newly = (nfq > fth) & (fz == 0.f) & !un;
    const float estep = om * e + m * weff;                    // three roundings
    const float re = rne(e);                                  // frozen_int, from the EMA before this step
    float ne = frozen ? e : estep;
    ne = newly ? re : ne;
    ne = un ? weff : ne;
    const float nfz = newly ? 2.f : (frozen ? 1.f : 0.f);
    nflb[i] = nd + 4.f * nfz;  // uninitialised: nd = last_dir = 0 and nfz = 0, so flags = 0
    weffb[i] = weff;
    freq[i] = nfq;
    ema[i] = ne;
    swb[i] = sw ? 1.f : 0.f;
    oscb[i] = osc ? 1.f : 0.f;
  });
}

static inline void track_encode(int64_t len, const float* __restrict weffb, const float* __restrict nflb,
                                const float* __restrict swb, const float* __restrict oscb,
                                int8_t* __restrict prev, int8_t* __restrict flags, int64_t& n_sw,
                                int64_t& n_osc) {
  int32_t csw = 0, cosc = 0;
  for (int64_t i = 0; i < len; ++i) {
    prev[i] = static_cast<int8_t>(static_cast<int>(weffb[i]));
    flags[i] = static_cast<int8_t>(static_cast<int>(nflb[i]));
    csw += static_cast<int32_t>(swb[i]);
    cosc += static_cast<int32_t>(oscb[i]);
  }
  n_sw += csw;
  n_osc += cosc;
}

// Weight backward: dL/dw (fp32) and the terms of dL/ds, summed into `acc`.
template <bool STATE, bool TRACKED, bool DAMP>
static inline void wbwd_core(int64_t len, const float* __restrict g, const float* __restrict w, float s, float r,
                      float nf, float pf, const int8_t* __restrict flags, const float* __restrict ema, float coef,
                      float* __restrict gw, float* __restrict acc) {
  const float lo = s * nf, hi = s * pf;
  for_lanes(len, [&](int64_t i, int k) {
    const float wf = w[i], gf = g[i];
    const float x = wf * r;
    const float R = rne(x);
    const bool inr = (R >= nf) & (R <= pf);
    const float wi = clampf(R, nf, pf);
    float weff = wi;
    bool mask = inr;
    if constexpr (STATE) {
      const int f = flags[i];
      // frozen = fz == 1 after a tracked forward, fz >= 1 after an untracked one
      const float e = ema[i];
      const bool frozen = TRACKED ? flag_frozen_tracked(f) : flag_frozen(f);
      weff = frozen ? e : wi;
      mask = inr & !frozen;
    }
    const float mf = mask ? 1.f : 0.f;
    float gv = gf * mf;
    if constexpr (DAMP) {
      const float inside = ((wf >= lo) & (wf <= hi)) ? 1.f : 0.f;
      gv = gv + ((coef * (clampf(wf, lo, hi) - s * weff)) * inside);
    }
    gw[i] = gv;
    acc[k] += gf * (weff - x * mf);
  });
}

// The activation cores read and write their storage type U (float, or bf16 converted in the loop).
template <bool OFF, typename U>
static inline void afwd_core(int64_t len, const U* __restrict x, float s, float r, float o, float nf, float pf,
                      U* __restrict y) {
  for (int64_t i = 0; i < len; ++i) {
    const float xv = static_cast<float>(x[i]);
    const float xs = OFF ? (xv - o) * r : xv * r;
    const float q = clampf(rne(xs), nf, pf);
    float v = q * s;
    if constexpr (OFF) v = v + o;
    y[i] = static_cast<U>(v);
  }
}

// Activation backward: dL/dx, and the terms of dL/ds and (OFF) dL/do summed into `as` and `ao`.
template <bool OFF, typename UG, typename UX>
static inline void abwd_core(int64_t len, const UG* __restrict g, const UX* __restrict x, float r, float o,
                      float nf, float pf, UG* __restrict gx, float* __restrict as, float* __restrict ao) {
  for_lanes(len, [&](int64_t i, int k) {
    const float gf = static_cast<float>(g[i]), xv = static_cast<float>(x[i]);
    const float xs = OFF ? (xv - o) * r : xv * r;
    const float R = rne(xs);
    const bool inr = (R >= nf) & (R <= pf);
    const float q = clampf(R, nf, pf);
    const float m = inr ? 1.f : 0.f;
    gx[i] = static_cast<UG>(gf * m);
    as[k] += gf * (q - xs * m);
    if constexpr (OFF) ao[k] += gf * (inr ? 0.f : 1.f);
  });
}
