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
#include <cstring>
#include <type_traits>
#include <vector>

#include "../slot_math.h"
#include "blas.h"
#include "row_kernels.h"
#include "tile_gemm.h"

namespace memkernels::cpu {

constexpr int64_t kBlockM = 256;  // query rows per tile
constexpr int64_t kBlockN = 512;  // keys per tile: K/V tile (64 KiB at D=64) stays in L2
// The write's saved probabilities: rows padded to this many columns, so that each
// row of a 64-byte-aligned buffer starts 64-byte aligned (the streamed stores).
constexpr int64_t kSavedProbsColumnMultiple = 16;

// Keys/values stored in bfloat16 (the raw 16 bits): a decode step streams the
// cached bank once, so halving its bytes halves the read's floor. Widening
// to float is exact (a 16-bit shift).
struct bf16 {
  uint16_t bits;
};

inline float widen(bf16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
// int8 keys/values carry one float scale per key (row): x = scale * int8.
// A quarter of float32's bytes (plus 4 bytes a row), for the decode cache.
inline float widen(int8_t x) { return float(x); }

// KV is the storage type of keys and values: T, or bf16 / int8 with T = float.
// With int8, k_scale/v_scale [G, N] hold each key's and value's scale
// (nullptr otherwise).
template <typename T, typename KV = T>
struct AttentionProblem {
  int64_t groups, rows, keys, dim;
  const T* q;
  const KV* k;
  const KV* v;
  MaskIndex mask;
  T scale;
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
};

// The read's kept probabilities for one group (or a span of its rows), written by
// the forward and read by the backward (T, or const T): per key block b, the
// rows' exp(S - m_b) at probs [blocks, rows, ld] and m_b, their running max after
// block b, at block_max [blocks, rows]. The true probabilities are those times
// exp(m_b - lse), a factor per row and block the backward folds into dO and delta
// (docs/design.md, "The read keeps its probabilities"). ld: a key block's columns
// rounded up to kSavedProbsColumnMultiple; rows: the group's rows (block stride).
template <typename P>
struct KeptProbs {
  P* probs = nullptr;
  P* block_max = nullptr;
  int64_t ld = 0, rows = 0;
};

// A tile of `rows` keys or values [rows, D] as T: the pointer itself, or
// (bf16, int8) widened into buf, which stays in L2 (kBlockN x D floats);
// row_scale (int8 only) scales each row.
template <typename T>
inline const T* tile_as(const T* src, const float*, int64_t, int64_t, std::vector<T>&) {
  return src;
}

MK_CPU_CLONES inline const float* tile_as(const bf16* src, const float*, int64_t rows, int64_t D,
                                          std::vector<float>& buf) {
  const int64_t n = rows * D;
  buf.resize(n);
  float* dst = buf.data();
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = widen(src[j]);
  return dst;
}

MK_CPU_CLONES inline const float* tile_as(const int8_t* src, const float* row_scale, int64_t rows,
                                          int64_t D, std::vector<float>& buf) {
  buf.resize(rows * D);
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* s = src + r * D;
    float* dst = buf.data() + r * D;
    const float scale = row_scale[r];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = scale * float(s[d]);
  }
  return buf.data();
}

// s[j] *= scale[j]: applies int8 keys' scales to their scores, and folds int8
// values' scales into their probabilities (after the row sum is taken).
MK_CPU_CLONES inline void scale_row(float* s, const float* scale, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] *= scale[j];
}

constexpr int64_t kPrefetchBytes = 8192;

// The score tiles' row stride for n keys: one key block's columns rounded up to
// kSavedProbsColumnMultiple (a multiple of the tile GEMMs' width, and within it a
// saved-probability row's padded columns), so that a small problem's tiles, and the
// scratch zero-filled for them on each call, are small (512 KiB a tile at 512 keys).
inline int64_t score_tile_ld(int64_t n) {
  const int64_t cols = std::max<int64_t>(1, std::min(kBlockN, n));
  return (cols + kSavedProbsColumnMultiple - 1) / kSavedProbsColumnMultiple *
         kSavedProbsColumnMultiple;
}

}  // namespace memkernels::cpu

#include "few_rows.h"  // needs bf16, scale_row and AttentionProblem above

namespace memkernels::cpu {

// scores[j] = scale * <q, k_j> for keys stored as KV (widened to T). One
// cloned function around the loops (a cloned dot product per key is an ifunc
// call per key); per key a 16-lane partial sum halved in 4 vector steps
// (`omp simd reduction` summed the lanes one by one, ~30 cycles per key),
// four keys at a time for independent chains.
template <typename T, typename KV>
MK_CPU_CLONES void single_row_scores(const T* q, const KV* k, int64_t N, int64_t D, T scale,
                                     T* scores) {
  constexpr int64_t L = 16, U = 4;
  const int64_t D_main = D - D % L;
  // Software prefetch ~8 KiB ahead: the bank is cold in a decode step (the
  // weights streamed since evicted it) and the hardware prefetcher alone
  // fetched it at half the bandwidth the weights get.
  const int64_t ahead = kPrefetchBytes / int64_t(sizeof(KV) * D) + 1;
  int64_t j = 0;
  for (; j + U <= N; j += U) {
    for (int64_t u = 0; u < U; ++u) __builtin_prefetch(k + std::min(j + u + ahead, N - 1) * D);
    T part[U][L] = {};
    for (int64_t d0 = 0; d0 < D_main; d0 += L) {
      for (int64_t u = 0; u < U; ++u) {
        const KV* ku = k + (j + u) * D + d0;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) part[u][l] += q[d0 + l] * T(widen(ku[l]));
      }
    }
    for (int64_t u = 0; u < U; ++u) {
      const KV* ku = k + (j + u) * D;
      for (int64_t d = D_main; d < D; ++d) part[u][d - D_main] += q[d] * T(widen(ku[d]));
      for (int64_t w = L / 2; w > 0; w /= 2) {
#pragma omp simd
        for (int64_t l = 0; l < w; ++l) part[u][l] += part[u][l + w];
      }
      scores[j + u] = scale * part[u][0];
    }
  }
  for (; j < N; ++j) {
    T acc = 0;
    for (int64_t d = 0; d < D; ++d) acc += q[d] * T(widen(k[j * D + d]));
    scores[j] = scale * acc;
  }
}

// out[d] = sum_j p[j] * v_j[d] for values stored as KV; four keys per pass
// over out (one load/store chain per four keys instead of per key).
template <typename T, typename KV>
MK_CPU_CLONES void single_row_values(const T* p, const KV* v, int64_t N, int64_t D, T* out) {
  std::fill(out, out + D, T(0));
  const int64_t ahead = kPrefetchBytes / int64_t(sizeof(KV) * D) + 1;
  int64_t j = 0;
  for (; j + 4 <= N; j += 4) {
    for (int64_t u = 0; u < 4; ++u) __builtin_prefetch(v + std::min(j + u + ahead, N - 1) * D);
    const KV *v0 = v + j * D, *v1 = v0 + D, *v2 = v1 + D, *v3 = v2 + D;
    const T p0 = p[j], p1 = p[j + 1], p2 = p[j + 2], p3 = p[j + 3];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d)
      out[d] += p0 * T(widen(v0[d])) + p1 * T(widen(v1[d])) + p2 * T(widen(v2[d])) +
                p3 * T(widen(v3[d]));
  }
  for (; j < N; ++j) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] += p[j] * T(widen(v[j * D + d]));
  }
}

// Forward for a group with a single query row and no mask (a decode step):
// the few-row kernel for float queries where it applies, else one pass over
// the keys into a row of scores and one over the values, with no GEMM call or
// tile bookkeeping (at one query row those cost more than the arithmetic).
template <typename T, typename KV>
void attention_forward_single_row(const AttentionProblem<T, KV>& p, int64_t g, T* out, T* lse,
                                  std::vector<T>& scratch) {
  if constexpr (std::is_same_v<T, float>) {
    if (few_rows_read(p, g, out, lse, scratch)) return;
  }
  const int64_t D = p.dim, N = p.keys;
  scratch.resize(N);
  T* s = scratch.data();
  const T* q = p.q + g * D;
  const KV *k = p.k + g * N * D, *v = p.v + g * N * D;
  single_row_scores(q, k, N, D, p.scale, s);
  if constexpr (std::is_same_v<KV, int8_t>) scale_row(s, p.k_scale + g * N, N);
  const T row_max = mask_and_max<T>(s, nullptr, N);
  const T row_sum = exp_row(s, N, row_max);
  if constexpr (std::is_same_v<KV, int8_t>) scale_row(s, p.v_scale + g * N, N);
  single_row_values(s, v, N, D, out);
  const T inv = safe_inverse(row_sum);
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
  *lse = log_sum_exp(row_max, row_sum);
}

// C[m, n] = (accumulate ? C : 0) + A B for the tile products whose B is
// row-major as stored: A(i, p) = a[i * rs + p * cs], a tile (cs = 1) or a
// tile's transpose (rs = 1), on the tile GEMMs where `own`, else the vendor BLAS.
template <typename T>
void tile_product(bool own, int64_t m, int64_t n, int64_t k, const T* a, int64_t rs, int64_t cs,
                  const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    if (own) return tile_gemm(m, n, k, a, rs, cs, b, ldb, c, ldc, accumulate);
  }
  const bool trans_a = cs != 1;
  gemm<T>(trans_a, false, m, n, k, T(1), a, trans_a ? cs : rs, b, ldb,
          accumulate ? T(1) : T(0), c, ldc);
}

// Forward for rows [r0, r0 + mr) of group g: writes out[mr, D] and lse[mr].
// mr may span several [kBlockM]-row tiles: each key block is then prepared
// once (widened, transposed) for all of them, and the tiles take it in turn.
// Float tiles take the register-blocked GEMMs where they apply (tile_gemm.h):
// K's block transposed (and scaled) once into panels, so S = Q K^T reads one
// contiguous run per column strip, and O += P V reads V's block as stored, or
// copied into panels where it is wider than one (tile_gemm_wants_panels: AVX2
// at Dh 64); else the vendor BLAS.
// probs (nullable; only with N <= kBlockN, one key block, so a tile's
// probabilities are final): each tile's probabilities are also streamed there,
// rows [mr, probs_ld] (probs_ld a multiple of kSavedProbsColumnMultiple, probs
// aligned to 64 bytes),
// for a backward that then skips S = Q K^T and its exp (saved_probs_ld).
// kept (the read's, any number of key blocks): each block's exp(S - m) and m, the
// rows' running max after the block (KeptProbs), unnormalized: the backward rescales.
template <typename T, typename KV>
void attention_forward_rows(const AttentionProblem<T, KV>& p, int64_t g, int64_t r0, int64_t mr,
                            T* out, T* lse, std::vector<T>& scratch, T* probs = nullptr,
                            int64_t probs_ld = 0, const KeptProbs<T>& kept = {}) {
  const int64_t D = p.dim, N = p.keys;
  const T* q = p.q + (g * p.rows + r0) * D;
  const KV* k = p.k + g * N * D;
  const KV* v = p.v + g * N * D;
  thread_local std::vector<T> k_tile, v_tile;  // used only when KV != T
  bool own_gemm = false;
  if constexpr (std::is_same_v<T, float>) own_gemm = tile_gemm_applies(D);
  const int64_t ld = score_tile_ld(N);                // the score tile's row stride
  const int64_t tile_rows = std::min(kBlockM, mr);
  bool v_in_panels = false;  // V's block copied into panels for O += P V (tile_gemm_wants_panels)
  if constexpr (std::is_same_v<T, float>) v_in_panels = own_gemm && tile_gemm_wants_panels(D);
  const int64_t block_keys = std::min(kBlockN, N);
  scratch.resize(tile_rows * ld + 2 * mr + (own_gemm ? D * ld : 0) +
                 (v_in_panels ? block_keys * D : 0));
  T* scores = scratch.data();
  T* row_max = scores + tile_rows * ld;
  T* row_sum = row_max + mr;
  T* k_t = row_sum + mr;  // [D, ld]: the key block transposed, times the scale, in panels
  T* v_panels = k_t + (own_gemm ? D * ld : 0);  // [nb, D] in panels, where v_in_panels
  std::fill(row_max, row_max + mr, neg_inf<T>());
  std::fill(row_sum, row_sum + mr, T(0));
  // the first key block's product overwrites out (no zero fill to pay for); none to write with no keys
  if (N == 0) std::fill(out, out + mr * D, T(0));

  for (int64_t n0 = 0; n0 < N; n0 += kBlockN) {
    const int64_t nb = std::min(kBlockN, N - n0);
    const int64_t nbp = own_gemm ? tile_gemm_ld(nb) : nb;
    const T* kb = tile_as(k + n0 * D, p.k_scale ? p.k_scale + g * N + n0 : nullptr, nb, D, k_tile);
    if constexpr (std::is_same_v<T, float>) {
      if (own_gemm) tile_transpose_panels(kb, nb, D, p.scale, k_t, nbp);
    }
    const T* vb = tile_as(v + n0 * D, p.v_scale ? p.v_scale + g * N + n0 : nullptr, nb, D, v_tile);
    if constexpr (std::is_same_v<T, float>) {
      if (v_in_panels) tile_to_panels(vb, nb, D, D, v_panels);
    }
    for (int64_t t0 = 0; t0 < mr; t0 += kBlockM) {
      const int64_t tr = std::min(kBlockM, mr - t0);
      const T* qt = q + t0 * D;
      T* ot = out + t0 * D;
      if constexpr (std::is_same_v<T, float>) {
        if (own_gemm) tile_gemm_panels(tr, nbp, D, qt, D, 1, k_t, scores, ld, false);
      }
      if (!own_gemm) gemm<T>(false, true, tr, nb, D, p.scale, qt, D, kb, D, T(0), scores, ld);
      for (int64_t r = 0; r < tr; ++r) {
        T* s = scores + r * ld;
        const bool* valid = p.mask.mask ? p.mask.row(g, r0 + t0 + r) + n0 : nullptr;
        T correction;
        const T new_max = online_softmax_rescale_if_risen(row_max[t0 + r],
                                                          mask_and_max(s, valid, nb), &correction);
        row_sum[t0 + r] = row_sum[t0 + r] * correction + exp_row(s, nb, new_max);
        row_max[t0 + r] = new_max;
        if (kept.probs) {  // this block's exp(S - new_max), its padding 0, and new_max
          const int64_t cols = (nb + kSavedProbsColumnMultiple - 1) / kSavedProbsColumnMultiple *
                               kSavedProbsColumnMultiple;  // <= kept.ld and <= ld
          std::fill(s + nb, s + cols, T(0));
          const int64_t at = (n0 / kBlockN) * kept.rows + t0 + r;
          scaled_row_streamed(s, kept.probs + at * kept.ld, cols, T(1));
          kept.block_max[at] = new_max;
        }
        if (probs) {  // the one key block: the row's sum is final; stored under the P V below
          const int64_t cols = (nb + kSavedProbsColumnMultiple - 1) / kSavedProbsColumnMultiple *
                               kSavedProbsColumnMultiple;  // <= probs_ld and <= ld
          std::fill(s + nb, s + cols, T(0));  // the padding: 0, not what the scratch held
          scaled_row_streamed(s, probs + (t0 + r) * probs_ld, cols, safe_inverse(row_sum[t0 + r]));
        }
        if (n0 > 0 && correction != T(1)) {
          T* o = ot + r * D;
          for (int64_t d = 0; d < D; ++d) o[d] *= correction;
        }
      }
      if constexpr (std::is_same_v<T, float>) {
        if (v_in_panels) {
          tile_gemm_panels(tr, D, nb, scores, ld, 1, v_panels, ot, D, n0 > 0);
          continue;
        }
      }
      tile_product(own_gemm, tr, D, nb, scores, ld, 1, vb, D, ot, D, n0 > 0);
    }
  }
  if (probs || kept.probs) stream_fence();
  for (int64_t r = 0; r < mr; ++r) {
    const T inv = safe_inverse(row_sum[r]);
    T* o = out + r * D;
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    lse[r] = log_sum_exp(row_max[r], row_sum[r]);
  }
}

// Backward for a whole group g (FlashAttention-2 recipe, one thread owns the
// group so dK/dV accumulate without atomics). dq/dk/dv are overwritten.
// probs (nullable): the forward's probabilities, rows [M, probs_ld] (N <= kBlockN):
// read in place of recomputing S = Q K^T and its exp, one product of five.
// kept (the read's, any N; in place of probs): each key block's exp(S - m_b), whose
// factor c = exp(m_b - lse) per row is folded into the tile's dO and delta:
// dS = P_b (c dO V^T - c delta) scale and dV += P_b^T (c dO), the same products.
// Float groups take the register-blocked GEMMs where they apply (tile_gemm.h):
// K's and V's blocks transposed into panels once per block (for all row tiles), the P^T and
// dS^T products read the tiles through swapped strides, and the right-hand sides read as
// stored (K, dO, Q) are copied into panels where wider than one; else the vendor BLAS.
template <typename T>
void attention_backward_group(const AttentionProblem<T>& p, int64_t g, const T* out,
                              const T* dout, const T* lse, T* dq, T* dk, T* dv,
                              std::vector<T>& scratch, const T* probs_saved = nullptr,
                              int64_t probs_ld = 0, const KeptProbs<const T>& kept = {}) {
  const int64_t D = p.dim, N = p.keys, M = p.rows;
  const T* q = p.q + g * M * D;
  const T* k = p.k + g * N * D;
  const T* v = p.v + g * N * D;
  bool own_gemm = false;
  if constexpr (std::is_same_v<T, float>) own_gemm = tile_gemm_applies(D);
  const int64_t ld = score_tile_ld(N);  // the tiles' row stride
  const int64_t tile_rows = std::min(kBlockM, M);
  // the row-major right-hand sides of dQ += dS K, dV += P^T dO and dK += dS^T Q copied into
  // panels where a product of D columns reads them faster so (tile_gemm_wants_panels)
  bool in_panels = false;
  if constexpr (std::is_same_v<T, float>) in_panels = own_gemm && tile_gemm_wants_panels(D);
  const int64_t block_keys = std::min(kBlockN, N);
  if (kept.probs) {
    probs_saved = kept.probs;
    probs_ld = kept.ld;
  }
  scratch.resize(2 * tile_rows * ld + M + (own_gemm ? 2 * D * ld : 0) +
                 (in_panels ? (block_keys + 2 * tile_rows) * D : 0) +
                 (kept.probs ? tile_rows * (D + 1) : 0));
  T* probs = scratch.data();
  T* dprobs = probs + tile_rows * ld;
  T* delta = dprobs + tile_rows * ld;  // rowsum(dO * O)
  T* k_t = delta + M;                // [D, ld]: the key block transposed, times the scale, in panels
  T* v_t = k_t + D * ld;             // [D, ld]: the value block transposed, in panels
  T* k_panels = k_t + (own_gemm ? 2 * D * ld : 0);  // where in_panels: K's block [nb, D],
  T* dout_panels = k_panels + block_keys * D;        // the tile's dO [mr, D]
  T* q_panels = dout_panels + tile_rows * D;         // and its Q [mr, D], in panels
  T* dout_scaled = k_panels + (in_panels ? (block_keys + 2 * tile_rows) * D : 0);  // kept: c dO
  T* delta_scaled = dout_scaled + tile_rows * D;                 // and c delta [mr]
  for (int64_t r = 0; r < M; ++r) {
    T acc = 0;
#pragma omp simd reduction(+ : acc)  // may reorder the sum: without it, a scalar chain
    for (int64_t d = 0; d < D; ++d) acc += dout[r * D + d] * out[r * D + d];
    delta[r] = acc;
  }
  // The first row tile's products overwrite dK and dV, the first key block's dQ;
  // a zero fill only where no product writes (no rows, or no keys).
  if (N == 0) std::fill(dq, dq + M * D, T(0));
  if (M == 0) {
    std::fill(dk, dk + N * D, T(0));
    std::fill(dv, dv + N * D, T(0));
  }

  for (int64_t n0 = 0; n0 < N; n0 += kBlockN) {
    const int64_t nb = std::min(kBlockN, N - n0);
    const int64_t nbp = own_gemm ? tile_gemm_ld(nb) : nb;
    if constexpr (std::is_same_v<T, float>) {
      if (own_gemm) {
        if (!probs_saved) tile_transpose_panels(k + n0 * D, nb, D, p.scale, k_t, nbp);
        tile_transpose_panels(v + n0 * D, nb, D, 1.0f, v_t, nbp);
        if (in_panels) tile_to_panels(k + n0 * D, nb, D, D, k_panels);
      }
    }
    // the kept probabilities' block (the write's one block: probs_saved itself)
    const int64_t block_rows = kept.probs ? kept.rows : M;  // the kept blocks' row count
    const T* block_probs =
        probs_saved ? probs_saved + (n0 / kBlockN) * block_rows * probs_ld : nullptr;
    for (int64_t r0 = 0; r0 < M; r0 += kBlockM) {
      const int64_t mr = std::min(kBlockM, M - r0);
      const T* dout_t = dout + r0 * D;  // the tile's dO and delta, times c where kept
      const T* delta_t = delta + r0;
      if (kept.probs) {
        const T* m_b = kept.block_max + (n0 / kBlockN) * kept.rows + r0;
        for (int64_t r = 0; r < mr; ++r) {  // c = 0 for a row with no key (lse -inf)
          const T l = lse[r0 + r];
          const T c = l == neg_inf<T>() ? T(0) : mk_exp(m_b[r] - l);
          for (int64_t d = 0; d < D; ++d) dout_scaled[r * D + d] = c * dout_t[r * D + d];
          delta_scaled[r] = c * delta_t[r];
        }
        dout_t = dout_scaled;
        delta_t = delta_scaled;
      }
      if constexpr (std::is_same_v<T, float>) {
        if (own_gemm) {
          if (!probs_saved) tile_gemm_panels(mr, nbp, D, q + r0 * D, D, 1, k_t, probs, ld, false);
          if (probs_saved)  // dS in the product's epilogue (ProbsGradEpilogue)
            tile_gemm_panels_probs_grad(mr, nbp, D, dout_t, D, 1, v_t, dprobs, ld,
                                        {block_probs + r0 * probs_ld, probs_ld, delta_t, p.scale});
          else
            tile_gemm_panels(mr, nbp, D, dout_t, D, 1, v_t, dprobs, ld, false);
        }
      }
      if (!own_gemm) {
        if (!probs_saved)
          gemm<T>(false, true, mr, nb, D, p.scale, q + r0 * D, D, k + n0 * D, D, T(0), probs, ld);
        gemm<T>(false, true, mr, nb, D, T(1), dout_t, D, v + n0 * D, D, T(0), dprobs, ld);
      }
      // P: the forward's (its masked keys already 0), else recomputed here
      const T* pt = probs_saved ? block_probs + r0 * probs_ld : probs;
      const int64_t pld = probs_saved ? probs_ld : ld;
      for (int64_t r = 0; r < mr; ++r) {
        T* dp = dprobs + r * ld;
        if (probs_saved) {
          if (!own_gemm)
            saved_probs_grad_row(pt + r * pld, dp, nb, lse[r0 + r], delta_t[r], p.scale);
          else if (lse[r0 + r] == neg_inf<T>())  // a row with no key: dS 0, as saved_probs_grad_row
            std::fill(dp, dp + nb, T(0));
          continue;
        }
        const bool* valid = p.mask.mask ? p.mask.row(g, r0 + r) + n0 : nullptr;
        T* pr = probs + r * ld;
        if (valid) {  // a masked score is -inf: its probability and gradient are 0
#pragma omp simd
          for (int64_t j = 0; j < nb; ++j) pr[j] = valid[j] ? pr[j] : neg_inf<T>();
        }
        softmax_grad_row(pr, dp, nb, lse[r0 + r], delta[r0 + r], p.scale);  // dp <- dScore
      }
      // dV += P^T dO, dQ += dS K, dK += dS^T Q
      if constexpr (std::is_same_v<T, float>) {
        if (in_panels) {
          tile_to_panels(dout_t, mr, D, D, dout_panels);
          tile_to_panels(q + r0 * D, mr, D, D, q_panels);
          tile_gemm_panels(nb, D, mr, pt, 1, pld, dout_panels, dv + n0 * D, D, r0 > 0);
          tile_gemm_panels(mr, D, nb, dprobs, ld, 1, k_panels, dq + r0 * D, D, n0 > 0);
          tile_gemm_panels(nb, D, mr, dprobs, 1, ld, q_panels, dk + n0 * D, D, r0 > 0);
          continue;
        }
      }
      tile_product(own_gemm, nb, D, mr, pt, 1, pld, dout_t, D, dv + n0 * D, D, r0 > 0);
      tile_product(own_gemm, mr, D, nb, dprobs, ld, 1, k + n0 * D, D, dq + r0 * D, D, n0 > 0);
      tile_product(own_gemm, nb, D, mr, dprobs, 1, ld, q + r0 * D, D, dk + n0 * D, D, r0 > 0);
    }
  }
}

}  // namespace memkernels::cpu
