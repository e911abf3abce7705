// The few-row tools' check: one group's output and log-sum-exp against a
// float64 softmax read (no mask). Returns the largest error (the lse's
// relative to its size), or NaN where any output is NaN.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

inline double few_rows_max_error(const float* q, const float* k, const float* v, const float* out,
                                 const float* lse, int64_t M, int64_t S, int64_t D, float scale) {
  double max_err = 0;
  auto note = [&](double err) {  // a NaN error is the worst
    if (!(err <= max_err)) max_err = err;
  };
  std::vector<double> w(S);
  for (int64_t r = 0; r < M; ++r) {
    double m = -INFINITY, total = 0;
    for (int64_t j = 0; j < S; ++j) {
      double a = 0;
      for (int64_t d = 0; d < D; ++d) a += double(q[r * D + d]) * k[j * D + d];
      m = std::max(m, w[j] = a * scale);
    }
    for (auto& x : w) total += (x = std::exp(x - m));
    note(std::abs(m + std::log(total) - lse[r]) / std::max(1.0, std::abs(m)));
    for (int64_t d = 0; d < D; ++d) {
      double o = 0;
      for (int64_t j = 0; j < S; ++j) o += w[j] * v[j * D + d];
      note(std::abs(o / total - out[r * D + d]));
    }
  }
  return max_err;
}
