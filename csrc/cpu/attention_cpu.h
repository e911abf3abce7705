// Fused attention core shared by the read and the write kernels on the CPU.
//
// A problem is G independent groups; group g has M query rows and N keys:
//   q [G, M, D], k/v [G, N, D] contiguous, out [G, M, D], lse [G, M].
// The read op maps (head) or (batch, head) to a group; the write op maps
// (batch, head) to a group whose queries are the slots and keys the tokens.
// Scores exist only as one [BLOCK_M, BLOCK_N] tile at a time (online softmax).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../slot_math.h"
#include "blas.h"
#include "row_kernels.h"

namespace memkernels::cpu {

constexpr int64_t kBlockM = 128;  // query rows per tile
constexpr int64_t kBlockN = 512;  // keys per tile: K/V tile (64 KiB at D=64) stays in L2

template <typename T>
struct AttentionProblem {
  int64_t groups, rows, keys, dim;
  const T* q;
  const T* k;
  const T* v;
  MaskIndex mask;
  T scale;
};

// Forward for rows [r0, r0 + mr) of group g: writes out[mr, D] and lse[mr].
template <typename T>
void attention_forward_tile(const AttentionProblem<T>& p, int64_t g, int64_t r0, int64_t mr,
                            T* out, T* lse, std::vector<T>& scratch) {
  const int64_t D = p.dim, N = p.keys;
  const T* q = p.q + (g * p.rows + r0) * D;
  const T* k = p.k + g * N * D;
  const T* v = p.v + g * N * D;
  scratch.resize(kBlockM * kBlockN + 2 * kBlockM);
  T* scores = scratch.data();
  T* row_max = scores + kBlockM * kBlockN;
  T* row_sum = row_max + kBlockM;
  std::fill(row_max, row_max + mr, neg_inf<T>());
  std::fill(row_sum, row_sum + mr, T(0));
  std::fill(out, out + mr * D, T(0));

  for (int64_t n0 = 0; n0 < N; n0 += kBlockN) {
    const int64_t nb = std::min(kBlockN, N - n0);
    gemm<T>(false, true, mr, nb, D, p.scale, q, D, k + n0 * D, D, T(0), scores, nb);
    for (int64_t r = 0; r < mr; ++r) {
      T* s = scores + r * nb;
      const bool* valid = p.mask.mask ? p.mask.row(g, r0 + r) + n0 : nullptr;
      T correction;
      const T new_max = online_softmax_rescale(row_max[r], mask_and_max(s, valid, nb), &correction);
      row_sum[r] = row_sum[r] * correction + exp_row(s, nb, new_max);
      row_max[r] = new_max;
      if (correction != T(1)) {
        T* o = out + r * D;
        for (int64_t d = 0; d < D; ++d) o[d] *= correction;
      }
    }
    gemm<T>(false, false, mr, D, nb, T(1), scores, nb, v + n0 * D, D, T(1), out, D);
  }
  for (int64_t r = 0; r < mr; ++r) {
    const T inv = safe_inverse(row_sum[r]);
    T* o = out + r * D;
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    lse[r] = log_sum_exp(row_max[r], row_sum[r]);
  }
}

// Backward for a whole group g (FlashAttention-2 recipe, one thread owns the
// group so dK/dV accumulate without atomics). dq/dk/dv are overwritten.
template <typename T>
void attention_backward_group(const AttentionProblem<T>& p, int64_t g, const T* out,
                              const T* dout, const T* lse, T* dq, T* dk, T* dv,
                              std::vector<T>& scratch) {
  const int64_t D = p.dim, N = p.keys, M = p.rows;
  const T* q = p.q + g * M * D;
  const T* k = p.k + g * N * D;
  const T* v = p.v + g * N * D;
  scratch.resize(2 * kBlockM * kBlockN + M);
  T* probs = scratch.data();
  T* dprobs = probs + kBlockM * kBlockN;
  T* delta = dprobs + kBlockM * kBlockN;  // rowsum(dO * O)
  for (int64_t r = 0; r < M; ++r) {
    T acc = 0;
    for (int64_t d = 0; d < D; ++d) acc += dout[r * D + d] * out[r * D + d];
    delta[r] = acc;
  }
  std::fill(dq, dq + M * D, T(0));
  std::fill(dk, dk + N * D, T(0));
  std::fill(dv, dv + N * D, T(0));

  for (int64_t n0 = 0; n0 < N; n0 += kBlockN) {
    const int64_t nb = std::min(kBlockN, N - n0);
    for (int64_t r0 = 0; r0 < M; r0 += kBlockM) {
      const int64_t mr = std::min(kBlockM, M - r0);
      gemm<T>(false, true, mr, nb, D, p.scale, q + r0 * D, D, k + n0 * D, D, T(0), probs, nb);
      gemm<T>(false, true, mr, nb, D, T(1), dout + r0 * D, D, v + n0 * D, D, T(0), dprobs, nb);
      for (int64_t r = 0; r < mr; ++r) {
        const bool* valid = p.mask.mask ? p.mask.row(g, r0 + r) + n0 : nullptr;
        T* pr = probs + r * nb;
        T* dp = dprobs + r * nb;
        if (valid) {  // a masked score is -inf: its probability and gradient are 0
#pragma omp simd
          for (int64_t j = 0; j < nb; ++j) pr[j] = valid[j] ? pr[j] : neg_inf<T>();
        }
        softmax_grad_row(pr, dp, nb, lse[r0 + r], delta[r0 + r], p.scale);  // dp <- dScore
      }
      gemm<T>(true, false, nb, D, mr, T(1), probs, nb, dout + r0 * D, D, T(1), dv + n0 * D, D);
      gemm<T>(false, false, mr, D, nb, T(1), dprobs, nb, k + n0 * D, D, T(1), dq + r0 * D, D);
      gemm<T>(true, false, nb, D, mr, T(1), dprobs, nb, q + r0 * D, D, T(1), dk + n0 * D, D);
    }
  }
}

}  // namespace memkernels::cpu
