// Can a reading layer read its bytes faster than as a chain of four passes?
// Its steps (MLP, query projection, the read, the output projection) each wait
// for the one before, so the bench's floor for the layer is its steps' bytes
// summed one pass after another (read_probe.h, sum_in_turn: one parallel
// region, a barrier between steps). A kernel could still warm a later step's
// bytes while an earlier step streams its own. This tool times plain reads
// call by call, each on the next of several input sets laid out as the bench's
// (reader_sets.h), so that all see the same minute of a machine whose memory
// speed moves:
//   one pass:         all the set's bytes in one sum on every thread
//   a region a step:  the four steps' sums, a parallel region each
//   in turn:          sum_in_turn (the bench's floor for the layer)
//   spinning:         in turn, with a counter spun on instead of libgomp's barrier
//   warming next:     in turn, each thread warming into its L2 its share of the
//                     next step's bytes, paced over its share of the step
//   warming all:      in turn, the first step warming every later step's bytes
// Prints the medians and each over the in-turn time; exits 1 if any way of
// reading a set of ones sums to another total than its size (a read skipped).
//   ./memkernels_chain_reads [slots [reps]]
#include <omp.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <utility>
#include <vector>

#include "cold_read.h"
#include "reader_sets.h"

namespace {

using cold_read::median;
using cold_read::seconds;
using memkernels::cpu::sum_in_turn;
using memkernels::cpu::sum_on_all_threads;
using memkernels::cpu::thread_share;
using reader_sets::Layout;

// x[0, n) summed as sum_of does, with `warm_bytes` bytes from `warm`
// prefetched into L2 on the way, paced evenly over the sum's steps.
MK_CPU_CLONES double sum_warming(const float* x, int64_t n, const char* warm, int64_t warm_bytes) {
  float s[64] = {};
  const int64_t steps = std::max<int64_t>(1, n / 64), lines = (warm_bytes + 63) / 64;
  int64_t due = 0, line = 0, i = 0;
  for (; i + 64 <= n; i += 64) {
    for (due += lines; due >= steps; due -= steps, line += 64)
      __builtin_prefetch(warm + line, 0, 2);  // prefetcht1: into L2
    for (int u = 0; u < 64; ++u) s[u] += x[i + u];
  }
  for (; line < warm_bytes; line += 64) __builtin_prefetch(warm + line, 0, 2);  // a short x
  double total = 0;
  for (; i < n; ++i) total += x[i];
  for (float v : s) total += v;
  return total;
}

enum Way { kOnePass, kRegionEach, kInTurn, kSpinning, kWarmingNext, kWarmingAll, kWays };
const char* const kNames[kWays] = {"one pass", "a region a step", "in turn (one region)",
                                   "in turn, spinning barriers",
                                   "in turn, each step warming the next",
                                   "in turn, the first step warming the rest"};

// Thread t's share of step k, warming per `way` (kWarmingNext: its share of step k + 1;
// kWarmingAll, in step 0: its share of every later step, one after another, each over a part
// of step 0 in proportion to its bytes).
double step_share(Way way, const float* x, const Layout& l, int k, int t, int T) {
  const int64_t* start = l.step_starts;
  const int64_t* size = l.step_sizes;
  int64_t lo, hi;
  thread_share(size[k], t, T, &lo, &hi);
  const float* mine = x + start[k] + lo;
  auto warmed = [&](int j) {  // this thread's share of step j, as bytes to warm
    int64_t wlo, whi;
    thread_share(size[j], t, T, &wlo, &whi);
    return std::pair{reinterpret_cast<const char*>(x + start[j] + wlo),
                     (whi - wlo) * int64_t(sizeof(float))};
  };
  if (way == kWarmingNext && k < 3) {
    const auto [warm, bytes] = warmed(k + 1);
    return sum_warming(mine, hi - lo, warm, bytes);
  }
  if (way == kWarmingAll && k == 0) {
    double part = 0;
    const int64_t n0 = hi - lo, warm_total = size[1] + size[2] + size[3];
    int64_t done = 0, before = 0;  // floats of this share summed; later steps' floats passed
    for (int j = 1; j < 4; ++j) {
      before += size[j];
      const int64_t upto = j == 3 ? n0 : n0 * before / warm_total / 16 * 16;
      const int64_t take = std::max<int64_t>(0, upto - done);
      const auto [warm, bytes] = warmed(j);
      part += sum_warming(mine + done, take, warm, bytes);
      done += take;
    }
    return part;
  }
  return memkernels::cpu::sum_of(mine, hi - lo);
}

double read_set(Way way, const float* x, const Layout& l) {
  if (way == kOnePass) return sum_on_all_threads(x, l.total());
  if (way == kInTurn) {  // the bench's floor for the layer
    const float* steps[4] = {x + l.step_starts[0], x + l.step_starts[1], x + l.step_starts[2],
                             x + l.step_starts[3]};
    return sum_in_turn(steps, l.step_sizes, 4);
  }
  double total = 0;
  if (way == kRegionEach) {
    for (int k = 0; k < 4; ++k)
      total += sum_on_all_threads(x + l.step_starts[k], l.step_sizes[k]);
    return total;
  }
  std::atomic<int64_t> arrived{0};
#pragma omp parallel reduction(+ : total)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    for (int k = 0; k < 4; ++k) {
      total += step_share(way, x, l, k, t, T);
      if (way == kSpinning) {  // a counter each thread spins on: no futex wake-up
        arrived.fetch_add(1, std::memory_order_acq_rel);
        while (arrived.load(std::memory_order_acquire) < int64_t(k + 1) * T) _mm_pause();
      } else {
#pragma omp barrier
      }
    }
  }
  return total;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t S;
  int reps;
  if (!reader_sets::parse_args(argc, argv, 301, &S, &reps)) return 2;
  const Layout l(S);
  const int64_t set_bytes = l.total() * int64_t(sizeof(float));
  const auto data = reader_sets::make_sets(l);
  const int64_t sets = int64_t(data.size());
  std::vector<double> times[kWays];
  double sink = 0;
  for (int r = 0, turn = 0; r <= reps; ++r) {  // the first round warms up and is dropped
    for (int w = 0; w < kWays; ++w, ++turn) {
      const float* x = data[turn % sets].get();  // the set read longest ago
      const double t0 = seconds();
      sink += read_set(Way(w), x, l);
      if (r > 0) times[w].push_back(seconds() - t0);
    }
  }
  // every way reads every byte: on a set of ones (a skipped range would sum to less), each
  // way's total is the set's size
  std::vector<float> ones(l.total(), 1.0f);
  bool agree = true;
  for (int w = 0; w < kWays; ++w)
    agree = agree && std::abs(read_set(Way(w), ones.data(), l) - double(l.total())) < 0.5;
  const double in_turn = median(times[kInTurn]);
  std::printf("the reading layer's bytes, slots=%ld (%d threads, %ld sets of %.2f MB rotated):",
              long(S), omp_get_max_threads(), long(sets), set_bytes / 1e6);
  for (int w = 0; w < kWays; ++w) {
    const double t = median(times[w]);
    std::printf("%s %s %.1f us (%.2fx in turn)", w ? ";" : "", kNames[w], t * 1e6, t / in_turn);
  }
  std::printf("; sums %s%s\n", agree ? "agree" : "DIFFER", sink == 1.0 ? " " : "");
  return agree ? 0 : 1;
}
