// The AVX2 tile GEMM's register block (6 rows x 2 vectors: 8 loads a 12 FMAs)
// against 4 x 3 (7 loads a 12 FMAs, the fewest AVX2's 16 registers allow with a
// broadcast a row) and two blocks that load 4 of A's steps at once and broadcast
// them in-lane by vshufps (4 x 2 and 3 x 3: fewer loads, a shuffle a row a step),
// hot, one thread: C[m, n] = A B over k = 64, A [m, 64] and B [64, n] row-major.
// Each round runs every block 31 times in turn (50 products each) and prints
// each one's median FLOPs a TSC tick. At m 24, n 48 all operands sit in L1; at
// m 256 A comes from L2, as in the kernels' 256-row tiles. On a host whose
// neighbour takes the core's load ports in some minutes (fma_with_loads.cpp),
// the blocks with fewer loads a FMA should hold up better there. GCC -O3 keeps
// B's loads apart from the FMAs in the two broadcast blocks (objdump: 8 and 7
// loads a 12 FMAs).
//   g++ -O3 -mavx2 -mfma benchmarks/experiments/gemm_register_blocks.cpp -o /tmp/gemm_blocks
//   /tmp/gemm_blocks [m [n [rounds]]]
#include <immintrin.h>
#include <x86intrin.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <random>
template <int MR, int NV>
inline __attribute__((always_inline)) void zero_block(__m256 (&acc)[MR][NV]) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
}
template <int MR, int NV>
inline __attribute__((always_inline)) void store_block(__m256 (&acc)[MR][NV], float* c, long ldc) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + i * ldc + v * 8, acc[i][v]);
}
template <int MR, int NV>
__attribute__((noinline)) void block(const float* a, long lda, const float* b, long ldb, long k,
                                     float* c, long ldc) {
  __m256 acc[MR][NV];
  zero_block<MR, NV>(acc);
#pragma GCC unroll 2
  for (long p = 0; p < k; ++p) {
    __m256 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + p * ldb + v * 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      __m256 ai = _mm256_broadcast_ss(a + i * lda + p);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(ai, bv[v], acc[i][v]);
    }
  }
  store_block<MR, NV>(acc, c, ldc);
}
// A's 4 consecutive k of each row loaded once (vbroadcastf128), each element
// broadcast in-lane by vshufps; k a multiple of 4
template <int MR, int NV>
__attribute__((noinline)) void block_shuf(const float* a, long lda, const float* b, long ldb,
                                          long k, float* c, long ldc) {
  __m256 acc[MR][NV];
  zero_block<MR, NV>(acc);
  for (long p = 0; p < k; p += 4) {
    __m256 aq[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) aq[i] = _mm256_broadcast_ps((const __m128*)(a + i * lda + p));
#define SUB(S, IMM) { __m256 bv[NV]; \
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) \
      bv[v] = _mm256_loadu_ps(b + (p + S) * ldb + v * 8); \
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) { \
      __m256 ai = _mm256_shuffle_ps(aq[i], aq[i], IMM); \
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) \
        acc[i][v] = _mm256_fmadd_ps(ai, bv[v], acc[i][v]); } }
    SUB(0, 0x00) SUB(1, 0x55) SUB(2, 0xAA) SUB(3, 0xFF)
  }
  store_block<MR, NV>(acc, c, ldc);
}
template <int MR, int NV, bool SH>
double run(const float* a, const float* b, float* c, long m, long n, long k, int reps) {
  unsigned long long t0 = __rdtsc();
  for (int r = 0; r < reps; ++r)
    for (long j = 0; j + NV * 8 <= n; j += NV * 8)
      for (long i = 0; i + MR <= m; i += MR)
        if (SH) block_shuf<MR, NV>(a + i * k, k, b + j, n, k, c + i * n + j, n);
        else block<MR, NV>(a + i * k, k, b + j, n, k, c + i * n + j, n);
  unsigned long long t1 = __rdtsc();
  long rows = (m / MR) * MR, cols = (n / (NV * 8)) * NV * 8;
  return 2.0 * rows * cols * k * reps / double(t1 - t0);
}
int main(int argc, char** argv) {
  long m = 24, n = 48, k = 64;
  if (argc > 1) m = atol(argv[1]);
  if (argc > 2) n = atol(argv[2]);
  int rounds = argc > 3 ? atoi(argv[3]) : 30;
  std::vector<float> a(m * k), b(k * n), c(m * n);
  std::mt19937 g(0); std::uniform_real_distribution<float> u(-1, 1);
  for (auto& x : a) x = u(g); for (auto& x : b) x = u(g);
  const char* names[4] = {"6x2", "4x3", "4x2shuf", "3x3shuf"};
  std::vector<double> med[4];
  for (int r = 0; r < rounds; ++r) {
    std::vector<double> xs[4];
    for (int t = 0; t < 31; ++t) {
      xs[0].push_back(run<6, 2, false>(a.data(), b.data(), c.data(), m, n, k, 50));
      xs[1].push_back(run<4, 3, false>(a.data(), b.data(), c.data(), m, n, k, 50));
      xs[2].push_back(run<4, 2, true>(a.data(), b.data(), c.data(), m, n, k, 50));
      xs[3].push_back(run<3, 3, true>(a.data(), b.data(), c.data(), m, n, k, 50));
    }
    printf("round %d:", r);
    for (int q = 0; q < 4; ++q) {
      std::sort(xs[q].begin(), xs[q].end());
      med[q].push_back(xs[q][15]);
      printf(" %s %.1f", names[q], xs[q][15]);
    }
    printf("  (FLOPs/tick)\n");
  }
}
