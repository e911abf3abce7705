// Math shared by every C++ backend (CPU now, CUDA too): the online-softmax
// update, the masking rule and the gated blend. Each function is
// __host__ __device__ so the CPU tests exercise the exact code the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MK_HD __host__ __device__ __forceinline__
#else
#define MK_HD inline
#endif

namespace memkernels {

// The masking rule: which mask row applies to (group g, query row r).
// offset = (g / group_div) * group_stride + (r / row_div) * row_stride;
// mask == nullptr means every key is valid.
struct MaskIndex {
  const bool* mask = nullptr;
  int64_t group_div = 1, group_stride = 0, row_div = 1, row_stride = 0;
  MK_HD const bool* row(int64_t g, int64_t r) const {
    return mask + (g / group_div) * group_stride + (r / row_div) * row_stride;
  }
  MK_HD bool valid(int64_t g, int64_t r, int64_t key) const {
    return mask == nullptr || row(g, r)[key];
  }
};

template <typename T>
MK_HD T neg_inf() { return static_cast<T>(-HUGE_VAL); }  // usable in device code too

#if !defined(__CUDA_ARCH__)
// The host float exp's constants. host_exp: exp(x) = 2^n * p(r),
// n = round(x log2 e), r = x - n ln 2 (Cody-Waite split), p a degree-7
// polynomial (relative error ~1.2e-7). The vector exp of the CPU's softmax rows
// (cpu/softmax_rows_body.inc) works in base 2 with fewer operations:
// 2^(x log2 e) = 2^n * 2^f, f = x log2 e - n in [-1/2, 1/2] (log2 e split in a
// float and its remainder), 2^f = 1 + f q(f) with q of degree 4, a minimax fit
// (relative error ~9e-8 on the interval, ~1.9e-7 measured over every float
// in [kMin, 0]). Below kMin host_exp is exactly 0; the vector exp is 0 below
// ~-87.68 (kMinVec).
namespace exp_poly {
constexpr float kMin = -87.0f, kMax = 88.0f;
// The vector exp's lower clamp (softmax_rows_body.inc): round(kMinVec log2 e) =
// -127, whose 2^n its pow2 step builds as 0, so it is 0 below ~-87.68 (where
// exp's float is subnormal) with no compare and mask; host_exp is 0 below kMin.
constexpr float kMinVec = -88.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLog2eLo = 1.925963033500011e-08f;  // log2 e - kLog2e
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;
constexpr float kQ0 = 0.6931470036506653f, kQ1 = 0.24022242426872253f,
                kQ2 = 0.05550733581185341f, kQ3 = 0.009671512991189957f,
                kQ4 = 0.001326472731307149f;
// Adding and removing 1.5 * 2^23 rounds |y| < 2^22 to the nearest integer n;
// the sum's low mantissa bits then hold n (its bits: 0x4B400000 + n).
constexpr float kRoundShifter = 12582912.0f;
}  // namespace exp_poly

// Host float exp: a branch-free polynomial that the compiler vectorizes;
// libm's expf is a scalar call and was the CPU kernels' bottleneck (one per
// score, three per gated element).
inline float host_exp(float x) {
  using namespace exp_poly;
  const float c = x < kMin ? kMin : (x > kMax ? kMax : x);
  // round to nearest with kRoundShifter (|c * log2 e| < 128): plain adds
  // vectorize under every ISA; std::nearbyint kept the AVX2 clone of the
  // loops scalar (seen on a Zen CPU: exp was 2x the read itself)
  const float t = c * kLog2e + kRoundShifter;
  const float n = t - kRoundShifter;
  const float r = (c - n * kLn2Hi) - n * kLn2Lo;
  float p = kP0;
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r + kP5;
  p = p * r * r + r + 1.0f;
  // 2^n: n is t's low mantissa bits, read as an unsigned integer; a cast of n
  // to int would be undefined for a NaN x (this is NaN in, NaN out: p is NaN).
  // Bit for bit the cast's result on every other float (checked exhaustively).
  uint32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof t_bits);
  const uint32_t bits = (t_bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < kMin ? 0.0f : p * scale;
}
#endif

MK_HD float mk_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return host_exp(x);
#endif
}
MK_HD double mk_exp(double x) { return exp(x); }
MK_HD float mk_log(float x) { return logf(x); }
MK_HD double mk_log(double x) { return log(x); }
MK_HD float mk_tanh(float x) {
#if defined(__CUDA_ARCH__)
  // Not tanhf: --use_fast_math compiles it to tanh.approx.f32 (relative error up to
  // 2^-11), which float32 results cannot afford: a write's dK/dV sum a thousand terms
  // that each carry it. expm1f stays a full-precision polynomial under fast math and
  // keeps small |x| exact: tanh|x| = -e / (e + 2) with e = expm1(-2|x|).
  const float e = expm1f(-2.0f * fabsf(x));
  return copysignf(-e / (e + 2.0f), x);
#else
  const float e = host_exp(-2.0f * std::fabs(x));  // tanh|x| = (1 - e) / (1 + e)
  const float t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
#endif
}
MK_HD double mk_tanh(double x) { return tanh(x); }

// max that keeps NaN (fmax drops it): a NaN score must make its row NaN, not
// vanish from the max (a row of NaN scores would look fully masked and read 0)
template <typename T>
MK_HD T max_keep_nan(T a, T b) { return (a != a || a > b) ? a : b; }

// exp(x - row_max), defined as 0 when the whole row is masked so far
// (row_max == -inf): masked rows never produce NaN.
template <typename T>
MK_HD T exp_shifted(T x, T row_max) {
  return row_max == neg_inf<T>() ? T(0) : mk_exp(x - row_max);
}

// One online-softmax step: a block whose running max was `old_max` meets a
// block max `block_max`. Returns the new max and writes the factor that
// rescales the running sum and accumulator.
template <typename T>
MK_HD T online_softmax_rescale(T old_max, T block_max, T* correction) {
  const T new_max = old_max > block_max ? old_max : block_max;
  *correction = exp_shifted(old_max, new_max);
  return new_max;
}

// The same where the max rarely rises (a row's blocks after its first few):
// no exp on the row's chain unless it does. Where the factor differs from the
// above's, nothing it scales changes: a row with no valid key yet (both -inf;
// 1 here, 0 above) holds sum 0 and output 0 (or NaN, which stays NaN); a row
// whose max is already +inf (1 here, NaN above) is NaN already. (The CPU
// one-pass read tests the same inline: it skips its rescale altogether.)
template <typename T>
MK_HD T online_softmax_rescale_if_risen(T old_max, T block_max, T* correction) {
  if (block_max <= old_max) {
    *correction = T(1);
    return old_max;
  }
  return online_softmax_rescale(old_max, block_max, correction);  // a new max, or a NaN max
}

// Final normalisation: a row that saw no valid key (sum 0) gets 0 and lse =
// -inf; a NaN sum stays NaN (as the reference: a NaN score is never "empty").
template <typename T>
MK_HD T safe_inverse(T row_sum) { return row_sum == T(0) ? T(0) : T(1) / row_sum; }

template <typename T>
MK_HD T log_sum_exp(T row_max, T row_sum) {
  return row_sum == T(0) ? neg_inf<T>() : row_max + mk_log(row_sum);
}

// Probability recomputed in backward from the saved log-sum-exp.
template <typename T>
MK_HD T prob_from_lse(T score, T lse) {
  return lse == neg_inf<T>() ? T(0) : mk_exp(score - lse);
}

template <typename T>
MK_HD T sigmoid(T x) { return T(1) / (T(1) + mk_exp(-x)); }

// LM2/NTM gated write: new = sigmoid(f) * mem + sigmoid(i) * tanh(upd);
// the _gated forms take the gates sf = sigmoid(f), si = sigmoid(i) already
// computed (one per row when gate_dim is 1).
template <typename T>
MK_HD T gate_blend_gated(T mem, T upd, T sf, T si) {
  return sf * mem + si * mk_tanh(upd);
}

template <typename T>
MK_HD T gate_blend(T mem, T upd, T forget_logit, T input_logit) {
  return gate_blend_gated(mem, upd, sigmoid(forget_logit), sigmoid(input_logit));
}

// Gradients of gate_blend given d(new) = g.
template <typename T>
struct GateGrads { T d_mem, d_upd, d_forget, d_input; };

template <typename T>
MK_HD GateGrads<T> gate_blend_backward_gated(T g, T mem, T upd, T sf, T si) {
  const T u = mk_tanh(upd);
  GateGrads<T> r;
  r.d_mem = g * sf;
  r.d_upd = g * si * (T(1) - u * u);
  r.d_forget = g * mem * sf * (T(1) - sf);
  r.d_input = g * u * si * (T(1) - si);
  return r;
}

template <typename T>
MK_HD GateGrads<T> gate_blend_backward(T g, T mem, T upd, T forget_logit, T input_logit) {
  return gate_blend_backward_gated(g, mem, upd, sigmoid(forget_logit), sigmoid(input_logit));
}

}  // namespace memkernels
