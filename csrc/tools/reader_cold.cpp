// The fused reading layer (reader_forward, a decode step's hot path) as the
// bench's reader_fwd row meets it, without Python or the binding: one token, a
// 512-wide hidden state, an MLP query of width 512, 8 query heads of 32 over 4
// kv heads of `slots` slots (the bench's reader shape), its weights and bank
// on the next of several input sets so that none is in the caches. Each call
// is timed in turns with two plain reads of other sets on the same threads
// (the three see the same minute of a machine whose memory speed moves): a
// sum of as many bytes in one pass, and a sum of each of the layer's four
// steps' bytes in turn (read_probe.h: the steps wait for each other, so the
// layer cannot stream its bytes as one pass does). Prints the medians and the
// kernel's time over each. What the bench's row adds to the kernel is then
// the call: the Python path, the binding, the output.
// Checks the last call against the float64 build of the same layer (the
// portable path: the float build runs the vector bodies).
//   ./memkernels_reader_cold [slots [reps]]
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "cold_read.h"
#include "cpu/simd.h"
#include "cpu/slot_bank_cpu.h"

namespace {

using cold_read::median;
using cold_read::seconds;
using cold_read::sum_on_all_threads;
using memkernels::cpu::sum_in_turn;

constexpr int64_t kHidden = 512, kMlp = 512, kHeads = 8, kKvHeads = 4, kDim = 32;

// One input set's arrays, back to back: hidden, mlp_w, mlp_b, query_w, out_w, keys, values.
struct Layout {
  int64_t at[8];
  explicit Layout(int64_t S) {
    const int64_t W = kHeads * kDim;
    const int64_t sizes[7] = {kHidden, kMlp * kHidden, kMlp, W * kMlp, W * kHidden,
                              kKvHeads * S * kDim, kKvHeads * S * kDim};
    at[0] = 0;
    for (int i = 0; i < 7; ++i) at[i + 1] = at[i] + (sizes[i] + 15) / 16 * 16;
    const int64_t steps[4] = {at[3] - at[0], at[4] - at[3], at[7] - at[5], at[5] - at[4]};
    std::copy(steps, steps + 4, step_sizes);
  }
  int64_t total() const { return at[7]; }
  // the layer's steps in the order they run, each the bytes it streams: the
  // norm and the MLP (hidden, mlp_w, mlp_b), the query projection, the read
  // (keys, values), the output projection; as the bench's STEPS_IN_TURN row
  // (memkernels/apps/bench/cases.py)
  int64_t step_sizes[4];
};

template <typename T>
memkernels::cpu::ReaderProblem<T> problem(const T* set, const Layout& l, int64_t S) {
  memkernels::cpu::ReaderProblem<T> r{};
  r.batch = 1, r.tokens = 1, r.hidden = kHidden, r.heads = kHeads, r.head_dim = kDim;
  r.slots = S, r.shared = true, r.kv_heads = kKvHeads, r.mlp_hidden = kMlp;
  r.hidden_states = set + l.at[0], r.mlp_w = set + l.at[1], r.mlp_b = set + l.at[2];
  r.query_w = set + l.at[3], r.out_w = set + l.at[4], r.keys = set + l.at[5];
  r.values = set + l.at[6];
  r.eps = T(1e-6), r.scale = T(20), r.unit_queries = true;  // as the bench's row
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace memkernels::cpu;
  const int64_t S = argc > 1 ? atoll(argv[1]) : 1024;
  const int reps = argc > 2 ? atoi(argv[2]) : 401;
  if (S < 1 || reps < 1) {
    std::printf("slots and reps must be positive\n");
    return 2;
  }
  const Layout l(S);
  // sets to rotate: 256 MB in all, at least 4, at most 64 (the bench's count)
  const int64_t set_bytes = l.total() * int64_t(sizeof(float));
  const int64_t sets = std::clamp<int64_t>((int64_t(256) << 20) / set_bytes, 4, 64);
  std::vector<std::unique_ptr<float[]>> data(sets);
  for (int64_t s = 0; s < sets; ++s) {
    data[s].reset(new float[l.total()]);  // not yet touched
    float* x = data[s].get();
#pragma omp parallel for schedule(static)  // first touch on the threads that read it
    for (int64_t i = 0; i < l.total(); ++i)
      x[i] = 0.05f * float(std::sin(0.011 * double(i) + 0.7 * double(s)));
  }
  std::vector<float> out(kHidden);
  std::vector<double> kernel_s, read_s, steps_s;
  double sink = 0;
  int64_t last = 0;
  for (int r = 0; r <= reps; ++r) {  // the first turn warms up and is dropped
    const int64_t s = r % sets, other = (r + sets / 3) % sets, third = (r + 2 * sets / 3) % sets;
    const double t0 = seconds();
    reader_forward(problem<float>(data[s].get(), l, S), out.data());
    const double t1 = seconds();
    sink += sum_on_all_threads(data[other].get(), l.total());  // as cold as the kernel's
    const double t2 = seconds();
    const float* y = data[third].get();
    const float* steps[4] = {y + l.at[0], y + l.at[3], y + l.at[5], y + l.at[4]};
    sink += sum_in_turn(steps, l.step_sizes, 4);
    const double t3 = seconds();
    last = s;
    if (r > 0)
      kernel_s.push_back(t1 - t0), read_s.push_back(t2 - t1), steps_s.push_back(t3 - t2);
  }
  // the last call against the float64 build of the same layer on the same inputs
  std::vector<double> wide(l.total()), expect(kHidden);
  std::copy(data[last].get(), data[last].get() + l.total(), wide.begin());
  reader_forward(problem<double>(wide.data(), l, S), expect.data());
  double max_err = 0;
  for (int64_t c = 0; c < kHidden; ++c) {
    const double e = std::abs(double(out[c]) - expect[c]);
    max_err = e > max_err || e != e ? e : max_err;
  }
  const double tk = median(kernel_s), tr = median(read_s), ts = median(steps_s);
  std::printf("reading layer slots=%ld (%s, %d threads, %ld sets of %.2f MB rotated): %.1f us; a "
              "sum of as many bytes %.1f us, %.1f GB/s; the layer's four steps' bytes summed in "
              "turn %.1f us; the kernel at %.2fx the sum's time, %.2fx the steps'; max |err| "
              "against float64 %.2e%s\n",
              long(S), best_isa() == Isa::avx512 ? "avx512" : "avx2", omp_get_max_threads(),
              long(sets), set_bytes / 1e6, tk * 1e6, tr * 1e6, set_bytes / tr / 1e9, ts * 1e6,
              tk / tr, tk / ts, max_err, sink == 1.0 ? " " : "");  // uses the sums: reads stay
  return max_err < 1e-4 ? 0 : 1;  // false for NaN
}
