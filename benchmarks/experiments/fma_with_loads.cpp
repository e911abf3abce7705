// The FMA units' rate with and without operands from memory, one thread, hot
// (L1): 12 independent FMA chains a step, their multiplicand a register (the
// bench's FMA probe), a broadcast load a FMA (the few-row score pass's
// pattern), a broadcast per two FMAs, a vector load a FMA, or one per two.
// TSC ticks a FMA, best of 20 runs of 100,000 steps, four rounds. On a shared
// host whose neighbour takes the core's load ports in some minutes, the loops
// with loads slow there while the register-only loop does not (docs/log.md,
// session 63).
//   g++ -O3 -mavx2 -mfma benchmarks/experiments/fma_with_loads.cpp -o /tmp/fma_with_loads
//   /tmp/fma_with_loads
#include <immintrin.h>
#include <x86intrin.h>
#include <cstdio>
#include <algorithm>
alignas(64) float buf[8192];
// MODE 0: FMA only; 1: a broadcast a FMA; 2: a broadcast per 2 FMAs; 3: a vector load a FMA;
// 4: a vector load per 2 FMAs
template <int MODE>
__attribute__((noinline)) double run(long iters) {
  // distinct starts: equal chains on equal operands would be merged into one by the compiler
  __m256 a0 = _mm256_set1_ps(0.f), a1 = _mm256_set1_ps(1.f), a2 = _mm256_set1_ps(2.f),
         a3 = _mm256_set1_ps(3.f), a4 = _mm256_set1_ps(4.f), a5 = _mm256_set1_ps(5.f),
         a6 = _mm256_set1_ps(6.f), a7 = _mm256_set1_ps(7.f), a8 = _mm256_set1_ps(8.f),
         a9 = _mm256_set1_ps(9.f), a10 = _mm256_set1_ps(10.f), a11 = _mm256_set1_ps(11.f);
  __m256 q = _mm256_set1_ps(1e-7f), q2 = _mm256_set1_ps(2e-7f), kreg = _mm256_set1_ps(1.0f);
  unsigned long long t0 = __rdtsc();
  for (long i = 0; i < iters; ++i) {
    const float* kk = buf + (i & 63) * 96;
#define STEP(A, B, U) \
    { __m256 b; \
      if (MODE == 0) b = kreg; \
      else if (MODE == 1 || MODE == 2) b = _mm256_broadcast_ss(kk + U); \
      else b = _mm256_load_ps(kk + 8 * U); \
      A = _mm256_fmadd_ps(b, q, A); \
      if (MODE == 2 || MODE == 4) B = _mm256_fmadd_ps(b, q2, B); }
    if (MODE == 2 || MODE == 4) {
      STEP(a0, a1, 0) STEP(a2, a3, 1) STEP(a4, a5, 2)
      STEP(a6, a7, 3) STEP(a8, a9, 4) STEP(a10, a11, 5)
    } else {
      STEP(a0,a0,0) STEP(a1,a1,1) STEP(a2,a2,2) STEP(a3,a3,3) STEP(a4,a4,4) STEP(a5,a5,5)
      STEP(a6,a6,6) STEP(a7,a7,7) STEP(a8,a8,8) STEP(a9,a9,9) STEP(a10,a10,10) STEP(a11,a11,11)
    }
    if (MODE == 0) asm volatile("" : "+x"(kreg));
  }
  unsigned long long t1 = __rdtsc();
  __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                           _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
  s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
  alignas(32) float t[8]; _mm256_store_ps(t, s); if (t[0] == 12345.f) printf("x");
  return double(t1 - t0) / (iters * 12.0);
}
int main() {
  for (int i = 0; i < 8192; ++i) buf[i] = 1.0f;
  for (int r = 0; r < 4; ++r) {
    double m[5] = {1e9,1e9,1e9,1e9,1e9};
    for (int j = 0; j < 20; ++j) {
      m[0] = std::min(m[0], run<0>(100000)); m[1] = std::min(m[1], run<1>(100000));
      m[2] = std::min(m[2], run<2>(100000)); m[3] = std::min(m[3], run<3>(100000));
      m[4] = std::min(m[4], run<4>(100000));
    }
    printf("ticks/FMA: FMA only %.3f | bcast/FMA %.3f | bcast/2 FMA %.3f | load/FMA %.3f | "
           "load/2 FMA %.3f\n", m[0], m[1], m[2], m[3], m[4]);
  }
}
