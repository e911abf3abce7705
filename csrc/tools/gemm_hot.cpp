// The tile GEMM's rate on one thread with its operands hot (in L1/L2): C[m, n]
// = A B with B in panels (tile_gemm_panels), A read row-major (rs = k, cs = 1:
// the score products and O += P V, dQ += dS K) or transposed (rs = 1, cs = m:
// dV += P^T dO and dK += dS^T Q), each call timed in TSC ticks. Prints the
// median and best FLOPs a tick beside the FMA units' best (fma_burst, the same
// ISA, same process), so the share of that rate needs no clock speed. For A/B
// runs of the micro-kernel's loop; MEMKERNELS_CPU_ISA=avx2 picks the AVX2 body.
// Checks the last product against a float64 one; exits 2 where the CPU has no
// tile GEMM body (no AVX2).
//   ./memkernels_gemm_hot [m [n [k [transposed [calls]]]]]
#include <omp.h>
#include <x86intrin.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/tile_gemm.h"

using namespace memkernels::cpu;

int main(int argc, char** argv) {
  const int64_t m = argc > 1 ? std::atoll(argv[1]) : 512;
  const int64_t n = argc > 2 ? std::atoll(argv[2]) : 64;
  const int64_t k = argc > 3 ? std::atoll(argv[3]) : 256;
  const bool transposed = argc > 4 && std::atoi(argv[4]) != 0;
  const int calls = argc > 5 ? std::atoi(argv[5]) : 3000;
  const int64_t width = tile_gemm_width();
  if (width == 0) {
    std::printf("no tile GEMM body here (it needs AVX2, and MEMKERNELS_CPU_GEMM not blas)\n");
    return 2;
  }
  if (m < 1 || n < 1 || k < 1 || calls < 1 || n % width != 0) {
    std::fprintf(stderr, "m, n, k, calls >= 1 and n a multiple of the vector width (%ld)\n",
                 long(width));
    return 1;
  }
  std::vector<float> a(m * k), b_rows(k * n), b(k * n), c(m * n);
  std::mt19937 gen(0);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (float& x : a) x = uniform(gen);
  for (float& x : b_rows) x = uniform(gen);
  tile_to_panels(b_rows.data(), k, n, n, b.data());  // as the kernels copy a row-major B
  omp_set_num_threads(1);  // the FMA probe on this one thread, as the product runs
  double fma_rate = 0.0;     // FLOPs a tick, one thread
  for (int t = 0; t < 10; ++t) {
    const uint64_t t0 = __rdtsc();
    const double flops = fma_burst_all_threads(1 << 20);
    fma_rate = std::max(fma_rate, flops / double(__rdtsc() - t0));
  }
  std::vector<double> ticks(calls);
  for (int r = 0; r < calls; ++r) {
    const uint64_t t0 = __rdtsc();
    if (transposed)
      tile_gemm_panels(m, n, k, a.data(), 1, m, b.data(), c.data(), n, false);
    else
      tile_gemm_panels(m, n, k, a.data(), k, 1, b.data(), c.data(), n, false);
    ticks[r] = double(__rdtsc() - t0);
  }
  double err = 0.0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t col = 0; col < n; ++col) {
      double want = 0.0;
      for (int64_t p = 0; p < k; ++p)
        want += double(transposed ? a[p * m + i] : a[i * k + p]) * double(b_rows[p * n + col]);
      const double d = std::abs(double(c[i * n + col]) - want) / (1.0 + std::abs(want));
      if (std::isnan(d) || d > err) err = d;  // a NaN stays, and fails the check
    }
  std::sort(ticks.begin(), ticks.end());
  const double flops = 2.0 * double(m) * double(n) * double(k);
  const double median = flops / ticks[calls / 2], best = flops / ticks[0];
  std::printf("tile GEMM m %ld n %ld k %ld, A %s (%s, one thread, hot): %.1f FLOPs a tick "
              "median (%.0f%% of the FMA rate), best %.1f (%.0f%%); FMA units %.1f\n",
              long(m), long(n), long(k), transposed ? "transposed" : "row-major",
              tile_gemm_width() == 16 ? "avx512" : "avx2", median, 100.0 * median / fma_rate,
              best, 100.0 * best / fma_rate, fma_rate);
  std::printf("against float64: max |difference| / (1 + |want|) %.2e\n", err);
  return err < 1e-4 ? 0 : 1;  // (a NaN err fails too)
}
