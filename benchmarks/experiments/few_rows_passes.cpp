// The few-row decode body's passes, timed one at a time (an ad-hoc probe for
// docs/log.md, session 33): 8 query rows, D=64, one thread, the AVX2 body of
// csrc/cpu/few_rows_body.inc, with the bank in L2 (N=1,024) or DRAM
// (N=131,072). Also two score passes over a transposed key panel (keys
// contiguous per dimension), the layout proposed for the shared bank.
//
//   g++ -O3 -fopenmp -fno-trapping-math -std=c++17 -Icsrc \
//       benchmarks/experiments/few_rows_passes.cpp -o /tmp/few_rows_passes
//   OMP_NUM_THREADS=1 /tmp/few_rows_passes [N] [keys per chunk]
//
// Prints one thread's read stream and the machine's FMA rate (ten independent chains) beside each pass, so
// a pass's time can be read against its FMA floor in the same run.
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>
#include <algorithm>
#include "cpu/attention_cpu.h"
using namespace memkernels;
using namespace memkernels::cpu;

MK_BEGIN_AVX2
namespace memkernels::cpu::isa_avx2 {
// transposed panel: kt [D][ldk] (keys contiguous); s[r*ld_s + j] for RB rows x (CV*8) keys
template <int RB, int CV>
void score_panel(const float* q, int64_t D, const float* kt, int64_t ldk, int64_t nb, float* s, int64_t ld_s) {
  using R = Vec::R;
  for (int64_t j = 0; j + CV * 8 <= nb; j += CV * 8) {
    R acc[RB][CV];
    for (int r = 0; r < RB; ++r) for (int c = 0; c < CV; ++c) acc[r][c] = Vec::zero();
    for (int64_t d = 0; d < D; ++d) {
      R kv[CV];
      for (int c = 0; c < CV; ++c) kv[c] = Vec::load(kt + d * ldk + j + c * 8);
      for (int r = 0; r < RB; ++r) {
        const R qv = _mm256_broadcast_ss(q + r * D + d);
        for (int c = 0; c < CV; ++c) acc[r][c] = Vec::fma(qv, kv[c], acc[r][c]);
      }
    }
    for (int r = 0; r < RB; ++r) for (int c = 0; c < CV; ++c) Vec::store(s + r * ld_s + j + c * 8, acc[r][c]);
  }
}
// fixed-D score block (fully unrolled inner loop)
template <int RB, int NV>
void score_fixed(const float* q, const float* k, int64_t nb, float* s, int64_t ld_s) {
  using R = Vec::R; constexpr int D = NV * 8;
  for (int64_t j = 0; j + 4 <= nb; j += 4) {
    const float* kj = k + j * D;
    R acc[RB][4];
    for (int r = 0; r < RB; ++r) for (int u = 0; u < 4; ++u) acc[r][u] = Vec::zero();
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) {
      R kv[4];
      for (int u = 0; u < 4; ++u) kv[u] = Vec::load(kj + u * D + i * 8);
      for (int r = 0; r < RB; ++r) {
        const R qv = Vec::load(q + r * D + i * 8);
        for (int u = 0; u < 4; ++u) acc[r][u] = Vec::fma(qv, kv[u], acc[r][u]);
      }
    }
    for (int r = 0; r < RB; ++r)
      _mm_storeu_ps(s + r * ld_s + j, Vec::reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
  }
}
// One thread's read stream: a sum over 256 MB, four accumulators (GB/s).
double read_stream_gbs() {
  const int64_t n = int64_t(64) << 20;
  std::vector<float> x(n, 1.0f);
  std::vector<double> ts;
  float sink = 0;
  for (int t = 0; t < 5; ++t) {
    auto t0 = std::chrono::steady_clock::now();
    Vec::R a[4] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
    for (int64_t i = 0; i < n; i += 32)
      for (int u = 0; u < 4; ++u) a[u] = Vec::add(a[u], Vec::load(x.data() + i + 8 * u));
    sink += Vec::reduce1(Vec::add(Vec::add(a[0], a[1]), Vec::add(a[2], a[3])));
    auto t1 = std::chrono::steady_clock::now();
    ts.push_back(std::chrono::duration<double>(t1 - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  if (sink == 1.0f) printf("x");
  return n * 4 / ts[2] / 1e9;
}
double fma_rate_per_ns() {  // FMAs (8-wide) per ns, 10 chains
  using R = Vec::R; R a[10]; for (int i = 0; i < 10; ++i) a[i] = Vec::set1(1.0f + i * 1e-7f);
  const R m = Vec::set1(0.9999999f), c = Vec::set1(1e-7f);
  const int64_t iters = 100000000;
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < 10; ++i) a[i] = Vec::fma(a[i], m, c);
  auto t1 = std::chrono::steady_clock::now();
  float sink = 0; for (int i = 0; i < 10; ++i) sink += Vec::reduce1(a[i]);
  if (sink == 12345.f) printf("x");
  return 10.0 * iters / std::chrono::duration<double, std::nano>(t1 - t0).count();
}

}
MK_END_ISA

template <typename F> double time_ns(F&& f, int reps) {
  std::vector<double> ts;
  for (int t = 0; t < 7; ++t) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) f();
    auto t1 = std::chrono::steady_clock::now();
    ts.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / reps);
  }
  std::sort(ts.begin(), ts.end()); return ts[3];
}

int main(int argc, char** argv) {
  const int64_t M = 8, D = 64, N = argc > 1 ? atoi(argv[1]) : 1024;
  std::mt19937 g(0); std::normal_distribution<float> nd;
  std::vector<float> q(M * D), k(N * D), v(N * D), kt(D * N), out(M * D), lse(M);
  for (auto& x : q) x = nd(g); for (auto& x : k) x = nd(g); for (auto& x : v) x = nd(g);
  for (int64_t j = 0; j < N; ++j) for (int64_t d = 0; d < D; ++d) kt[d * N + j] = k[j * D + d];
  const int64_t kc = argc > 2 ? atoi(argv[2]) : few_rows_chunk<float>(D, true);
  std::vector<float> scratch(few_rows_scratch(M, D, kc));
  FewRowsArgs<float> a{M, N, D, kc, q.data(), k.data(), v.data(), nullptr, nullptr, 0.125f, MaskIndex{}, 0, out.data(), lse.data(), scratch.data()};
  printf("one thread's read stream: %.1f GB/s\n", isa_avx2::read_stream_gbs());
  const double fr = isa_avx2::fma_rate_per_ns();
  printf("FMA rate %.2f /ns (%.2f GHz at 2/cycle); floor for 8 rows x D=64: %.2f ns/key (score+value 128 FMA)\n", fr, fr / 2, 128 / fr);
  const int reps = std::max<int64_t>(1, 2000000 / N);
  double t = time_ns([&] { isa_avx2::few_rows_forward(a); }, reps);
  printf("few_rows_forward: %.2f ns/key  chunk %ld\n", t / N, (long)kc);
  std::vector<float> s(M * kc);
  // score only, current path: 4 passes of score_block<2> per chunk
  t = time_ns([&] {
    for (int64_t n0 = 0; n0 < N; n0 += kc)
      for (int r0 = 0; r0 < M; r0 += 2)
        isa_avx2::score_block<2, float>(q.data() + r0 * D, k.data() + n0 * D, kc, D, s.data() + r0 * kc, kc, nullptr, nullptr, 0);
  }, reps);
  printf("score current: %.2f ns/key (floor %.2f)\n", t / N, 64 / fr);
  t = time_ns([&] {
    for (int64_t n0 = 0; n0 < N; n0 += kc)
      for (int r0 = 0; r0 < M; r0 += 2)
        isa_avx2::score_fixed<2, 8>(q.data() + r0 * D, k.data() + n0 * D, kc, s.data() + r0 * kc, kc);
  }, reps);
  printf("score fixed-D: %.2f ns/key\n", t / N);
  t = time_ns([&] {
    for (int64_t n0 = 0; n0 < N; n0 += kc)
      for (int r0 = 0; r0 < M; r0 += 4)
        isa_avx2::score_panel<4, 2>(q.data() + r0 * D, D, kt.data() + n0, N, kc, s.data() + r0 * kc, kc);
  }, reps);
  printf("score panel 4x2: %.2f ns/key\n", t / N);
  t = time_ns([&] {
    for (int64_t n0 = 0; n0 < N; n0 += kc)
        isa_avx2::score_panel<8, 1>(q.data(), D, kt.data() + n0, N, kc, s.data(), kc);
  }, reps);
  printf("score panel 8x1: %.2f ns/key\n", t / N);
  // value only, current
  t = time_ns([&] {
    for (int64_t n0 = 0; n0 < N; n0 += kc)
      for (int r0 = 0; r0 < M; r0 += 2)
        isa_avx2::value_block<2, float>(s.data() + r0 * kc, kc, v.data() + n0 * D, D, kc, D, out.data() + r0 * D, D);
  }, reps);
  printf("value current: %.2f ns/key (floor %.2f)\n", t / N, 64 / fr);
  return 0;
}
