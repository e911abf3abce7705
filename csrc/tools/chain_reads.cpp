// Can a reading layer read its bytes faster than as a chain of four passes?
// Its steps (MLP, query projection, the read, the output projection) each wait
// for the one before, so the bench's floor for the layer is its steps' bytes
// summed one pass after another (read_probe.h, sum_in_turn). A kernel could
// still warm a later step's bytes while an earlier step streams its own, or
// run the four steps in one parallel region. This tool times those plain reads
// call by call, each on the next of several input sets laid out as the bench's
// (reader_sets.h), so that all see the same minute of a machine whose memory
// speed moves:
//   one pass:        all the set's bytes in one sum on every thread
//   in turn:         sum_in_turn, a parallel region a step
//   one region:      the four steps in one region, a barrier between steps
//   warming next:    in turn, each thread warming into its L2 its share of the
//                    next step's bytes, paced over its share of the step
//   warming all:     in turn, the first step warming every later step's bytes
// Prints the medians and each over the in-turn time; exits 1 if any way of
// reading a set sums to another total than the one pass (a read skipped).
//   ./memkernels_chain_reads [slots [reps]]
#include <omp.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "cold_read.h"
#include "reader_sets.h"

namespace {

using cold_read::median;
using cold_read::seconds;
using memkernels::cpu::sum_in_turn;
using memkernels::cpu::sum_on_all_threads;
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

// Thread t's contiguous share [lo, hi) of n floats among T threads (16-float aligned).
void share(int64_t n, int t, int T, int64_t* lo, int64_t* hi) {
  const int64_t per = (n / T + 15) / 16 * 16;
  *lo = std::min(n, t * per);
  *hi = t == T - 1 ? n : std::min(n, *lo + per);
}

enum Way { kOnePass, kInTurn, kOneRegion, kOneRegionSpin, kWarmingNext, kWarmingAll, kWays };
const char* const kNames[kWays] = {"one pass", "in turn", "in turn, one region",
                                   "in turn, one region, spinning barriers",
                                   "in turn, each step warming the next",
                                   "in turn, the first step warming the rest"};

double read_set(Way way, const float* x, const Layout& l) {
  const int64_t* start = l.step_starts;
  const int64_t* size = l.step_sizes;
  if (way == kOnePass) return sum_on_all_threads(x, l.total());
  if (way == kInTurn) {
    const float* steps[4] = {x + start[0], x + start[1], x + start[2], x + start[3]};
    return sum_in_turn(steps, size, 4);
  }
  double total = 0;
  if (way == kOneRegion || way == kOneRegionSpin) {
    std::atomic<int64_t> arrived{0};
#pragma omp parallel reduction(+ : total)
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      for (int k = 0; k < 4; ++k) {
        int64_t lo, hi;
        share(size[k], t, T, &lo, &hi);
        total += memkernels::cpu::sum_of(x + start[k] + lo, hi - lo);
        if (way == kOneRegion) {
#pragma omp barrier
        } else {  // a counter each thread spins on: no futex wake-up
          arrived.fetch_add(1, std::memory_order_acq_rel);
          while (arrived.load(std::memory_order_acquire) < int64_t(k + 1) * T) _mm_pause();
        }
      }
    }
    return total;
  }
  for (int k = 0; k < 4; ++k) {
#pragma omp parallel reduction(+ : total)
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      int64_t lo, hi;
      share(size[k], t, T, &lo, &hi);
      const float* mine = x + start[k] + lo;
      if (way == kWarmingNext && k < 3) {  // this thread's share of the next step
        int64_t wlo, whi;
        share(size[k + 1], t, T, &wlo, &whi);
        total += sum_warming(mine, hi - lo, reinterpret_cast<const char*>(x + start[k + 1] + wlo),
                             (whi - wlo) * int64_t(sizeof(float)));
      } else if (way == kWarmingAll && k == 0) {  // its share of each later step, one by one
        double part = 0;
        const int64_t n0 = hi - lo, warm_total = size[1] + size[2] + size[3];
        int64_t done = 0, before = 0;  // floats of this share summed; later steps' floats passed
        for (int j = 1; j < 4; ++j) {  // the share in parts in proportion to each step's bytes
          before += size[j];
          const int64_t upto = j == 3 ? n0 : n0 * before / warm_total / 16 * 16;
          const int64_t take = std::max<int64_t>(0, upto - done);
          int64_t wlo, whi;
          share(size[j], t, T, &wlo, &whi);
          part += sum_warming(mine + done, take, reinterpret_cast<const char*>(x + start[j] + wlo),
                              (whi - wlo) * int64_t(sizeof(float)));
          done += take;
        }
        total += part;
      } else {
        total += memkernels::cpu::sum_of(mine, hi - lo);
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
  // every way reads every byte: the same total as the one pass, on each set
  bool agree = true;
  for (int64_t s = 0; s < sets && agree; ++s) {
    const double expect = read_set(kOnePass, data[s].get(), l);
    for (int w = 1; w < kWays; ++w) {
      const double got = read_set(Way(w), data[s].get(), l);
      agree = agree && std::abs(got - expect) <= 1e-4 * (1.0 + std::abs(expect));
    }
  }
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
