// The bench's reading-layer shape (one token, a 512-wide hidden state, an MLP
// query of width 512, 8 query heads of 32 over 4 kv heads of `slots` slots)
// as the cold tools lay out one input set: its arrays back to back, and the
// layer's four steps as the bytes each streams.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

namespace reader_sets {

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
    const int64_t starts[4] = {at[0], at[3], at[5], at[4]};
    const int64_t steps[4] = {at[3] - at[0], at[4] - at[3], at[7] - at[5], at[5] - at[4]};
    std::copy(starts, starts + 4, step_starts);
    std::copy(steps, steps + 4, step_sizes);
  }
  int64_t total() const { return at[7]; }
  // the layer's steps in the order they run, each the bytes it streams: the
  // norm and the MLP (hidden, mlp_w, mlp_b), the query projection, the read
  // (keys, values), the output projection; as the bench's STEPS_IN_TURN row
  // (memkernels/apps/bench/cases.py). Offsets and sizes in floats.
  int64_t step_starts[4];
  int64_t step_sizes[4];
};

// The tools' arguments, `[slots [reps]]`: false, with a message, where either is not positive.
inline bool parse_args(int argc, char** argv, int default_reps, int64_t* slots, int* reps) {
  *slots = argc > 1 ? atoll(argv[1]) : 1024;
  *reps = argc > 2 ? atoi(argv[2]) : default_reps;
  if (*slots >= 1 && *reps >= 1) return true;
  std::printf("slots and reps must be positive\n");
  return false;
}

// Input sets to rotate so that none is in the caches when read again: 256 MB
// in all, at least 4, at most 64 (the bench's count), each filled on the
// threads that read it (first touch) with small values.
inline std::vector<std::unique_ptr<float[]>> make_sets(const Layout& l) {
  const int64_t set_bytes = l.total() * int64_t(sizeof(float));
  const int64_t sets = std::clamp<int64_t>((int64_t(256) << 20) / set_bytes, 4, 64);
  std::vector<std::unique_ptr<float[]>> data(sets);
  for (int64_t s = 0; s < sets; ++s) {
    data[s].reset(new float[l.total()]);  // not yet touched
    float* x = data[s].get();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < l.total(); ++i)
      x[i] = 0.05f * float(std::sin(0.011 * double(i) + 0.7 * double(s)));
  }
  return data;
}

}  // namespace reader_sets
