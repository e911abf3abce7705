// What the cold tools (few_rows_cold, reader_cold) share: a clock, a median,
// and the plain read they time each kernel call beside (a sum of as many bytes
// of another input set, on the same threads, in the same minute).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

#include "cpu/row_kernels.h"  // MK_CPU_CLONES

namespace cold_read {

inline double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The sum of x[0, n): 64 independent sums (4 vectors of AVX-512), so the loop
// streams; one clone per ISA, the widest the CPU runs picked at load time
// (MEMKERNELS_CPU_ISA does not cap it: a read bound by DRAM reads the same).
MK_CPU_CLONES static double sum_of(const float* x, int64_t n) {
  float s[64] = {};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int u = 0; u < 64; ++u) s[u] += x[i + u];
  double total = 0;
  for (; i < n; ++i) total += x[i];
  for (float v : s) total += v;
  return total;
}

}  // namespace cold_read
