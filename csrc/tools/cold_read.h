// What the cold tools (few_rows_cold, reader_cold) share: a clock, a median,
// and the plain reads they time each kernel call beside (sums of as many bytes
// of another input set, on the same threads, in the same minute: read_probe.h).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

#include "cpu/read_probe.h"

namespace cold_read {

inline double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

using memkernels::cpu::sum_of;
using memkernels::cpu::sum_on_all_threads;

}  // namespace cold_read
