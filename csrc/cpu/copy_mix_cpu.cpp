// The copy rule's mixture of the memory's and the LM's next-token
// distributions at inference, fused (memkernels.memory.copy.CopyReader.mix;
// the math: memkernels.ops.reference.copy_mix). One call per decode step
// instead of ~15 small ATen ops: with a small host LM, the fixed cost of
// those ops was a tenth of the LM's own step. It reads the LM head's own
// weight (with 1 / its row lengths), which the head has just read: still in
// cache, where a separate unit-length copy would be a cold read.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "slot_bank_cpu.h"

namespace memkernels::cpu {

namespace {

template <typename T>
T log_sigmoid(T x) {  // -softplus(-x), stable for either sign
  return std::min(x, T(0)) - std::log1p(std::exp(-std::abs(x)));
}

// torch.logaddexp: equal infinities stay themselves; NaN propagates
template <typename T>
T log_add_exp(T a, T b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<T>::quiet_NaN();
  if (a == b && std::isinf(a)) return a;
  const T m = std::max(a, b);
  return m + std::log1p(std::exp(-std::abs(a - b)));
}

// The shift of log_softmax over n values: log sum exp, or NaN where
// torch.log_softmax gives a NaN row (a NaN or a +inf among them); all -inf
// gives -inf (the row x - (-inf) is then NaN, as torch's)
template <typename T>
T log_sum_exp(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return x[i];
    m = std::max(m, x[i]);
  }
  if (m == std::numeric_limits<T>::infinity()) return std::numeric_limits<T>::quiet_NaN();
  if (std::isinf(m)) return m;
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += std::exp(x[i] - m);
  return m + std::log(sum);
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace

template <typename T>
void copy_mix_forward(const CopyMixProblem<T>& p, T* out) {
  const int64_t R = p.rows, C = p.hidden, V = p.vocab;
  // the memory's logits, read @ units^T, written straight into out
  bool projected = false;
  if constexpr (std::is_same_v<T, float>) {
    // a decode step's few rows: the register-blocked GEMV of the reading layer
    projected = R <= kFewRowsMax && few_rows_project(p.read, R, p.units, V, C, out);
  }
  if (!projected) {
#pragma omp parallel for collapse(2) if (R * V * C >= (1 << 16))
    for (int64_t r = 0; r < R; ++r)
      for (int64_t v = 0; v < V; ++v) out[r * V + v] = dot(p.read + r * C, p.units + v * C, C);
  }
#pragma omp parallel for if (R * V >= (1 << 15))
  for (int64_t r = 0; r < R; ++r) {
    const T* h = p.hidden_states + r * C;
    const T* rd = p.read + r * C;
    const T* lg = p.logits + r * V;
    T* o = out + r * V;
    const T rms = T(1) / std::sqrt(dot(h, h, C) / T(C) + p.eps);
    const T g = p.gate_bias + p.gate_confidence * dot(rd, rd, C) + rms * dot(h, p.gate_w, C);
    if (p.unit_scale) {
      for (int64_t v = 0; v < V; ++v) o[v] *= p.sharpness * p.unit_scale[v];
    } else {
      for (int64_t v = 0; v < V; ++v) o[v] *= p.sharpness;
    }
    const T memory_shift = log_sigmoid(g) - log_sum_exp(o, V);
    const T lm_shift = log_sigmoid(-g) - log_sum_exp(lg, V);
    for (int64_t v = 0; v < V; ++v) o[v] = log_add_exp(o[v] + memory_shift, lg[v] + lm_shift);
  }
}

template void copy_mix_forward<float>(const CopyMixProblem<float>&, float*);
template void copy_mix_forward<double>(const CopyMixProblem<double>&, double*);

}  // namespace memkernels::cpu
