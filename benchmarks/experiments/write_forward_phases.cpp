// Where the write's forward time goes on this CPU: the loop of write_forward
// (csrc/cpu/slot_bank_cpu.cpp) and attention_forward_rows
// (csrc/cpu/attention_cpu.h) for the write's one key block (1,024 slot rows
// over 512 tokens, Dh 64, the bench's shape, gates one a slot), on the
// library's own tile GEMMs and row passes, one thread, each phase timed on its
// own (TSC ticks a group): K's block transposed into panels and V's copied into
// panels, S = Q K^T, then per row as the kernel runs them the row's max, its
// exp and sum, and P (times 1 / sum) streamed out for the backward; O = P V,
// O's rows normalized with their lse, and the gate blend into the new bank.
// `groups` groups in turn (64, the bench's: ~50 MB of inputs and outputs, so
// Q, K, V and the bank come from memory as a training step's do); the first
// pass over them is dropped. Each product's FLOPs a tick beside its time (the
// FMA units' rate in the same minute: memkernels_backward_phases prints it).
// The kernel's phases, not the kernel: it reads the clock three times a row.
//   cmake -S . -B /tmp/bld && cmake --build /tmp/bld --target memkernels_cpu
//   g++ -O3 -fopenmp -fno-trapping-math -std=c++17 -Icsrc \
//       benchmarks/experiments/write_forward_phases.cpp /tmp/bld/libmemkernels_cpu.a \
//       -o /tmp/write_forward_phases
//   /tmp/write_forward_phases [groups [reps [tile_rows [keep]]]]   (defaults 64 2 256 1)
#include <omp.h>
#include <x86intrin.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/slot_bank_cpu.h"

using namespace memkernels;
using namespace memkernels::cpu;

namespace {
enum Phase { kPanels, kScores, kMax, kExp, kStore, kValues, kNormalize, kGates, kPhases };
const char* const kNames[kPhases] = {"K, V blocks into panels", "S = Q K^T", "rows' max",
                                     "exp and sum", "P streamed out", "O = P V",
                                     "O normalized, lse", "gate blend"};
}  // namespace

int main(int argc, char** argv) {
  const int64_t M = 1024, N = 512, D = 64;
  const int64_t groups = argc > 1 ? atoll(argv[1]) : 64;
  const int reps = argc > 2 ? atoi(argv[2]) : 2;
  const int64_t tile = argc > 3 ? atoll(argv[3]) : 256;
  const bool keep = argc > 4 ? atoi(argv[4]) != 0 : true;
  if (groups < 1 || reps < 1 || tile < 1 || !tile_gemm_applies(D) ||
      !tile_gemm_wants_panels(D)) {
    std::printf("groups, reps and tile_rows must be positive, on a CPU whose tile GEMMs read "
                "V in panels at Dh 64 (AVX2)\n");
    return 2;
  }
  omp_set_num_threads(1);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  const auto randn = [&](int64_t n) {
    std::vector<float> x(n);
    for (float& e : x) e = normal(rng);
    return x;
  };
  const auto q = randn(groups * M * D), k = randn(groups * N * D), v = randn(groups * N * D);
  const auto mem = randn(groups * M * D), forget = randn(groups * M), input = randn(groups * M);
  const int64_t pld = saved_probs_ld(N), ld = score_tile_ld(N), nbp = tile_gemm_ld(N);
  // rows of pld floats (a multiple of 16): each 64-byte aligned, as the streamed stores need
  auto* probs = static_cast<float*>(std::aligned_alloc(64, groups * M * pld * sizeof(float)));
  if (probs == nullptr) return 2;
  std::vector<float> out(groups * M * D), new_mem(groups * M * D), lse(groups * M);
  std::vector<float> scores(tile * ld), k_t(D * ld), v_panels(N * D), row_sum(tile);
  double ticks[kPhases] = {};
  for (int rep = 0; rep <= reps; ++rep) {
    for (int64_t g = 0; g < groups; ++g) {
      double t[kPhases] = {};
      const float* qg = q.data() + g * M * D;
      uint64_t c0 = __rdtsc();
      tile_transpose_panels(k.data() + g * N * D, N, D, 0.125f, k_t.data(), nbp);
      tile_to_panels(v.data() + g * N * D, N, D, D, v_panels.data());
      t[kPanels] += double(__rdtsc() - c0);
      for (int64_t r0 = 0; r0 < M; r0 += tile) {
        const int64_t tr = std::min(tile, M - r0);
        float* o = out.data() + (g * M + r0) * D;
        c0 = __rdtsc();
        tile_gemm_panels(tr, nbp, D, qg + r0 * D, D, 1, k_t.data(), scores.data(), ld, false);
        uint64_t c1 = __rdtsc();
        t[kScores] += double(c1 - c0);
        for (int64_t r = 0; r < tr; ++r) {  // the kernel's row loop (one key block: max final)
          float* s = scores.data() + r * ld;
          const float row_max = mask_and_max(s, static_cast<const bool*>(nullptr), N);
          const uint64_t c2 = __rdtsc();
          row_sum[r] = exp_row(s, N, row_max);
          const uint64_t c3 = __rdtsc();
          if (keep)
            scaled_row_streamed(s, probs + (g * M + r0 + r) * pld, pld, safe_inverse(row_sum[r]));
          const uint64_t c4 = __rdtsc();
          t[kMax] += double(c2 - c1);
          t[kExp] += double(c3 - c2);
          t[kStore] += double(c4 - c3);
          c1 = c4;
          lse[g * M + r0 + r] = row_max;  // log_sum_exp below
        }
        c0 = __rdtsc();
        tile_gemm_panels(tr, D, N, scores.data(), ld, 1, v_panels.data(), o, D, false);
        c1 = __rdtsc();
        t[kValues] += double(c1 - c0);
        for (int64_t r = 0; r < tr; ++r) {
          const float inv = safe_inverse(row_sum[r]);
          for (int64_t d = 0; d < D; ++d) o[r * D + d] *= inv;
          float& l = lse[g * M + r0 + r];
          l = log_sum_exp(l, row_sum[r]);
        }
        c0 = __rdtsc();
        t[kNormalize] += double(c0 - c1);
      }
      if (keep) stream_fence();  // the kernel's, after its last row: counted with the stores
      uint64_t c1 = __rdtsc();
      t[kStore] += double(c1 - c0);
      for (int64_t r = 0; r < M; ++r) {
        const int64_t e = (g * M + r) * D;
        gate_blend_row(new_mem.data() + e, mem.data() + e, out.data() + e,
                       forget.data() + g * M + r, input.data() + g * M + r, D, int64_t(1));
      }
      t[kGates] += double(__rdtsc() - c1);
      if (rep > 0)
        for (int i = 0; i < kPhases; ++i) ticks[i] += t[i] / double(reps * groups);
    }
  }
  double total = 0;
  for (const double x : ticks) total += x;
  const double product_flops = 2.0 * double(M) * double(N) * double(D);
  std::printf("write forward, one group of %ld rows over %ld keys, Dh %ld (%ld groups in turn, "
              "%ld-row tiles, P %s, one thread): %.2f M TSC ticks\n",
              long(M), long(N), long(D), long(groups), long(tile), keep ? "kept" : "not kept",
              total / 1e6);
  for (int i = 0; i < kPhases; ++i) {
    std::printf("  %-24s %5.1f%% of the time, %.2f M ticks", kNames[i], 100.0 * ticks[i] / total,
                ticks[i] / 1e6);
    if (i == kScores || i == kValues)
      std::printf(", %.1f FLOPs a tick", product_flops / ticks[i]);
    std::printf("\n");
  }
  std::free(probs);
  return 0;
}
