// The float attention tiles' GEMMs on this project's register-blocked kernel
// (tile_gemm_body.inc, once per ISA) instead of the vendor BLAS. Why: the
// BLAS that PyTorch's CPU wheels link (MKL) picks its kernels by CPU vendor,
// and on AMD CPUs with AVX-512 it runs its AVX2 ones, at under half of what
// the cores can do; the kernel here reaches the FMA units' rate on the tile
// shapes (head dims of 16-256, tiles in L2) on either ISA, with no call
// overhead per tile and little packing: the transposed blocks it writes
// anyway, and on AVX2 the row-major B of more than one panel and a transposed
// A (docs/design.md, docs/log.md kernels v17, v22, v42, v50).
// MEMKERNELS_CPU_GEMM=blas keeps the vendor BLAS (an A/B switch; read once).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "simd.h"

namespace memkernels::cpu {

// The epilogue of the backward's dP = dO V^T product when the forward's
// probabilities P were saved (the write): each register block is stored as
// dS = P * (dP - delta[row]) * scale, the softmax gradient, while P's next
// block is fetched from memory under this one's FMAs; not a pass of its own
// over the dP tile after a P read that waited on DRAM.
struct ProbsGradEpilogue {
  const float* p = nullptr;      // P at the product's row 0, column 0
  int64_t ld = 0;                // P's row stride
  const float* delta = nullptr;  // rowsum(dO * O) at row 0
  float scale = 0.0f;
};

#define MK_ISA_BODY "tile_gemm_body.inc"
#include "per_isa.h"

inline bool tile_gemm_blas_from_env() {
  const char* v = std::getenv("MEMKERNELS_CPU_GEMM");
  return v != nullptr && std::strcmp(v, "blas") == 0;
}

// The vector width (floats) the tile GEMMs run at, or 0 where they do not run
// (no AVX2, MEMKERNELS_CPU_ISA=generic, MEMKERNELS_CPU_GEMM=blas): then the
// callers take the vendor BLAS.
inline int64_t tile_gemm_width() {
#ifdef MK_HAVE_SIMD_VEC
  static const int64_t width = [] {
    if (tile_gemm_blas_from_env()) return int64_t(0);
    switch (best_isa()) {
      case Isa::avx512: return int64_t(16);
      case Isa::avx2: return int64_t(8);
      default: return int64_t(0);
    }
  }();
  return width;
#else
  return 0;
#endif
}

// Whether a problem of head dim D takes the tile GEMMs: D a multiple of 8 (on
// AVX-512, products whose n is not a multiple of 16 take the AVX2 kernel).
inline bool tile_gemm_applies(int64_t D) { return tile_gemm_width() > 0 && D % 8 == 0; }

// n rounded up to the tile GEMMs' width: the row stride of a score tile whose
// columns come out of tile_gemm (the padding columns are written, never read).
inline int64_t tile_gemm_ld(int64_t n) {
  const int64_t w = tile_gemm_width();
  return w > 0 ? (n + w - 1) / w * w : n;
}

// Whether a product of n columns runs the AVX-512 body (else the AVX2 one):
// one rule for the GEMMs and for the panels they read, whose width is the body's.
inline bool tile_gemm_wide(int64_t n) { return tile_gemm_width() == 16 && n % 16 == 0; }

// C[m, n] = (accumulate ? C : 0) + A B, A(i, p) = a[i * rs + p * cs] (m x k),
// B [k, n] row-major (ldb); n a multiple of 8.
inline void tile_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t rs, int64_t cs,
                      const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
#ifdef MK_HAVE_SIMD_VEC
  if (tile_gemm_wide(n))
    isa_avx512::gemm_strided(m, n, k, a, rs, cs, b, ldb, c, ldc, accumulate);
  else
    isa_avx2::gemm_strided(m, n, k, a, rs, cs, b, ldb, c, ldc, accumulate);
#else
  (void)m, (void)n, (void)k, (void)a, (void)rs, (void)cs, (void)b, (void)ldb, (void)c, (void)ldc,
      (void)accumulate;
#endif
}

// y = scale * x^T (x [n, D]) as the B of tile_gemm_panels over n_pad columns
// (n_pad = tile_gemm_ld(n)): the right-hand side of a Q K^T tile product.
inline void tile_transpose_panels(const float* x, int64_t n, int64_t D, float scale, float* y,
                                  int64_t n_pad) {
#ifdef MK_HAVE_SIMD_VEC
  if (tile_gemm_wide(n_pad))
    isa_avx512::transpose_to_panels(x, n, D, scale, y, n_pad);
  else
    isa_avx2::transpose_to_panels(x, n, D, scale, y, n_pad);
#else
  (void)x, (void)n, (void)D, (void)scale, (void)y, (void)n_pad;
#endif
}

// Whether a product of n columns reads its B faster from panels than as a
// row-major [k, n]: more than one panel (tile_gemm_body.inc, to_panels); at
// one panel the row-major B is already its panel.
inline bool tile_gemm_wants_panels(int64_t n) {
#ifdef MK_HAVE_SIMD_VEC
  return tile_gemm_width() > 0 &&
         n > (tile_gemm_wide(n) ? isa_avx512::kPanelWidth : isa_avx2::kPanelWidth);
#else
  (void)n;
  return false;
#endif
}

// y = x [k, n] (row stride ld_x) in panels, as tile_gemm_panels reads a B of n
// columns (k * n floats).
inline void tile_to_panels(const float* x, int64_t k, int64_t n, int64_t ld_x, float* y) {
#ifdef MK_HAVE_SIMD_VEC
  if (tile_gemm_wide(n))
    isa_avx512::to_panels(x, k, n, ld_x, y);
  else
    isa_avx2::to_panels(x, k, n, ld_x, y);
#else
  (void)x, (void)k, (void)n, (void)ld_x, (void)y;
#endif
}

// C[m, n] = (accumulate ? C : 0) + A B with B [k, n] as tile_transpose_panels
// writes it (k = D, n = n_pad), A as for tile_gemm.
inline void tile_gemm_panels(int64_t m, int64_t n, int64_t k, const float* a, int64_t rs,
                             int64_t cs, const float* b, float* c, int64_t ldc, bool accumulate) {
#ifdef MK_HAVE_SIMD_VEC
  if (tile_gemm_wide(n))
    isa_avx512::gemm_panels(m, n, k, a, rs, cs, b, c, ldc, accumulate);
  else
    isa_avx2::gemm_panels(m, n, k, a, rs, cs, b, c, ldc, accumulate);
#else
  (void)m, (void)n, (void)k, (void)a, (void)rs, (void)cs, (void)b, (void)c, (void)ldc,
      (void)accumulate;
#endif
}

// C[m, n] = P * (A B - delta[row]) * scale (ProbsGradEpilogue pg), B in panels
// as for tile_gemm_panels; P's columns [0, n) readable in each row.
inline void tile_gemm_panels_probs_grad(int64_t m, int64_t n, int64_t k, const float* a,
                                        int64_t rs, int64_t cs, const float* b, float* c,
                                        int64_t ldc, const ProbsGradEpilogue& pg) {
#ifdef MK_HAVE_SIMD_VEC
  if (tile_gemm_wide(n))
    isa_avx512::gemm_panels<true>(m, n, k, a, rs, cs, b, c, ldc, false, pg);
  else
    isa_avx2::gemm_panels<true>(m, n, k, a, rs, cs, b, c, ldc, false, pg);
#else
  (void)m, (void)n, (void)k, (void)a, (void)rs, (void)cs, (void)b, (void)c, (void)ldc, (void)pg;
#endif
}

// Runs fma_burst(steps) on every OpenMP thread at the ISA the kernels run
// (best_isa(): MEMKERNELS_CPU_ISA caps it, MEMKERNELS_CPU_GEMM does not);
// returns the FLOPs done (0 without AVX2, or for steps <= 0).
inline double fma_burst_all_threads(int64_t steps) {
#ifdef MK_HAVE_SIMD_VEC
  const Isa isa = best_isa();
  if (isa == Isa::generic || steps <= 0) return 0.0;
  const int64_t width = isa == Isa::avx512 ? 16 : 8;
  double flops = 0.0;
  float sums = 0.0f;
#pragma omp parallel reduction(+ : flops, sums)
  {
    sums += isa == Isa::avx512 ? isa_avx512::fma_burst(steps) : isa_avx2::fma_burst(steps);
    flops += 2.0 * 12.0 * double(width) * double(steps);
  }
  // the chains' sums stay ~1 (never -1); testing them keeps the FMAs from being optimized away
  return sums == -1.0f ? flops + 1.0 : flops;
#else
  (void)steps;
  return 0.0;
#endif
}

// Runs gemm_l1_burst(steps) on every OpenMP thread at the ISA the kernels
// run; returns the FLOPs done (0 without AVX2, or for steps <= 0): the bench's
// product probe, a GEMM's inner loop on operands in L1 (tile_gemm_body.inc).
inline double gemm_l1_burst_all_threads(int64_t steps) {
#ifdef MK_HAVE_SIMD_VEC
  const Isa isa = best_isa();
  if (isa == Isa::generic || steps <= 0) return 0.0;
  const double per_step =
      isa == Isa::avx512
          ? 2.0 * isa_avx512::kProbeRows * isa_avx512::kProbeVectors * 16 * isa_avx512::kProbeDepth
          : 2.0 * isa_avx2::kProbeRows * isa_avx2::kProbeVectors * 8 * isa_avx2::kProbeDepth;
  double flops = 0.0;
  float sums = 0.0f;
#pragma omp parallel reduction(+ : flops, sums)
  {
    sums += isa == Isa::avx512 ? isa_avx512::gemm_l1_burst(steps)
                               : isa_avx2::gemm_l1_burst(steps);
    flops += per_step * double(steps);
  }
  // a test of the outputs' sum keeps the products from being optimized away
  return sums == -1.0f ? flops + 1.0 : flops;
#else
  (void)steps;
  return 0.0;
#endif
}

}  // namespace memkernels::cpu
