// The few-row decode's key-major value pass (key_major_values_chunk in
// csrc/cpu/few_rows_body.inc, AVX2 body) against a plain loop of the same
// slices (4 rows x 3, 3 and 2 vectors, each weight broadcast from memory), hot,
// one thread, in one process, the variants in turn each round: 8 rows, D = 64,
// chunks of 64 keys over a 512-key V (in the L2), the weights laid out as the
// key-major pass lays them ([key][8 rows]). Four variants:
//   plain           the plain loop, strides as compile-time constants
//   plain, strides  the same loop, strides passed at run time (as the kernel's)
//   kernel          key_major_values_chunk with nothing to prefetch
//   kernel, paced   the same prefetching a next chunk (as the decode calls it:
//                   a row block's first slice paces its share, one line of K
//                   and one of V a key)
// Prints each round's best (of `reps` passes) TSC ticks a key and the largest
// difference of the kernel's output from the plain loop's.
//
//   g++ -O3 -fopenmp -fno-trapping-math -std=c++17 -Icsrc \
//       benchmarks/experiments/value_pass_loop.cpp -o /tmp/value_pass_loop
//   /tmp/value_pass_loop [reps [rounds]]
#include <x86intrin.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/slot_bank_cpu.h"  // before few_rows.h: the row kernels its body calls
#include "cpu/few_rows.h"

using namespace memkernels::cpu;
constexpr int D = 64, KC = 64, N = 512, M = 8;

MK_BEGIN_AVX2
// out[r, :CV*8] += sum_j p[j * 8 + r] v_j, RB rows, strides D and 8 constants
template <int RB, int CV>
__attribute__((noinline)) void plain_slice(const float* p, const float* v, int64_t nb,
                                           float* out) {
  __m256 acc[RB][CV];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < CV; ++c) acc[r][c] = _mm256_loadu_ps(out + r * D + c * 8);
  for (int64_t j = 0; j < nb; ++j) {
    __m256 vv[CV];
    for (int c = 0; c < CV; ++c) vv[c] = _mm256_loadu_ps(v + j * D + c * 8);
    for (int r = 0; r < RB; ++r) {
      const __m256 pr = _mm256_broadcast_ss(p + j * 8 + r);
      for (int c = 0; c < CV; ++c) acc[r][c] = _mm256_fmadd_ps(pr, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < CV; ++c) _mm256_storeu_ps(out + r * D + c * 8, acc[r][c]);
}

// the same with the strides at run time
template <int RB, int CV>
__attribute__((noinline)) void strided_slice(const float* p, int64_t ks, const float* v,
                                             int64_t ld_v, int64_t nb, float* out,
                                             int64_t ld_out) {
  __m256 acc[RB][CV];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < CV; ++c) acc[r][c] = _mm256_loadu_ps(out + r * ld_out + c * 8);
  for (int64_t j = 0; j < nb; ++j) {
    __m256 vv[CV];
    for (int c = 0; c < CV; ++c) vv[c] = _mm256_loadu_ps(v + j * ld_v + c * 8);
    for (int r = 0; r < RB; ++r) {
      const __m256 pr = _mm256_broadcast_ss(p + r + j * ks);
      for (int c = 0; c < CV; ++c) acc[r][c] = _mm256_fmadd_ps(pr, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < CV; ++c) _mm256_storeu_ps(out + r * ld_out + c * 8, acc[r][c]);
}

__attribute__((noinline)) void plain_chunk(const float* st, const float* v, float* out) {
  for (int r0 = 0; r0 < M; r0 += 4) {
    plain_slice<4, 3>(st + r0, v, KC, out + r0 * D);
    plain_slice<4, 3>(st + r0, v + 24, KC, out + r0 * D + 24);
    plain_slice<4, 2>(st + r0, v + 48, KC, out + r0 * D + 48);
  }
}

__attribute__((noinline)) void strided_chunk(const float* st, const float* v, float* out,
                                             int64_t ld, int64_t ks) {
  for (int r0 = 0; r0 < M; r0 += 4) {
    strided_slice<4, 3>(st + r0, ks, v, ld, KC, out + r0 * ld, ld);
    strided_slice<4, 3>(st + r0, ks, v + 24, ld, KC, out + r0 * ld + 24, ld);
    strided_slice<4, 2>(st + r0, ks, v + 48, ld, KC, out + r0 * ld + 48, ld);
  }
}

__attribute__((noinline)) void kernel_chunk(const float* st, const float* v, float* out,
                                            const float* next_k, const float* next_v,
                                            int64_t next_nb) {
  isa_avx2::key_major_values_chunk<1, float>(st, KC, M, v, D, out, next_k, next_v, next_nb);
}
MK_END_ISA

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 300, rounds = argc > 2 ? std::atoi(argv[2]) : 8;
  if (best_isa() == Isa::generic || reps < 1 || rounds < 1) {
    std::printf("needs AVX2 and FMA; reps and rounds positive\n");
    return 2;
  }
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> k(N * D), v(N * D), st(N * 8);
  for (auto* x : {&k, &v, &st})
    for (auto& e : *x) e = u(rng);
  const char* const names[4] = {"plain", "plain, strides", "kernel", "kernel, paced"};
  std::vector<float> outs[4];
  volatile int64_t ld = D, ks = 8;  // run-time strides
  std::printf("value pass, 8 rows, D=%d, %d-key chunks over %d keys, one thread, hot (TSC "
              "ticks a key, best of %d)\n", D, KC, N, reps);
  for (int round = 0; round < rounds; ++round) {
    std::printf("round %d:", round + 1);
    for (int var = 0; var < 4; ++var) {
      double best = 1e300;
      for (int rep = 0; rep < reps; ++rep) {
        outs[var].assign(M * D, 0.0f);
        float* o = outs[var].data();
        const uint64_t t0 = __rdtsc();
        for (int n0 = 0; n0 < N; n0 += KC) {
          const float *sc = st.data() + n0 * 8, *vc = v.data() + n0 * D;
          const int64_t nx = (n0 + KC) % N * D;  // the next chunk (wrapping), hot too
          if (var == 0) plain_chunk(sc, vc, o);
          if (var == 1) strided_chunk(sc, vc, o, ld, ks);
          if (var == 2) kernel_chunk(sc, vc, o, nullptr, nullptr, 0);
          if (var == 3) kernel_chunk(sc, vc, o, k.data() + nx + KC / 2 * D,
                                     v.data() + nx + KC / 2 * D, KC / 2);
        }
        best = std::min(best, double(__rdtsc() - t0));
      }
      std::printf(" %s %.1f;", names[var], best / N);
    }
    double err = 0.0;
    for (int var = 1; var < 4; ++var)
      for (int e = 0; e < M * D; ++e)
        err = std::max(err, double(std::fabs(outs[var][e] - outs[0][e])));
    std::printf(" max |difference| %.1e\n", err);
  }
  return 0;
}
