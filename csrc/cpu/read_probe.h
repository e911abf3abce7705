// Plain reads the benchmarks time the kernels beside: a sum of an array's
// bytes on every thread, and a chain of such sums, step after step (a step
// one array or several).
// A reading layer's four steps (MLP, query projection, the read, the output
// projection) each wait for the one before, so each streams its own bytes in
// its own pass; sum_in_turn reads the same bytes in the same passes with no
// arithmetic between them, the floor of that chain on this machine.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "row_kernels.h"  // MK_CPU_CLONES

namespace memkernels::cpu {

// The sum of x[0, n): 64 independent sums (4 vectors of AVX-512), so the loop
// streams; one clone per ISA, the widest the CPU runs picked at load time
// (MEMKERNELS_CPU_ISA does not cap it: a read bound by DRAM reads the same).
MK_CPU_CLONES inline double sum_of(const float* x, int64_t n) {
  float s[64] = {};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int u = 0; u < 64; ++u) s[u] += x[i + u];
  double total = 0;
  for (; i < n; ++i) total += x[i];
  for (float v : s) total += v;
  return total;
}

// x[0, n) summed on every thread, each a contiguous share in order.
inline double sum_on_all_threads(const float* x, int64_t n) {
  constexpr int64_t kPieces = 64;
  const int64_t per = (n + kPieces - 1) / kPieces;
  double total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static)
  for (int64_t p = 0; p < kPieces; ++p) {
    const int64_t i0 = std::min(n, p * per), i1 = std::min(n, i0 + per);
    total += sum_of(x + i0, i1 - i0);
  }
  return total;
}

// Thread t's contiguous share [*lo, *hi) of n floats among `threads` (whole 64-byte lines).
inline void thread_share(int64_t n, int64_t t, int64_t threads, int64_t* lo, int64_t* hi) {
  const int64_t per = ((n + threads - 1) / threads + 15) / 16 * 16;
  *lo = std::min(n, t * per);
  *hi = std::min(n, *lo + per);
}

// arrays[a][0, sizes[a]) summed on every thread, step after step: step s
// the next per_step[s] arrays (one each where per_step is null), each thread
// a contiguous share of each of them in order, a barrier between steps. One
// parallel region (a region a step read 2-17% slower on the Zen 4 host,
// memkernels_chain_reads; docs/log.md). `steps` counts the steps.
inline double sum_in_turn(const float* const* arrays, const int64_t* sizes, int64_t steps,
                          const int64_t* per_step = nullptr) {
  double total = 0;
#pragma omp parallel reduction(+ : total)
  {
    const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
    int64_t a = 0;
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t end = a + (per_step != nullptr ? per_step[s] : 1);
      for (; a < end; ++a) {
        int64_t i0, i1;
        thread_share(sizes[a], t, threads, &i0, &i1);
        total += sum_of(arrays[a] + i0, i1 - i0);
      }
      if (s + 1 < steps) {
#pragma omp barrier
      }
    }
  }
  return total;
}

}  // namespace memkernels::cpu
