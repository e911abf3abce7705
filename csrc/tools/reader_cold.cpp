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
#include "reader_sets.h"
#include "cpu/simd.h"
#include "cpu/slot_bank_cpu.h"

namespace {

using cold_read::median;
using cold_read::seconds;
using cold_read::sum_on_all_threads;
using memkernels::cpu::sum_in_turn;

using namespace reader_sets;

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
  int64_t S;
  int reps;
  if (!reader_sets::parse_args(argc, argv, 401, &S, &reps)) return 2;
  const Layout l(S);
  const int64_t set_bytes = l.total() * int64_t(sizeof(float));
  const auto data = reader_sets::make_sets(l);
  const int64_t sets = int64_t(data.size());
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
    const float* steps[4] = {y + l.step_starts[0], y + l.step_starts[1], y + l.step_starts[2],
                             y + l.step_starts[3]};
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
