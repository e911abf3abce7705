// Fused inference step of one reading layer (the decode hot path):
//   out = hidden + read(rms_norm(hidden) @ Wq^T, K, V) @ Wo
// with the norm weight folded into Wq and the gate into Wo by the caller.
// One call instead of ~10 small ATen ops: per decode token, the fixed cost of
// those ops was as large as the read of a small bank.
#include <cmath>
#include <vector>

#include "slot_bank_cpu.h"

namespace memkernels::cpu {

namespace {

constexpr int64_t kGemvRows = 4;  // up to this many rows the projections are our GEMVs

template <typename T>
MK_CPU_CLONES void add_rows(T* dst, const T* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

}  // namespace

template <typename T, typename KV>
void reader_forward(const ReaderProblem<T, KV>& r, T* out) {
  const int64_t N = r.batch * r.tokens, C = r.hidden, H = r.heads, D = r.head_dim;
  const int64_t W = H * D;
  std::vector<T> xn(N * C), q(N * W), qg(N * W), og(N * W), lse(N * H);
  for (int64_t n = 0; n < N; ++n) {  // rms_norm without weight (folded into Wq)
    const T* x = r.hidden_states + n * C;
    T ss = 0;
    for (int64_t c = 0; c < C; ++c) ss += x[c] * x[c];
    const T inv = T(1) / std::sqrt(ss / T(C) + r.eps);
    for (int64_t c = 0; c < C; ++c) xn[n * C + c] = x[c] * inv;
  }
  // A decode step has a row or a few: the vendor GEMM's per-call cost (and its
  // thread hand-off) is then more than the arithmetic of a 512 x 128 GEMV.
  const bool few_rows = N <= kGemvRows;
  if (few_rows) {
    for (int64_t n = 0; n < N; ++n)  // q[n, j] = <Wq[j], xn[n]>
      single_row_scores<T, T>(xn.data() + n * C, r.query_w, W, C, T(1), q.data() + n * W);
  } else {
    gemm<T>(false, true, N, W, C, T(1), xn.data(), C, r.query_w, C, T(0), q.data(), W);
  }
  // [N, H, D] -> read groups: a shared bank is one group per head holding all
  // N rows; a bank per sequence is one group per (b, h) holding its T rows.
  const int64_t groups = r.shared ? H : r.batch * H, rows = r.shared ? N : r.tokens;
  auto group_row = [&](int64_t n, int64_t h) {
    return r.shared ? h * N + n : ((n / r.tokens) * H + h) * r.tokens + n % r.tokens;
  };
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h)
      std::copy(q.data() + n * W + h * D, q.data() + n * W + (h + 1) * D,
                qg.data() + group_row(n, h) * D);
  AttentionProblem<T, KV> p{groups, rows, r.slots, D, qg.data(), r.keys, r.values, MaskIndex{},
                            r.scale, r.key_scale, r.value_scale};
  read_forward(p, og.data(), lse.data());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h)
      std::copy(og.data() + group_row(n, h) * D, og.data() + (group_row(n, h) + 1) * D,
                q.data() + n * W + h * D);
  if (few_rows) {
    for (int64_t n = 0; n < N; ++n) {  // out[n] = hidden[n] + sum_j o[n, j] * Wo[j]
      single_row_values<T, T>(q.data() + n * W, r.out_w, W, C, out + n * C);
      add_rows(out + n * C, r.hidden_states + n * C, C);
    }
    return;
  }
  std::copy(r.hidden_states, r.hidden_states + N * C, out);
  gemm<T>(false, false, N, C, W, T(1), q.data(), W, r.out_w, C, T(1), out, C);
}

template void reader_forward<float>(const ReaderProblem<float>&, float*);
template void reader_forward<double>(const ReaderProblem<double>&, double*);
template void reader_forward<float, bf16>(const ReaderProblem<float, bf16>&, float*);
template void reader_forward<float, int8_t>(const ReaderProblem<float, int8_t>&, float*);

}  // namespace memkernels::cpu
