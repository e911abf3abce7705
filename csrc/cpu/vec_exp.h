// Softmax row kernel for the CPU: exp(x - max) over a row, returning the sum.
// libm's expf is scalar and was the bottleneck (one exp per score); this
// polynomial exp is branch-free so the compiler vectorizes the loop, and
// target_clones builds AVX-512, AVX2 and baseline copies picked at load time.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../slot_math.h"

namespace memkernels::cpu {

// exp(x) for x <= 0 (scores minus their row max), relative error ~2e-7;
// inputs below -87 (and -inf, masked scores) give exactly 0.
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  const float n = std::nearbyint(clamped * 1.44269504088896341f);
  const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;  // Cody-Waite ln2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

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
  return m;
}

// s[j] <- exp(s[j] - row_max) (0 when row_max is -inf); returns the row sum.
MK_CPU_CLONES inline float exp_row(float* s, int64_t n, float row_max) {
  if (row_max == neg_inf<float>()) {
    for (int64_t j = 0; j < n; ++j) s[j] = 0.0f;
    return 0.0f;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_nonpositive(s[j] - row_max);
    sum += s[j];
  }
  return sum;
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
MK_CPU_CLONES inline void softmax_grad_row(float* p, float* dp, int64_t n, float lse, float delta,
                                           float scale) {
  if (lse == neg_inf<float>()) {
    for (int64_t j = 0; j < n; ++j) p[j] = dp[j] = 0.0f;
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    p[j] = exp_nonpositive(p[j] - lse);
    dp[j] = p[j] * (dp[j] - delta) * scale;
  }
}

inline void softmax_grad_row(double* p, double* dp, int64_t n, double lse, double delta,
                             double scale) {
  for (int64_t j = 0; j < n; ++j) {
    p[j] = prob_from_lse(p[j], lse);
    dp[j] = p[j] * (dp[j] - delta) * scale;
  }
}

}  // namespace memkernels::cpu
