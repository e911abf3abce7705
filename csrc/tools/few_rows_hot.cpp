// The few-row read's compute rate, with no memory system in the way: one
// group of `rows` query rows over `keys` keys of head dim `dim`, on one thread,
// the bank hot in L2 (keep keys * dim * 8 bytes under the L2), best of `reps`
// calls, as ns per key. A figure that repeats to a few percent on a noisy
// machine, where a DRAM-bound timing does not: whether a kernel change made
// the read's arithmetic cheaper. MEMKERNELS_CPU_ISA=avx2 picks the AVX2 body.
// It also checks the output and the log-sum-exp against float64 (a NaN fails).
// Built with the extension's -fno-trapping-math (CMakeLists.txt), so the body
// is compiled as the extension compiles it.
//   ./memkernels_few_rows_hot [rows [keys [dim [reps]]]]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/slot_bank_cpu.h"
#include "cpu/few_rows.h"
#include "few_rows_check.h"

int main(int argc, char** argv) {
  using namespace memkernels::cpu;
  const int64_t M = argc > 1 ? atoll(argv[1]) : 2, S = argc > 2 ? atoll(argv[2]) : 1024,
                D = argc > 3 ? atoll(argv[3]) : 64;
  const int reps = argc > 4 ? atoi(argv[4]) : 500;
  if (M < 1 || S < 1 || D < 1 || reps < 1) {
    std::printf("rows, keys, dim and reps must be positive\n");
    return 2;
  }
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<float> q(M * D), k(S * D), v(S * D), out(M * D), lse(M), scratch;
  for (auto* x : {&q, &k, &v})
    for (auto& e : *x) e = normal(rng);
  const float scale = 1.0f / std::sqrt(float(D));
  AttentionProblem<float> p{1, M, S, D, q.data(), k.data(), v.data(), {}, scale};
  if (!few_rows_applies(p)) {
    std::printf("the few-row read does not apply to rows=%ld dim=%ld on this CPU\n", long(M),
                long(D));
    return 2;
  }
  double best = 1e300;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    few_rows_read(p, 0, out.data(), lse.data(), scratch);
    best = std::min(best, std::chrono::duration<double, std::nano>(
                              std::chrono::steady_clock::now() - t0).count());
  }
  const double max_err = few_rows_max_error(q.data(), k.data(), v.data(), out.data(), lse.data(),
                                             M, S, D, scale);
  std::printf("few-row read rows=%ld keys=%ld dim=%ld (%s, one thread, hot): %.2f ns a key, "
              "%.1f GB/s of K and V; max |err| %.2e\n",
              long(M), long(S), long(D), best_isa() == Isa::avx512 ? "avx512" : "avx2",
              best / S, S * D * 8.0 / best, max_err);
  return max_err < 1e-4 ? 0 : 1;  // false for NaN
}
