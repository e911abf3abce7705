#include "slot_bank_cpu.h"

#include <omp.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace memkernels::cpu {

namespace {

// Runs body(g, r0, mr, scratch) over every group's rows in spans of up to
// kMaxTilesPerSpan [kBlockM]-row tiles, in parallel, one scratch buffer per
// thread. A span prepares each key block once for all its tiles (the
// transposed K of the tile GEMMs, widened bf16 / int8 blocks), so spans are
// as long as still leaves ~4 per thread to balance the load.
constexpr int64_t kMaxTilesPerSpan = 4;

template <typename T, typename KV, typename Body>
void for_each_row_span(const AttentionProblem<T, KV>& p, Body body) {
  const int64_t tiles_per_group = (p.rows + kBlockM - 1) / kBlockM;
  const int64_t threads = omp_get_max_threads();
  const int64_t tiles_per_span = std::max<int64_t>(
      1, std::min<int64_t>(kMaxTilesPerSpan, p.groups * tiles_per_group / (4 * threads)));
  const int64_t span_rows = tiles_per_span * kBlockM;
  const int64_t spans_per_group = (p.rows + span_rows - 1) / span_rows;
  const int64_t items = p.groups * spans_per_group;
#pragma omp parallel
  {
    std::vector<T> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t g = item / spans_per_group;
      const int64_t r0 = (item % spans_per_group) * span_rows;
      body(g, r0, std::min(span_rows, p.rows - r0), scratch);
    }
  }
}

// work: elements touched in all; below kParallelWork a thread hand-off costs
// more than it saves (a decode read of a tiny bank).
constexpr int64_t kParallelWork = 1 << 15;

template <typename T, typename Body>
void for_each_group(int64_t groups, Body body, int64_t work = kParallelWork) {
#pragma omp parallel if (work >= kParallelWork)
  {
    std::vector<T> scratch, extra;
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < groups; ++g) body(g, scratch, extra);
  }
}

}  // namespace

template <typename T, typename KV>
void read_forward(const AttentionProblem<T, KV>& p, T* out, T* lse) {
  const int64_t D = p.dim;
  if constexpr (std::is_same_v<T, float>) {
    if (few_rows_applies(p)) {  // decode: a few query rows per group (few_rows.h)
      for_each_group<T>(p.groups, [&](int64_t g, std::vector<T>& scratch, std::vector<T>&) {
        few_rows_read(p, g, out + g * p.rows * D, lse + g * p.rows, scratch);
      }, p.groups * p.rows * p.keys * D);
      return;
    }
  }
  if (p.rows == 1 && p.mask.mask == nullptr) {  // decode: one query per group
    for_each_group<T>(p.groups, [&](int64_t g, std::vector<T>& scratch, std::vector<T>&) {
      attention_forward_single_row(p, g, out + g * D, lse + g, scratch);
    }, p.groups * p.keys * D);
    return;
  }
  for_each_row_span(p, [&](int64_t g, int64_t r0, int64_t mr, std::vector<T>& scratch) {
    const int64_t row = g * p.rows + r0;
    attention_forward_rows(p, g, r0, mr, out + row * D, lse + row, scratch);
  });
}

template <typename T>
void read_forward_keeping_probs(const AttentionProblem<T>& p, T* out, T* lse, T* probs,
                                T* probs_max) {
  const int64_t D = p.dim, M = p.rows, blocks = read_probs_blocks(p.keys);
  const int64_t ld = read_probs_ld(p.keys);
  if (probs_max == nullptr) probs = nullptr;  // nothing to keep (no slot): a plain read
  for_each_row_span(p, [&](int64_t g, int64_t r0, int64_t mr, std::vector<T>& scratch) {
    const int64_t row = g * M + r0;
    const KeptProbs<T> kept{probs ? probs + (g * blocks * M + r0) * ld : nullptr,
                            probs ? probs_max + g * blocks * M + r0 : nullptr, ld, M};
    attention_forward_rows(p, g, r0, mr, out + row * D, lse + row, scratch,
                           static_cast<T*>(nullptr), 0, kept);
  });
}

template <typename T>
void read_backward(const AttentionProblem<T>& p, const T* out, const T* dout, const T* lse,
                   T* dq, T* dk, T* dv, const T* probs, const T* probs_max) {
  const int64_t M = p.rows, N = p.keys, D = p.dim, blocks = read_probs_blocks(N);
  const int64_t ld = read_probs_ld(N);
  if (probs_max == nullptr) probs = nullptr;
  for_each_group<T>(p.groups, [&](int64_t g, std::vector<T>& scratch, std::vector<T>&) {
    const KeptProbs<const T> kept{probs ? probs + g * blocks * M * ld : nullptr,
                                  probs ? probs_max + g * blocks * M : nullptr, ld, M};
    attention_backward_group(p, g, out + g * M * D, dout + g * M * D, lse + g * M,
                             dq + g * M * D, dk + g * N * D, dv + g * N * D, scratch,
                             static_cast<const T*>(nullptr), 0, kept);
  });
}

template <typename T>
void write_forward(const WriteProblem<T>& w, T* new_mem, T* upd, T* lse, T* probs) {
  const auto& p = w.attn;
  const int64_t D = p.dim, gd = w.gate_dim, pld = saved_probs_ld(p.keys);
  if (!write_probs_savable(p.keys)) probs = nullptr;  // a tile's P is final in one key block only
  for_each_row_span(p, [&](int64_t g, int64_t r0, int64_t mr, std::vector<T>& scratch) {
    const int64_t row = g * p.rows + r0;
    T* upd_tile = upd + row * D;
    attention_forward_rows(p, g, r0, mr, upd_tile, lse + row, scratch,
                           probs ? probs + row * pld : nullptr, pld);
    // Fused epilogue: blend the tile into the bank while it is still in cache.
    for (int64_t r = 0; r < mr; ++r) {
      const int64_t e = (row + r) * D, ge = (row + r) * gd;
      gate_blend_row(new_mem + e, w.mem + e, upd_tile + r * D, w.forget_logit + ge,
                     w.input_logit + ge, D, gd);
    }
  });
}

template <typename T>
void write_backward(const WriteProblem<T>& w, const T* upd, const T* lse, const T* dnew,
                    T* dmem, T* dq, T* dk, T* dv, T* dforget, T* dinput, const T* probs) {
  const auto& p = w.attn;
  const int64_t M = p.rows, N = p.keys, D = p.dim, gd = w.gate_dim, pld = saved_probs_ld(N);
  if (!write_probs_savable(N)) probs = nullptr;
  for_each_group<T>(p.groups, [&](int64_t g, std::vector<T>& scratch, std::vector<T>& dupd) {
    // Prologue: gate gradients and d(upd), fused with the attention backward.
    dupd.resize(M * D);
    for (int64_t r = 0; r < M; ++r) {
      const int64_t row = g * M + r, e = row * D, ge = row * gd;
      gate_blend_backward_row(dnew + e, w.mem + e, upd + e, w.forget_logit + ge,
                              w.input_logit + ge, D, gd, dmem + e, dupd.data() + r * D,
                              dforget + ge, dinput + ge);
    }
    attention_backward_group(p, g, upd + g * M * D, dupd.data(), lse + g * M,
                             dq + g * M * D, dk + g * N * D, dv + g * N * D, scratch,
                             probs ? probs + g * M * pld : nullptr, pld);
  });
}

#define MK_INSTANTIATE(T)                                                                   \
  template void read_forward<T>(const AttentionProblem<T>&, T*, T*);                        \
  template void read_forward_keeping_probs<T>(const AttentionProblem<T>&, T*, T*, T*, T*);   \
  template void read_backward<T>(const AttentionProblem<T>&, const T*, const T*, const T*, \
                                 T*, T*, T*, const T*, const T*);                           \
  template void write_forward<T>(const WriteProblem<T>&, T*, T*, T*, T*);                   \
  template void write_backward<T>(const WriteProblem<T>&, const T*, const T*, const T*, T*, \
                                  T*, T*, T*, T*, T*, const T*);
MK_INSTANTIATE(float)
MK_INSTANTIATE(double)
#undef MK_INSTANTIATE
template void read_forward<float, bf16>(const AttentionProblem<float, bf16>&, float*, float*);
template void read_forward<float, int8_t>(const AttentionProblem<float, int8_t>&, float*, float*);

}  // namespace memkernels::cpu
