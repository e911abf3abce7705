// The few-row read: 1 to kFewRowsMax query rows of one group over its bank,
// float queries, float / bf16 / int8 keys and values, head dims a multiple of
// the vector width (16 floats on AVX-512, 8 on AVX2). The body is
// few_rows_body.inc, compiled here once per ISA; few_rows_read() picks the
// widest the CPU runs (simd.h: MEMKERNELS_CPU_ISA caps it) and returns false
// where no body applies (then the caller takes the portable path).
//
// Why a kernel of its own: with a shared bank a decode step is B rows per
// head, and the tile path's two GEMM calls per 512 keys on 8-row tiles, plus
// a pass over the score tile per row, kept it at half the bank's bandwidth.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../slot_math.h"
#include "block_stealer.h"
#include "simd.h"

namespace memkernels::cpu {


constexpr int64_t kFewRowsMax = 16;

template <typename KV>
struct FewRowsArgs {
  int64_t rows, keys, dim, chunk;  // chunk: keys per pass, a multiple of 4
  const float* q;                  // [rows, dim]
  const KV* k;                     // [keys, dim]
  const KV* v;
  const float* k_scale;  // int8: [keys], else nullptr
  const float* v_scale;
  float scale;
  MaskIndex mask;  // rows of group `group`
  int64_t group;
  float* out;      // [rows, dim]
  float* lse;      // [rows]
  float* scratch;  // few_rows_scratch() floats
};

// Keys per pass of the read: 16 KiB of K (and as much of V) where the
// chunk should stay in L1 (below), else 64 KiB, which spreads each row's
// per-chunk softmax bookkeeping over more keys.
template <typename KV>
inline int64_t few_rows_chunk(int64_t D, bool in_l1) {
  const int64_t bytes = in_l1 ? 16384 : 65536;  // D >= 1 (few_rows_projects); divided, not
                                                 // multiplied, so no width overflows it
  const int64_t keys = (bytes / int64_t(sizeof(KV)) / D) & ~int64_t(3);
  return keys < 16 ? 16 : keys > 1024 ? 1024 : keys;
}

// The key-major pass (few_rows_body.inc) pads its rows to 8 or 16 lanes.
inline int64_t few_rows_scratch(int64_t rows, int64_t D, int64_t chunk) {
  const int64_t lanes = std::max<int64_t>(rows, 16);
  return lanes * D + lanes * chunk + 2 * lanes;
}

#define MK_ISA_BODY "few_rows_body.inc"
#include "per_isa.h"

#ifdef MK_HAVE_SIMD_VEC
// Floats per vector, and rows per register block, of the body `isa` runs.
inline int64_t vector_width(Isa isa) { return isa == Isa::avx512 ? 16 : 8; }
inline int64_t rows_per_block(Isa isa) {
  return isa == Isa::avx512 ? isa_avx512::Vec::kRows : isa_avx2::Vec::kRows;
}

// Whether the read's chunk should stay in L1: several row blocks of M rows
// re-read it, and each block's loads are many a FMA cycle. Not so for one
// row block, nor for AVX-512 on 256-bit units, where the 8-row read ran 7%
// faster hot and 6% faster from DRAM with 64 KiB chunks read from L2; there
// the AVX2 body (2-row blocks) ran 13-16% slower with them (docs/log.md,
// kernels v31). Full-width AVX-512 (Zen 5) was not measured with them, nor
// with 3-4 rows through the chunked pass (kernels v34) at either chunk.
// MEMKERNELS_CPU_CHUNK=l1|l2 forces either (tests run both chunks on any CPU).
inline bool few_rows_chunk_in_l1(Isa isa, int64_t M) {
  static const int forced = [] {  // 1: L1, 2: L2, 0: as above (read once)
    const char* v = std::getenv("MEMKERNELS_CPU_CHUNK");
    if (v == nullptr) return 0;
    return std::strcmp(v, "l1") == 0 ? 1 : std::strcmp(v, "l2") == 0 ? 2 : 0;
  }();
  if (forced != 0) return forced == 1;
  return M > rows_per_block(isa) && !(isa == Isa::avx512 && avx512_on_half_width_units());
}

// Whether the read of M rows of head dim D takes the chunked pass on this
// CPU's body (else the one-pass body: 1-2 rows that fit the registers).
inline bool few_rows_chunked(int64_t M, int64_t D) {
  return best_isa() == Isa::avx512 ? !isa_avx512::one_pass_takes(M, D)
                                   : !isa_avx2::one_pass_takes(M, D);
}

// Keys a pass of the read for M rows of head dim D (float K and V) on this CPU.
inline int64_t few_rows_chunk_keys(int64_t M, int64_t D) {
  return few_rows_chunk<float>(D, few_rows_chunk_in_l1(best_isa(), M));
}

// The vectors a key's scores take where the chunked pass of M rows of head dim
// D (float K and V, no mask) is key-major on this CPU; 0 where it is row-major
// or the one-pass body runs. Requires few_rows_projects(M, D).
inline int few_rows_key_major_vectors(int64_t M, int64_t D) {
  if (!few_rows_chunked(M, D)) return 0;
  return best_isa() == Isa::avx512 ? isa_avx512::key_major_vectors(M)
                                   : isa_avx2::key_major_vectors(M);
}
#endif

// Whether the few-row bodies take M rows of width D on this CPU: a vector body runs, 1 to
// kFewRowsMax rows, D a multiple of its vector width (the read's head dim; the inner width of
// few_rows_project, the output width of few_rows_times_weight).
inline bool few_rows_projects(int64_t M, int64_t D) {
#ifdef MK_HAVE_SIMD_VEC
  const Isa isa = best_isa();
  return isa != Isa::generic && M >= 1 && M <= kFewRowsMax && D >= vector_width(isa) &&
         D % vector_width(isa) == 0;
#else
  (void)M, (void)D;
  return false;
#endif
}

// Whether few_rows_read applies to p: the CPU, the row count and the head dim allow it.
template <typename KV>
bool few_rows_applies(const AttentionProblem<float, KV>& p) {
  return few_rows_projects(p.rows, p.dim) && p.keys >= 1;
}

// Group g's rows of p through the few-row body; false (nothing written) when
// it does not apply.
template <typename KV>
bool few_rows_read(const AttentionProblem<float, KV>& p, int64_t g, float* out, float* lse,
                   std::vector<float>& scratch) {
#ifdef MK_HAVE_SIMD_VEC
  if (!few_rows_applies(p)) return false;
  const Isa isa = best_isa();
  const int64_t D = p.dim, M = p.rows, N = p.keys;
  const int64_t chunk = few_rows_chunk<KV>(D, few_rows_chunk_in_l1(isa, M));
  scratch.resize(few_rows_scratch(M, D, chunk));
  const FewRowsArgs<KV> a{M, N, D, chunk, p.q + g * M * D, p.k + g * N * D, p.v + g * N * D,
                          p.k_scale ? p.k_scale + g * N : nullptr,
                          p.v_scale ? p.v_scale + g * N : nullptr, p.scale, p.mask, g, out, lse,
                          scratch.data()};
  if (isa == Isa::avx512)
    isa_avx512::few_rows_forward(a);
  else
    isa_avx2::few_rows_forward(a);
  return true;
#else
  (void)p, (void)g, (void)out, (void)lse, (void)scratch;
  return false;
#endif
}

// The reading layer's decode projections on the same blocks, split over the
// threads once the weights are large enough to be worth a hand-off (a cold
// 512 x 512 projection is DRAM-bound: one thread streams ~half the bytes/s
// that two do). False where no body applies (then the caller's GEMV runs).
// Each comes as a share, thread t of `threads` (called inside a parallel
// region: the fused reading layer runs its steps in one), and as a call that
// opens its own region.
constexpr int64_t kParallelWeights = 1 << 16;  // weight elements

// Thread t's output columns [*j0, *j1) of a projection to N columns.
inline void few_rows_project_columns(int64_t N, int64_t t, int64_t threads, int64_t* j0,
                                     int64_t* j1) {
  const int64_t per = ((N + threads - 1) / threads + 3) & ~int64_t(3);
  *j0 = std::min(N, t * per);
  *j1 = std::min(N, *j0 + per);
}

// y[m * N + j] = <x_m, w_j> for the columns j in [j0, j1). Requires few_rows_projects(M, D).
inline void few_rows_project_range(const float* x, int64_t M, const float* w, int64_t N,
                                   int64_t D, float* y, int64_t j0, int64_t j1) {
#ifdef MK_HAVE_SIMD_VEC
  const Isa isa = best_isa();
  if (j0 >= j1) return;
  if (M <= rows_per_block(isa)) {  // one row block: the weights in order
    if (isa == Isa::avx512)
      isa_avx512::rows_dot_weight_rows_in_order(x, M, w, j0, j1, D, y, N);
    else
      isa_avx2::rows_dot_weight_rows_in_order(x, M, w, j0, j1, D, y, N);
  } else {  // more rows: 4 weight rows a step share each row's loads
    // 16 KiB of weight rows a pass: in L1 while each row block reads them
    const int64_t chunk = few_rows_chunk<float>(D, true);
    if (isa == Isa::avx512)
      isa_avx512::rows_dot_weight_rows(x, M, w, j0, j1, D, y, N, chunk);
    else
      isa_avx2::rows_dot_weight_rows(x, M, w, j0, j1, D, y, N, chunk);
  }
#else
  (void)x, (void)M, (void)w, (void)N, (void)D, (void)y, (void)j0, (void)j1;
#endif
}

// Thread t's share of y[m * N + j] = <x_m, w_j>: the columns few_rows_project_columns gives it.
// Requires few_rows_projects(M, D).
inline void few_rows_project_share(const float* x, int64_t M, const float* w, int64_t N,
                                   int64_t D, float* y, int64_t t, int64_t threads) {
  int64_t j0, j1;
  few_rows_project_columns(N, t, threads, &j0, &j1);
  few_rows_project_range(x, M, w, N, D, y, j0, j1);
}

// Columns a block of a projection whose weight rows are D wide, shared out by
// a BlockStealer: 16 KiB of weights, a multiple of 4 rows (at least 4).
inline int64_t few_rows_project_block_columns(int64_t D) {
  return std::max<int64_t>(4, (4096 / std::max<int64_t>(D, 1)) & ~int64_t(3));
}

// The blocks of y[m * N + j] = <x_m, w_j> that thread t takes from `blocks`
// (reset to ceil(N / few_rows_project_block_columns(D)) blocks before the
// region); after_block(j0, j1) runs on each block's columns once they are
// written. Each column is one thread's whole dot product, so y is the same
// whichever thread takes it. Requires few_rows_projects(M, D).
template <typename F>
void few_rows_project_blocks(const float* x, int64_t M, const float* w, int64_t N, int64_t D,
                             float* y, BlockStealer& blocks, int64_t t, F&& after_block) {
  const int64_t per = few_rows_project_block_columns(D);
  for (int64_t b; (b = blocks.next(t)) >= 0;) {
    const int64_t j0 = b * per, j1 = std::min(N, j0 + per);
    few_rows_project_range(x, M, w, N, D, y, j0, j1);
    after_block(j0, j1);
  }
}

// y[m * N + j] = <x_m, w_j>: x [M, D], w [N, D], y [M, N], M <= kFewRowsMax.
inline bool few_rows_project(const float* x, int64_t M, const float* w, int64_t N, int64_t D,
                             float* y) {
  if (!few_rows_projects(M, D) || N < 1) return false;
#pragma omp parallel if (N * D >= kParallelWeights)
  few_rows_project_share(x, M, w, N, D, y, omp_get_thread_num(), omp_get_num_threads());
  return true;
}

// Threads that few_rows_times_weight splits w [K, C] over for M rows: at least 16 weight
// rows a row of x per thread, as each extra thread's partial sum is written and read once
// (2 * M * C floats), at most 1/8 of the weights' bytes.
inline int64_t few_rows_times_weight_threads(int64_t M, int64_t K, int64_t C, int64_t most) {
  if (K * C < kParallelWeights) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(most, K / (16 * M)));
}

// Thread t's share of out[m] += x_m @ w (few_rows_times_weight), `threads` taking part, each
// a contiguous range of w's rows into a partial sum: thread 0's is out itself, thread s's
// partial + (s - 1) * M * C (zeroed, (threads - 1) * M * C floats). With several threads,
// every one must call it: a barrier, then each adds the partials into its share of out.
// Requires few_rows_projects(M, C).
inline void few_rows_times_weight_share(const float* x, int64_t M, const float* w, int64_t K,
                                        int64_t C, float* out, float* partial, int64_t t,
                                        int64_t threads) {
#ifdef MK_HAVE_SIMD_VEC
  const Isa isa = best_isa();
  const int64_t per = (K + threads - 1) / threads;
  const int64_t k0 = std::min(K, t * per), k1 = std::min(K, k0 + per);
  float* dst = t == 0 ? out : partial + (t - 1) * M * C;
  if (k0 < k1) {
    if (isa == Isa::avx512)
      isa_avx512::rows_times_weight_rows(x, M, K, w, k0, k1, C, dst, C);
    else
      isa_avx2::rows_times_weight_rows(x, M, K, w, k0, k1, C, dst, C);
  }
  if (threads > 1) {
#pragma omp barrier
    const int64_t n = M * C, share = (n + threads - 1) / threads;
    const int64_t e0 = std::min(n, t * share), e1 = std::min(n, e0 + share);
    for (int64_t s = 1; s < threads; ++s) {
      const float* from = partial + (s - 1) * n;
      for (int64_t e = e0; e < e1; ++e) out[e] += from[e];
    }
  }
#else
  (void)x, (void)M, (void)w, (void)K, (void)C, (void)out, (void)partial, (void)t, (void)threads;
#endif
}

// out[m] += x_m @ w: x [M, K], w [K, C], out [M, C], M <= kFewRowsMax.
inline bool few_rows_times_weight(const float* x, int64_t M, const float* w, int64_t K, int64_t C,
                                  float* out) {
  if (!few_rows_projects(M, C) || K < 1) return false;
  const int64_t threads = few_rows_times_weight_threads(M, K, C, omp_get_max_threads());
  std::vector<float> partial((threads - 1) * M * C, 0.0f);
#pragma omp parallel num_threads(threads) if (threads > 1)
  few_rows_times_weight_share(x, M, w, K, C, out, partial.data(), omp_get_thread_num(),
                              omp_get_num_threads());
  return true;
}

}  // namespace memkernels::cpu
