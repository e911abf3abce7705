// Fused inference step of one reading layer (the decode hot path):
//   out = hidden + read(rms_norm(hidden) @ Wq^T, K, V) @ Wo
// with the norm weight folded into Wq and the gate into Wo by the caller.
// One call instead of ~10 small ATen ops: per decode token, the fixed cost of
// those ops was as large as the read of a small bank.
#include <cmath>
#include <vector>

#include "slot_bank_cpu.h"

namespace memkernels::cpu {

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
  gemm<T>(false, true, N, W, C, T(1), xn.data(), C, r.query_w, C, T(0), q.data(), W);
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
                        r.scale};
  read_forward(p, og.data(), lse.data());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h)
      std::copy(og.data() + group_row(n, h) * D, og.data() + (group_row(n, h) + 1) * D,
                q.data() + n * W + h * D);
  std::copy(r.hidden_states, r.hidden_states + N * C, out);
  gemm<T>(false, false, N, C, W, T(1), q.data(), W, r.out_w, C, T(1), out, C);
}

template void reader_forward<float>(const ReaderProblem<float>&, float*);
template void reader_forward<double>(const ReaderProblem<double>&, double*);
template void reader_forward<float, bf16>(const ReaderProblem<float, bf16>&, float*);

}  // namespace memkernels::cpu
