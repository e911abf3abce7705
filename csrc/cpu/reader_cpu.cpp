// Fused inference step of one reading layer (the decode hot path):
//   out = hidden + read(query(rms_norm(hidden)), K, V) @ Wo
// query(x) = x @ Wq^T (the blend rule's reader), or unit(gelu(x @ W1^T + b1
// [+ context @ W1c^T]) @ Wq^T + bq) per head (the append rule's MLP query, with
// MemoryConfig.context_decay the context beside x); the norm weight is
// folded into the first projection and the gate into Wo by the caller.
// One call instead of ~10 small ATen ops: per decode token, the fixed cost of
// those ops was as large as the read of a small bank.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
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

// y[n] = x[n] @ w^T (+ bias): [N, width_in] -> [N, width_out]
template <typename T>
void project(const T* x, const T* w, const T* bias, int64_t N, int64_t width_out,
             int64_t width_in, T* y) {
  // A decode step has a row or a few: the vendor GEMM's per-call cost (and its
  // thread hand-off) is then more than the arithmetic of a 512 x 128 GEMV.
  bool done = false;
  if constexpr (std::is_same_v<T, float>) {
    if (N <= kGemvRows) done = few_rows_project(x, N, w, width_out, width_in, y);
  }
  if (done) {
  } else if (N <= kGemvRows) {
    for (int64_t n = 0; n < N; ++n)
      single_row_scores<T, T>(x + n * width_in, w, width_out, width_in, T(1), y + n * width_out);
  } else {
    gemm<T>(false, true, N, width_out, width_in, T(1), x, width_in, w, width_in, T(0), y,
            width_out);
  }
  if (bias != nullptr)
    for (int64_t n = 0; n < N; ++n) add_rows(y + n * width_out, bias, width_out);
}

// xn[n] = x[n] / rms(x[n]) for N rows of C: rms_norm without weight (folded into the next layer).
template <typename T>
void rms_norm_rows(const T* x, int64_t N, int64_t C, T eps, T* xn) {
  for (int64_t n = 0; n < N; ++n) {
    const T* row = x + n * C;
    T ss = 0;
    for (int64_t c = 0; c < C; ++c) ss += row[c] * row[c];
    const T inv = T(1) / std::sqrt(ss / T(C) + eps);
    for (int64_t c = 0; c < C; ++c) xn[n * C + c] = row[c] * inv;
  }
}

template <typename T>
void unit_rows(T* x, int64_t rows, int64_t D) {  // as F.normalize (eps 1e-12)
  for (int64_t r = 0; r < rows; ++r) {
    T* v = x + r * D;
    T ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += v[d] * v[d];
    const T inv = T(1) / std::max(std::sqrt(ss), T(1e-12));
    for (int64_t d = 0; d < D; ++d) v[d] *= inv;
  }
}

// One query row of kv head g read over its `probes` nearest clusters only
// (ReaderProblem::centroids): each cluster's keys are a contiguous range, read
// by the single-row kernel; the partial reads merge as online-softmax blocks
// whose max is their log-sum-exp and whose sum is 1 (slot_math.h).
template <typename T, typename KV>
void clustered_read_row(const ReaderProblem<T, KV>& r, int64_t g, const T* q, T* out,
                        std::vector<T>& scores, std::vector<T>& part, std::vector<T>& scratch,
                        std::vector<int64_t>& order) {
  const int64_t D = r.head_dim, S = r.slots, Cn = r.clusters;
  const int64_t* start = r.cluster_starts + g * (Cn + 1);
  scores.resize(Cn);
  single_row_scores<T, T>(q, r.centroids + g * Cn * D, Cn, D, T(1), scores.data());
  order.resize(Cn);
  for (int64_t j = 0; j < Cn; ++j) order[j] = j;
  const int64_t probes = std::min(r.probes, Cn);
  std::partial_sort(order.begin(), order.begin() + probes, order.end(),
                    [&](int64_t a, int64_t b) { return scores[a] > scores[b]; });
  part.resize(D);
  std::fill(out, out + D, T(0));
  T row_max = neg_inf<T>(), row_sum = 0;
  for (int64_t i = 0; i < probes; ++i) {
    const int64_t s0 = start[order[i]], n = start[order[i] + 1] - s0;
    if (n <= 0) continue;
    const int64_t at = g * S + s0;
    AttentionProblem<T, KV> sub{1, 1, n, D, q, r.keys + at * D, r.values + at * D, MaskIndex{},
                                r.scale, r.key_scale ? r.key_scale + at : nullptr,
                                r.value_scale ? r.value_scale + at : nullptr};
    T lse, correction;
    attention_forward_single_row(sub, 0, part.data(), &lse, scratch);
    row_max = online_softmax_rescale(row_max, lse, &correction);
    const T weight = exp_shifted(lse, row_max);
    row_sum = row_sum * correction + weight;
    for (int64_t d = 0; d < D; ++d) out[d] = out[d] * correction + weight * part[d];
  }
  const T inv = safe_inverse(row_sum);
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

// The read's row of (token n, kv head g, copy c of that head's query heads): the groups are
// the kv heads (a shared bank) or the (batch row, kv head) pairs, R rows each; query head
// h = c * Hk + g reads kv head g, as row c * rows + n of its group, rows tokens a copy.
template <typename T, typename KV>
int64_t group_row(const ReaderProblem<T, KV>& r, int64_t Hk, int64_t R, int64_t n, int64_t g,
                  int64_t c) {
  const int64_t rows = r.shared ? r.batch * r.tokens : r.tokens;
  const int64_t grp = r.shared ? g : (n / r.tokens) * Hk + g;
  return grp * R + c * rows + (r.shared ? n : n % r.tokens);
}

// The one-region step's buffers, kept from call to call by the thread that
// calls the layer (a decode loop calls it again and again: no allocation and
// no zeroing a call), and the blocks its projections share out.
struct OneRegionBuffers {
  std::vector<float> qg, og, xn, hid, q, lse, partial;
  BlockStealer mlp_blocks, query_blocks;
};
thread_local OneRegionBuffers one_region_buffers;
thread_local std::vector<float> read_scratch;  // each thread's, for its groups' reads

// The float decode step (at most kGemvRows rows, no index, no context) in one
// parallel region: norm + MLP, query projection, the read, the output
// projection, with a barrier between steps instead of a region each. Each step
// must wait for the one before, so the layer streams its bytes in four passes;
// a region a step also paid libgomp's hand-off between them (a plain read of
// the layer's bytes in four regions against one with barriers,
// memkernels_chain_reads; docs/log.md). The MLP and query projections share
// their weight rows out in blocks (BlockStealer), so neither thread waits out
// the other's slower stream; the output projection splits its weight rows
// statically (its partial sums add in a fixed order: the same output from
// call to call). False (nothing written) where a projection would not split
// over the threads: then the steps run one call each.
template <typename KV>
bool reader_forward_one_region(const ReaderProblem<float, KV>& r, float* out) {
  const int64_t N = r.batch * r.tokens, C = r.hidden, H = r.heads, D = r.head_dim;
  const int64_t W = H * D, M = r.mlp_hidden, width_in = M > 0 ? M : C;
  const int64_t Hk = r.kv_heads > 0 ? r.kv_heads : H, per_kv = H / Hk;
  const int64_t groups = r.shared ? Hk : r.batch * Hk, rows = r.shared ? N : r.tokens;
  const int64_t R = per_kv * rows;  // rows per group
  const int64_t threads = omp_get_max_threads();
  if (threads < 2 || N > kGemvRows || r.probes > 0 || r.context != nullptr) return false;
  if (!few_rows_projects(N, C) || (M > 0 && !few_rows_projects(N, M))) return false;
  // the projections split over all the threads (threads past the groups' count wait out the
  // read at its barrier)
  if ((M > 0 && M * C < kParallelWeights) || W * width_in < kParallelWeights ||
      few_rows_times_weight_threads(N, W, C, threads) < threads)
    return false;
  OneRegionBuffers& b = one_region_buffers;
  b.qg.resize(groups * R * D), b.og.resize(groups * R * D);  // the groups' query rows, outputs
  const AttentionProblem<float, KV> p{groups, R, r.slots, D, b.qg.data(), r.keys, r.values,
                                      MaskIndex{}, r.scale, r.key_scale, r.value_scale};
  if (!few_rows_applies(p)) return false;
  b.xn.resize(threads * N * C), b.hid.resize(M > 0 ? N * M : 0), b.q.resize(N * W);
  b.lse.resize(groups * R);
  b.partial.assign((threads - 1) * N * C, 0.0f);
  const auto blocks_of = [](int64_t cols, int64_t d) {
    const int64_t per = few_rows_project_block_columns(d);
    return (cols + per - 1) / per;
  };
  if (M > 0) b.mlp_blocks.reset(blocks_of(M, C), threads);
  b.query_blocks.reset(blocks_of(W, width_in), threads);
  float *const qg = b.qg.data(), *const og = b.og.data(), *const hid = b.hid.data();
  float *const q = b.q.data(), *const lse = b.lse.data(), *const partial = b.partial.data();
  auto at = [&](int64_t n, int64_t g, int64_t c) { return group_row(r, Hk, R, n, g, c); };
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    // the norm (a few rows of C) on every thread, into its own copy: no barrier after it
    float* const xn = b.xn.data() + t * N * C;
    rms_norm_rows(r.hidden_states, N, C, r.eps, xn);
    if (t == 0) std::copy(r.hidden_states, r.hidden_states + N * C, out);  // for the last step
    if (M > 0) {  // hid = gelu(xn @ mlp_w^T + mlp_b)
      few_rows_project_blocks(xn, N, r.mlp_w, M, C, hid, b.mlp_blocks, t,
                              [&](int64_t j0, int64_t j1) {
                                for (int64_t n = 0; n < N; ++n) {
                                  float* h = hid + n * M;
                                  if (r.mlp_b != nullptr) add_rows(h + j0, r.mlp_b + j0, j1 - j0);
                                  gelu_row(h + j0, j1 - j0);
                                }
                              });
#pragma omp barrier
    }
    few_rows_project_blocks(M > 0 ? hid : xn, N, r.query_w, W, width_in, q, b.query_blocks, t,
                            [&](int64_t j0, int64_t j1) {
                              if (r.query_b != nullptr)
                                for (int64_t n = 0; n < N; ++n)
                                  add_rows(q + n * W + j0, r.query_b + j0, j1 - j0);
                            });
#pragma omp barrier
    // the read: this thread's groups, each gathering its heads' query rows (unit length where
    // asked) and putting its output rows back in their place in q. The scratch is the
    // thread's own (thread_local), as for_each_group allocates it on the thread that uses
    // it: buffers made side by side before the region read ~10% slower
    // (memkernels_reader_cold; likely cache lines shared by the two threads' row
    // statistics, not measured).
    std::vector<float>& scratch = read_scratch;
    for (int64_t g = t; g < groups; g += T) {
      const int64_t kv = r.shared ? g : g % Hk;
      for (int64_t c = 0; c < per_kv; ++c)
        for (int64_t n = 0; n < N; ++n) {
          if (!r.shared && n / r.tokens != g / Hk) continue;
          float* row = qg + at(n, kv, c) * D;
          const float* src = q + n * W + (c * Hk + kv) * D;
          std::copy(src, src + D, row);
          if (r.unit_queries) unit_rows(row, 1, D);
        }
      few_rows_read(p, g, og + g * R * D, lse + g * R, scratch);
      for (int64_t c = 0; c < per_kv; ++c)
        for (int64_t n = 0; n < N; ++n) {
          if (!r.shared && n / r.tokens != g / Hk) continue;
          const float* row = og + at(n, kv, c) * D;
          std::copy(row, row + D, q + n * W + (c * Hk + kv) * D);
        }
    }
#pragma omp barrier
    few_rows_times_weight_share(q, N, r.out_w, W, C, out, partial, t, T);
  }
  return true;
}

}  // namespace

template <typename T, typename KV>
void reader_forward(const ReaderProblem<T, KV>& r, T* out) {
  const int64_t N = r.batch * r.tokens, C = r.hidden, H = r.heads, D = r.head_dim;
  const int64_t W = H * D, M = r.mlp_hidden;
  const int64_t Hk = r.kv_heads > 0 ? r.kv_heads : H, per_kv = H / Hk;
  if constexpr (std::is_same_v<T, float>) {
    if (reader_forward_one_region(r, out)) return;
  }
  std::vector<T> xn(N * C), hid(N * M), q(N * W);
  std::vector<T> from_context(r.context != nullptr ? N * M : 0);
  rms_norm_rows(r.hidden_states, N, C, r.eps, xn.data());
  if (M > 0) {
    project<T>(xn.data(), r.mlp_w, r.mlp_b, N, M, C, hid.data());
    if (r.context != nullptr) {  // the first layer's columns for the context
      project<T>(r.context, r.context_w, nullptr, N, M, C, from_context.data());
      add_rows(hid.data(), from_context.data(), N * M);
    }
    gelu_row(hid.data(), N * M);
    project<T>(hid.data(), r.query_w, r.query_b, N, W, M, q.data());
  } else {
    project<T>(xn.data(), r.query_w, r.query_b, N, W, C, q.data());
  }
  if (r.unit_queries) unit_rows(q.data(), N * H, D);
  // [N, H, D] -> read groups, one per kv head (shared bank) or per (b, kv
  // head); query head h = c * Hk + g reads kv head g, as row c * rows + n of
  // group g: the bank streams once for all its query heads (one pass per c
  // streamed it per_kv times: S=4096 cold, 4 kv heads of 2 query heads, 0.68
  // -> 0.48 ms on the AVX2 host; docs/log.md).
  const int64_t groups = r.shared ? Hk : r.batch * Hk, rows = r.shared ? N : r.tokens;
  if (r.probes > 0) {  // a shared bank with an index: each row reads its nearest clusters
    std::vector<T> scores, part, scratch, row(D);
    std::vector<int64_t> order;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h) {  // query head h = c * Hk + g reads kv head g
        T* qh = q.data() + n * W + h * D;
        clustered_read_row(r, h % Hk, qh, row.data(), scores, part, scratch, order);
        std::copy(row.begin(), row.end(), qh);
      }
  } else {  // every slot; a kv head's query heads are rows of one group
    const int64_t R = per_kv * rows;  // rows per group
    std::vector<T> qg(groups * R * D), og(groups * R * D), lse(groups * R);
    auto at = [&](int64_t n, int64_t g, int64_t c) { return group_row(r, Hk, R, n, g, c); };
    for (int64_t c = 0; c < per_kv; ++c)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t g = 0; g < Hk; ++g) {
          const T* src = q.data() + n * W + (c * Hk + g) * D;
          std::copy(src, src + D, qg.data() + at(n, g, c) * D);
        }
    AttentionProblem<T, KV> p{groups, R, r.slots, D, qg.data(), r.keys, r.values,
                              MaskIndex{}, r.scale, r.key_scale, r.value_scale};
    read_forward(p, og.data(), lse.data());
    for (int64_t c = 0; c < per_kv; ++c)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t g = 0; g < Hk; ++g)
          std::copy(og.data() + at(n, g, c) * D, og.data() + (at(n, g, c) + 1) * D,
                    q.data() + n * W + (c * Hk + g) * D);
  }
  if constexpr (std::is_same_v<T, float>) {
    if (N <= kGemvRows) {  // out = hidden + o @ Wo on the few-row blocks
      std::copy(r.hidden_states, r.hidden_states + N * C, out);
      if (few_rows_times_weight(q.data(), N, r.out_w, W, C, out)) return;
    }
  }
  if (N <= kGemvRows) {
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
