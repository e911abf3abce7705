// Vectorized row passes of the CPU kernels: masking, softmax, gate blend.
// The softmax rows (exp_row, softmax_grad_row) run a hand-vectorized body per
// ISA (softmax_rows_body.inc, picked at run time like the few-row read); the
// other passes go through slot_math.h's branch-free host exp, so each loop
// auto-vectorizes, and target_clones builds AVX-512, AVX2 and baseline copies
// picked at load time. float64 (the checking precision) keeps libm.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../slot_math.h"
#include "simd.h"

namespace memkernels::cpu {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MK_CPU_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define MK_CPU_CLONES
#endif

// Masks a row of scores (masked -> -inf) and returns its max; vectorized.
template <typename T>
MK_CPU_CLONES inline T mask_and_max(T* s, const bool* valid, int64_t n) {
  if (valid) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = valid[j] ? s[j] : neg_inf<T>();
  }
  T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  // The max skips NaN: a row of NaN scores (a NaN query) would look fully masked
  // and read zeros. Only such a row ends at -inf, so only it pays this scan.
  if (m == neg_inf<T>())
    for (int64_t j = 0; j < n; ++j)
      if (s[j] != s[j]) return s[j];
  return m;
}

// The softmax row passes, once per ISA (softmax_rows_body.inc); the portable
// loops below serve CPUs without AVX2 and MEMKERNELS_CPU_ISA=generic.
#define MK_ISA_BODY "softmax_rows_body.inc"
#include "per_isa.h"

// s[j] <- exp(s[j] - row_max) (0 when row_max is -inf); returns the row sum.
MK_CPU_CLONES inline float exp_row_portable(float* s, int64_t n, float row_max) {
  if (row_max == neg_inf<float>()) {
    for (int64_t j = 0; j < n; ++j) s[j] = 0.0f;
    return 0.0f;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = mk_exp(s[j] - row_max);
    sum += s[j];
  }
  return sum;
}

inline float exp_row(float* s, int64_t n, float row_max) {
#ifdef MK_HAVE_SIMD_VEC
  switch (best_isa()) {
    case Isa::avx512: return isa_avx512::exp_row(s, n, row_max);
    case Isa::avx2: return isa_avx2::exp_row(s, n, row_max);
    default: break;
  }
#endif
  return exp_row_portable(s, n, row_max);
}

// float64 is the checking precision: exact libm exp.
inline double exp_row(double* s, int64_t n, double row_max) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_shifted(s[j], row_max);
    sum += s[j];
  }
  return sum;
}

// Backward: p = exp(score - lse) (0 where masked or lse = -inf), then
// ds = p * (dp - delta) * scale in place of dp.
MK_CPU_CLONES inline void softmax_grad_row_portable(float* p, float* dp, int64_t n, float lse,
                                                    float delta, float scale) {
  if (lse == neg_inf<float>()) {
    for (int64_t j = 0; j < n; ++j) p[j] = dp[j] = 0.0f;
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    p[j] = mk_exp(p[j] - lse);
    dp[j] = p[j] * (dp[j] - delta) * scale;
  }
}

inline void softmax_grad_row(float* p, float* dp, int64_t n, float lse, float delta,
                             float scale) {
#ifdef MK_HAVE_SIMD_VEC
  switch (best_isa()) {
    case Isa::avx512: return isa_avx512::softmax_grad_row(p, dp, n, lse, delta, scale);
    case Isa::avx2: return isa_avx2::softmax_grad_row(p, dp, n, lse, delta, scale);
    default: break;
  }
#endif
  softmax_grad_row_portable(p, dp, n, lse, delta, scale);
}

inline void softmax_grad_row(double* p, double* dp, int64_t n, double lse, double delta,
                             double scale) {
  if (lse == neg_inf<double>()) {  // no valid key: dS 0 whatever dp holds (NaN, inf), as float's
    for (int64_t j = 0; j < n; ++j) p[j] = dp[j] = 0.0;
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    p[j] = prob_from_lse(p[j], lse);
    dp[j] = p[j] * (dp[j] - delta) * scale;
  }
}

// Backward from the forward's saved probabilities p (no exp to redo):
// ds = p * (dp - delta) * scale in place of dp; 0 for a row with no valid key
// (lse = -inf), as softmax_grad_row. Compiled per ISA by its clones.
template <typename T>
MK_CPU_CLONES inline void saved_probs_grad_row(const T* p, T* dp, int64_t n, T lse, T delta,
                                               T scale) {
  if (lse == neg_inf<T>()) {
    for (int64_t j = 0; j < n; ++j) dp[j] = T(0);
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta) * scale;
}

// dst[j] = s[j] * f for j < n, n a multiple of 16 and dst aligned to 64
// bytes: streamed past the caches where the ISA allows (the write's saved
// probabilities, next read in the backward). stream_fence() after the last
// row orders them before any later store (a thread that reads them after
// a barrier then sees them).
inline void scaled_row_streamed(const float* s, float* dst, int64_t n, float f) {
#ifdef MK_HAVE_SIMD_VEC
  switch (best_isa()) {
    case Isa::avx512: return isa_avx512::scaled_row_streamed(s, dst, n, f);
    case Isa::avx2: return isa_avx2::scaled_row_streamed(s, dst, n, f);
    default: break;
  }
#endif
  for (int64_t j = 0; j < n; ++j) dst[j] = s[j] * f;
}

inline void scaled_row_streamed(const double* s, double* dst, int64_t n, double f) {
  for (int64_t j = 0; j < n; ++j) dst[j] = s[j] * f;
}

inline void stream_fence() {
#ifdef MK_HAVE_SIMD_VEC
  switch (best_isa()) {
    case Isa::avx512: return isa_avx512::stream_fence();
    case Isa::avx2: return isa_avx2::stream_fence();
    default: break;
  }
#endif
}

// erf in float32 as a rational function of x on [-4, 4] (Eigen's float erf
// coefficients; erf(+-4) rounds to +-1 in float32), branch-free so that a loop
// of it vectorizes: libm's erff is a scalar call, and a reading layer's 512
// of them took ~7 us of its ~150 (docs/log.md). |error| < 5e-7; NaN stays NaN.
inline float host_erf(float x) {
  const float c = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
  const float c2 = c * c;
  float p = -2.72614225801306e-10f;
  p = p * c2 + 2.77068142495902e-08f;
  p = p * c2 - 2.10102402082508e-06f;
  p = p * c2 - 5.69250639462346e-05f;
  p = p * c2 - 7.34990630326855e-04f;
  p = p * c2 - 2.95459980854025e-03f;
  p = p * c2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * c2 - 2.13374055278905e-04f;
  q = q * c2 - 1.68282697438203e-03f;
  q = q * c2 - 7.37332916720468e-03f;
  q = q * c2 - 1.42647390514189e-02f;
  return c * p / q;
}

// x <- gelu(x) = x / 2 * (1 + erf(x / sqrt 2)) in place: the exact (erf) GELU
// of nn.GELU(); float64, the checking precision, keeps libm's erf.
MK_CPU_CLONES inline void gelu_row(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    x[i] = 0.5f * x[i] * (1.0f + host_erf(x[i] * 0.70710678118654752440f));
}

inline void gelu_row(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    x[i] = 0.5 * x[i] * (1.0 + std::erf(x[i] * 0.70710678118654752440));
}

// One slot row of the gated write: new = gate_blend(mem, upd, f, i); gates
// are per channel (gate_dim == D) or one per row (gate_dim == 1).
template <typename T>
MK_CPU_CLONES inline void gate_blend_row(T* new_mem, const T* mem, const T* upd, const T* forget,
                                         const T* input, int64_t D, int64_t gate_dim) {
  if (gate_dim == 1) {  // the row's two gates once, not once a channel
    const T sf = sigmoid(forget[0]), si = sigmoid(input[0]);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) new_mem[d] = gate_blend_gated(mem[d], upd[d], sf, si);
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) new_mem[d] = gate_blend(mem[d], upd[d], forget[d], input[d]);
  }
}

// Its backward for one row: d(mem), d(upd) and the gate gradients (summed
// over the row when gate_dim == 1).
template <typename T>
MK_CPU_CLONES inline void gate_blend_backward_row(const T* dnew, const T* mem, const T* upd,
                                                  const T* forget, const T* input, int64_t D,
                                                  int64_t gate_dim, T* dmem, T* dupd, T* dforget,
                                                  T* dinput) {
  if (gate_dim == 1) {  // the row's two gates once, not once a channel
    const T sf = sigmoid(forget[0]), si = sigmoid(input[0]);
    T df = 0, di = 0;
#pragma omp simd reduction(+ : df, di)
    for (int64_t d = 0; d < D; ++d) {
      const GateGrads<T> g = gate_blend_backward_gated(dnew[d], mem[d], upd[d], sf, si);
      dmem[d] = g.d_mem;
      dupd[d] = g.d_upd;
      df += g.d_forget;
      di += g.d_input;
    }
    dforget[0] = df;
    dinput[0] = di;
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const GateGrads<T> g = gate_blend_backward(dnew[d], mem[d], upd[d], forget[d], input[d]);
      dmem[d] = g.d_mem;
      dupd[d] = g.d_upd;
      dforget[d] = g.d_forget;
      dinput[d] = g.d_input;
    }
  }
}

}  // namespace memkernels::cpu
