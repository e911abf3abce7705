// Standalone check of the CPU kernels (no Python): memory_read forward on
// random data against a naive softmax-attention, and the wall time.
//   ./memkernels_check_cpu [B H T S D]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/slot_bank_cpu.h"

int main(int argc, char** argv) {
  const int64_t B = argc > 5 ? atoll(argv[1]) : 4, H = argc > 5 ? atoll(argv[2]) : 4,
                T = argc > 5 ? atoll(argv[3]) : 7, S = argc > 5 ? atoll(argv[4]) : 300,
                D = argc > 5 ? atoll(argv[5]) : 64;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  // Shared bank: one group per head, B*T query rows.
  std::vector<float> q(H * B * T * D), k(H * S * D), v(H * S * D), out(q.size()), lse(H * B * T);
  for (auto* x : {&q, &k, &v})
    for (auto& e : *x) e = normal(rng);
  const float scale = 1.0f / std::sqrt(float(D));
  memkernels::cpu::AttentionProblem<float> p{H, B * T, S, D, q.data(), k.data(), v.data(), {}, scale};
  const auto t0 = std::chrono::steady_clock::now();
  memkernels::cpu::read_forward(p, out.data(), lse.data());
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  double max_err = 0;
  for (int64_t g = 0; g < H; ++g) {
    for (int64_t r = 0; r < B * T; ++r) {
      std::vector<double> s(S);
      double m = -INFINITY, sum = 0;
      for (int64_t j = 0; j < S; ++j) {
        double a = 0;
        for (int64_t d = 0; d < D; ++d) a += double(q[(g * B * T + r) * D + d]) * k[(g * S + j) * D + d];
        s[j] = a * scale;
        m = std::max(m, s[j]);
      }
      for (auto& x : s) sum += (x = std::exp(x - m));
      for (int64_t d = 0; d < D; ++d) {
        double o = 0;
        for (int64_t j = 0; j < S; ++j) o += s[j] * v[(g * S + j) * D + d];
        max_err = std::max(max_err, std::abs(o / sum - out[(g * B * T + r) * D + d]));
      }
    }
  }
  std::printf("read_forward B=%ld H=%ld T=%ld S=%ld D=%ld: %.3f ms, max |err| %.2e (vendor BLAS: %s)\n",
              long(B), long(H), long(T), long(S), long(D), ms, max_err,
              memkernels::cpu::have_vendor_blas() ? "yes" : "no");
  return max_err < 1e-4 ? 0 : 1;
}
