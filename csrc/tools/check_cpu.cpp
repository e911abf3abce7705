// Standalone check of the CPU kernels (no Python): memory_read forward on
// random data against a naive softmax-attention, and the wall time; then the
// write's forward and backward into outputs poisoned with NaN against the
// same calls into zeroed ones (the kernels overwrite their outputs, never
// read them first: both must agree bit for bit, with no NaN).
//   ./memkernels_check_cpu [B H T S D]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <omp.h>

#include <atomic>
#include <thread>

#include "cpu/block_stealer.h"
#include "cpu/slot_bank_cpu.h"

namespace {

// BlockStealer hands every block out exactly once: n blocks over `ranges`
// ranges, taken by a region of `threads` threads (fewer, as many or more than
// the ranges), thread 0 slowed so that the others steal from its range.
bool block_stealer_takes_each_block_once(int64_t* cases) {
  memkernels::cpu::BlockStealer blocks;
  bool ok = true;
  for (int64_t ranges : {1, 2, 3, 5})
    for (int threads : {1, 2, 3})
      for (int64_t n : {0, 1, 2, 7, 64, 1000}) {
        std::vector<std::atomic<int>> taken(n);
        for (auto& t : taken) t = 0;
        blocks.reset(n, ranges);
#pragma omp parallel num_threads(threads)
        {
          const int t = omp_get_thread_num();
          for (int64_t b; (b = blocks.next(t)) >= 0;) {
            if (b < n) taken[b].fetch_add(1);
            else ok = false;
            if (t == 0) std::this_thread::sleep_for(std::chrono::microseconds(20));
          }
        }
        for (auto& t : taken) ok = ok && t.load() == 1;
        ++*cases;
      }
  return ok;
}

// The write forward + backward (every output of both) into buffers that start
// as `fill`, concatenated; slots M per group over N tokens.
std::vector<float> write_outputs(int64_t G, int64_t M, int64_t N, int64_t D,
                                 const std::vector<float>& x, float fill) {
  const float* q = x.data();
  const float* mem = q + G * M * D;
  const float* k = mem + G * M * D;
  const float* v = k + G * N * D;
  const float* f = v + G * N * D;
  const float* i = f + G * M;
  const float* dnew = i + G * M;
  memkernels::cpu::WriteProblem<float> w{
      {G, M, N, D, q, k, v, {}, 1.0f / std::sqrt(float(D))}, mem, f, i, 1};
  const int64_t sizes[] = {G * M * D, G * M * D, G * M,  // new_mem, upd, lse
                           G * M * D, G * M * D, G * N * D, G * N * D, G * M, G * M};
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  std::vector<float> o(total, fill);
  float* p[9];
  p[0] = o.data();
  for (int j = 1; j < 9; ++j) p[j] = p[j - 1] + sizes[j - 1];
  memkernels::cpu::write_forward(w, p[0], p[1], p[2]);
  memkernels::cpu::write_backward(w, p[1], p[2], dnew, p[3], p[4], p[5], p[6], p[7], p[8]);
  return o;
}

}  // namespace

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
  if (max_err >= 1e-4) return 1;

  // 300 slots (two row tiles) over 1,100 tokens (three key blocks, the last
  // a partial panel) in 3 groups
  const int64_t G = 3, M = 300, N = 1100;
  std::vector<float> x(2 * G * M * D + 2 * G * N * D + 2 * G * M + G * M * D);
  for (auto& e : x) e = normal(rng);
  const auto poisoned = write_outputs(G, M, N, D, x, std::numeric_limits<float>::quiet_NaN());
  const auto zeroed = write_outputs(G, M, N, D, x, 0.0f);
  int64_t nan = 0, differ = 0;
  for (size_t j = 0; j < zeroed.size(); ++j) {
    nan += std::isnan(poisoned[j]) || std::isnan(zeroed[j]);
    differ += std::memcmp(&poisoned[j], &zeroed[j], sizeof(float)) != 0;
  }
  std::printf("write forward+backward into NaN-poisoned outputs: %ld NaN, %ld differ of %ld\n",
              long(nan), long(differ), long(zeroed.size()));
  int64_t cases = 0;
  const bool stealer_ok = block_stealer_takes_each_block_once(&cases);
  std::printf("block stealer: %ld cases, %s\n", long(cases),
              stealer_ok ? "every block taken once" : "A BLOCK TAKEN TWICE OR NEVER");
  return nan == 0 && differ == 0 && stealer_ok ? 0 : 1;
}
